"""Drift of a checkpoint's next-token distribution from the base, on a fixed reference set.

For each reference row: render it exactly as for evaluation, one forward pass (the head a
task's rows share is fed once for all of them, as in generation), the distribution at
the row's *last* position (left padding puts it at index -1 for every
row; reading ``attention_mask.sum() - 1`` there is the bug that understated KL 5-10x in
the study's first release). KL(p_k || p_0), entropy and top-2 log-prob margin per row, in
float64 (``drift_rows``), summarized as mean / p10 / p95 by ``slmcl.protocol.drift.summarize_drift``,
pure Python, so the monitor aggregates an evaluator's rows with the very same function. The base
distributions p_0 never change, so they are computed once per (model, reference file, rendering)
and cached; a checkpoint costs one forward per row, never a second adapter-disabled pass.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from slmcl.config.spec import BUILTIN_TASKS
from slmcl.inference.generation import last_position_logits
from slmcl.models.loading import LoadedModel
from slmcl.protocol.drift import DriftRows, summarize_drift
from slmcl.protocol.tables import STAT_NAMES
from slmcl.tasks.data import Example
from slmcl.tasks.prompts import PromptRenderer


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


ROW_CHUNK_BYTES = 64 * 1024 * 1024  # one float64 [rows, vocab] temporary of row_stats, at most


def drift_rows(logp: torch.Tensor, base_logp: torch.Tensor | None) -> DriftRows:
    """Per-row drift (float64) as plain lists: what an evaluator returns and the summary reads.

    Rows go through ``row_stats`` in chunks: its float64 temporaries of a whole reference set
    (rows x vocab, several of them) would be gigabytes for a large vocabulary. Each row's
    statistics are reductions over its own vocabulary only, so chunking changes no value.
    """
    if base_logp is not None and base_logp.shape != logp.shape:
        raise ValueError(f"drift: checkpoint log-probs {tuple(logp.shape)} and base {tuple(base_logp.shape)} differ")
    step = max(1, ROW_CHUNK_BYTES // (8 * max(1, logp.shape[-1])))
    out: dict[str, list[float]] = {name: [] for name in STAT_NAMES}
    for i in range(0, logp.shape[0], step):
        stats = row_stats(logp[i:i + step], None if base_logp is None else base_logp[i:i + step])
        for name in STAT_NAMES:
            out[name] += stats[name].tolist()
    return DriftRows(**out)


@dataclass(frozen=True)
class StabilitySummary:
    num_reference_examples: int
    values: dict[str, float]  # kl_to_base_mean, ..., margin_p95, entropy_delta_mean, margin_delta_mean

    def as_dict(self) -> dict[str, Any]:
        return {"num_reference_examples": self.num_reference_examples, **self.values}

    @classmethod
    def of(cls, rows: DriftRows, base: DriftRows | None) -> StabilitySummary:
        """The summary of per-row drift, by the one aggregation every mode uses (``summarize_drift``)."""
        summary = summarize_drift(rows, base)
        n = summary.pop("num_reference_examples")
        return cls(int(n), summary)


def stability_summary(logp: torch.Tensor, base_logp: torch.Tensor | None) -> StabilitySummary:
    """Drift of ``logp`` from ``base_logp`` (None: ``logp`` is the base itself), summarized."""
    base = drift_rows(base_logp, None) if base_logp is not None else None
    return StabilitySummary.of(drift_rows(logp, base_logp), base)


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


