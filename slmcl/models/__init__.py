"""A resident model: loading (GGUF conversion for the embedded models), fingerprints, LoRA
attach/save/load/merge, the one dtype rule, and the `Engine` that trains, evaluates and measures
drift on it.
"""
