"""Forward passes that measure a checkpoint: greedy generation with a shared-prefix KV cache, task
evaluation, and next-token distributions for drift.
"""
