"""The identity of a resident base model, for cache keys (base evaluations, p_0 on the reference set).

Two processes that loaded "the same" model must agree on its key, and a changed weight,
dtype or config must change it; hashing every weight of a 1B model would cost seconds per
load, so the checksum reads the first values of every parameter, which any re-training,
re-quantisation or different checkpoint changes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def model_fingerprint(model: Any, name: str, source: str, dtype: torch.dtype) -> str:
    """The name, the dtype, the config (minus its local path) and a checksum of the weights."""
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(str(dtype).encode())
    cfg = model.config.to_dict()
    cfg.pop("_name_or_path", None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for pname, p in model.named_parameters():
            h.update(pname.encode())
            h.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]
