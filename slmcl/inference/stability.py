"""Drift of a checkpoint's next-token distribution from the base, on a fixed reference set.

For each reference row: render it exactly as for evaluation, one forward pass (the head a
task's rows share is fed once for all of them, as in generation), the distribution at
the row's *last* position (left padding puts it at index -1 for every
row; reading ``attention_mask.sum() - 1`` there is the bug that understated KL 5-10x in
the study's first release). KL(p_k || p_0), entropy and top-2 log-prob margin per row,
summarized as mean / p10 / p95. The base distributions p_0 never change, so they are
computed once per (model, reference file, rendering) and cached; a checkpoint costs one
forward per row, never a second adapter-disabled pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from slmcl.tasks.data import Example
from slmcl.inference.generation import last_position_logits
from slmcl.models.loading import LoadedModel
from slmcl.tasks.prompts import PromptRenderer
from slmcl.protocol.results import STAT_NAMES
from slmcl.config.spec import BUILTIN_TASKS


def reference_prompt_ids(
    loaded: LoadedModel, renderer: PromptRenderer, rows: Sequence[Example], instructions: Mapping[str, str]
) -> list[list[int]]:
    """Token ids of each reference row, rendered with its own task's instruction."""
    out = []
    for ex in rows:
        instruction = instructions.get(ex.task_name, BUILTIN_TASKS.get(ex.task_name, ("", "", ""))[2])
        text = renderer.prompt_text(instruction, ex.prompt)
        out.append(loaded.tokenizer(text, add_special_tokens=False).input_ids)
    return out


def last_position_logprobs(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    segments: Sequence[Any] | None = None,
    on_forward: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """log p(next token | row) at each row's last position, float32 on the CPU, input order.

    Exactly one forward per row, batched by length; rows of one segment (a reference row's
    task: same instruction, same rendered head) have that head fed once for all of them.
    """
    logits = last_position_logits(model, prompts, pad_id=pad_id, batch_size=batch_size, device=device,
                                  segments=segments, on_forward=on_forward)
    return torch.log_softmax(torch.stack(logits).float(), dim=-1).cpu()


def row_stats(logp: torch.Tensor, base_logp: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-row KL to base, entropy (nats) and top-2 margin; computed in float64."""
    lp = logp.double()
    p = lp.exp()
    entropy = -(p * lp).sum(-1)
    top2 = lp.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    if base_logp is None:
        kl = torch.zeros_like(entropy)
    else:
        kl = (p * (lp - base_logp.double())).sum(-1).clamp(min=0.0)
    return {"kl_to_base": kl, "entropy": entropy, "margin": margin}


def summarize(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    return {
        "mean": float(v.mean()),
        "p10": float(torch.quantile(v, 0.10)),
        "p95": float(torch.quantile(v, 0.95)),
    }


@dataclass(frozen=True)
class StabilitySummary:
    num_reference_examples: int
    values: dict[str, float]  # kl_to_base_mean, ..., margin_p95, entropy_delta_mean, margin_delta_mean

    def as_dict(self) -> dict[str, Any]:
        return {"num_reference_examples": self.num_reference_examples, **self.values}


def stability_summary(logp: torch.Tensor, base_logp: torch.Tensor | None) -> StabilitySummary:
    stats = row_stats(logp, base_logp)
    values: dict[str, float] = {}
    for name in STAT_NAMES:
        for key, val in summarize(stats[name]).items():
            values[f"{name}_{key}"] = val
    if base_logp is not None:
        base = row_stats(base_logp, None)
        values["entropy_delta_mean"] = values["entropy_mean"] - float(base["entropy"].mean())
        values["margin_delta_mean"] = values["margin_mean"] - float(base["margin"].mean())
        for name in ("entropy", "margin"):
            for key, val in summarize(base[name]).items():
                values[f"base_{name}_{key}"] = val
    else:
        values["entropy_delta_mean"] = 0.0
        values["margin_delta_mean"] = 0.0
    return StabilitySummary(int(logp.shape[0]), values)


def base_cache_key(loaded: LoadedModel, reference_sha256: str, renderer: PromptRenderer,
                   instructions: Mapping[str, str], max_examples: int | None) -> str:
    """Everything p_0 depends on: base weights, reference bytes, rendering, subset, device kind."""
    blob = json.dumps(
        {
            "model": loaded.fingerprint,
            "reference": reference_sha256,
            "rendering": renderer.fingerprint(),
            "instructions": dict(sorted(instructions.items())),
            "max_examples": max_examples,
            "device": loaded.device.type,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    from safetensors.torch import save

    return save({"logp": t.contiguous()})


def tensor_from_bytes(data: bytes) -> torch.Tensor:
    from safetensors.torch import load

    return load(data)["logp"]


