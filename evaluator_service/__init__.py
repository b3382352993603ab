"""The evaluator service: task accuracy of a checkpoint, over gRPC (``slmcl.v1.Evaluator``).

``python -m evaluator_service --port 50052``. A replica keeps its base model resident and
swaps LoRA adapters in place; see README.md.
"""
