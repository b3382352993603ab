"""The compute dtype of a resident model: one rule for every mode.

Drift compares distributions to ~1e-6; a bfloat16 model and a float32 one on the same
device disagree far more than that. The embedded runner, the trainer and the evaluator
replicas all load through this rule, so a service run and an embedded run on the same
device kind compute with the same dtype (and the p_0 cache keys, which fingerprint the
dtype, agree).
"""

from __future__ import annotations

import torch

from slmcl.errors import SpecError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` of a spec on a device: ``auto`` is bfloat16 on CUDA, float32 elsewhere.

    CPUs have no fast bfloat16 matmul on most hosts we run on, and float32 keeps CPU
    results reproducible across batch sizes; CUDA's bfloat16 halves memory and traffic.
    """
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[requested]
    except KeyError:
        raise SpecError(f"model.dtype: {requested!r} is not one of auto, {', '.join(DTYPES)}") from None


__all__ = ["DTYPES", "compute_dtype"]
