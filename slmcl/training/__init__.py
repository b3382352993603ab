"""One stage of training: the length-batched loop, LoRA dropout, and the continual-learning strategies
(one file each, in `strategies/`).
"""
