"""The stability policy: which thresholds a stage crossed, and what the run does about it.

The study's conclusion is that KL to base warns early and may have a critical value (its
"failure zone"); its future work is acting on that automatically. A spec's ``policy:`` rules
bound KL to base (mean or p95), the fall of the top-2 margin and the fall of reference-set
accuracy, on the fixed reference set or on the stage's own training prompts, and each rule
names an action: ``alert``, ``stop``, ``revert`` or ``early-stop``.

This module is the decision only, pure and torch-free: the training role of the stage
protocol (``slmcl.protocol.stages.train_run``) measures the signals on the weights it holds
and calls it, so an embedded run and a trainer worker decide the same way from the same
numbers, and the decision is written in the stage's training record before anyone reads it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slmcl.config.spec import PolicyRule

# Strongest first: a stage that crosses a stop rule and a revert rule stops.
ACTION_RANK = {"stop": 3, "revert": 2, "early-stop": 1, "alert": 0}


@dataclass(frozen=True)
class Signals:
    """What was measured at a checkpoint, as ``summarize_drift`` summaries (None: not measured)."""

    reference: Mapping[str, Any] | None = None  # drift on the reference set
    task: Mapping[str, Any] | None = None  # drift on the stage's own training prompts
    reference_accuracy: float | None = None  # accuracy on the reference rows, by generation
    base_reference_accuracy: float | None = None


def statistic(name: str, summary: Mapping[str, Any] | None, signals: Signals) -> float | None:
    """The value a threshold named ``name`` bounds (``margin_drop`` is base margin minus margin: a fall)."""
    if name == "accuracy_drop":
        acc, base = signals.reference_accuracy, signals.base_reference_accuracy
        return None if acc is None or base is None else base - acc
    if summary is None:
        return None
    key = {"kl_mean": "kl_to_base_mean", "kl_p95": "kl_to_base_p95", "margin_drop": "margin_delta_mean"}[name]
    value = summary.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return 0.0 - float(value) if name == "margin_drop" else float(value)


def crossings(rules: Sequence[PolicyRule], signals: Signals, *, stage: int,
              actions: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One record per (rule, threshold) crossed: stage, rule index, action, signal, statistic, value, threshold.

    ``actions`` restricts the rules looked at (after a stage: all but early-stop, which acts during it).
    """
    out = []
    for i, rule in enumerate(rules):
        if actions is not None and rule.action not in actions:
            continue
        summary = signals.reference if rule.signal == "reference" else signals.task
        for name, threshold in rule.thresholds.items():
            value = statistic(name, summary, signals)
            if value is not None and value > threshold:
                out.append({"stage": stage, "rule": i, "action": rule.action, "signal": rule.signal,
                            "statistic": name, "value": value, "threshold": threshold})
    return out


def strongest(records: Sequence[Mapping[str, Any]]) -> str | None:
    """The action the run takes for a stage's intervention records (None: the stage is healthy)."""
    if not records:
        return None
    return str(max((r["action"] for r in records), key=lambda a: ACTION_RANK[a]))


def needs(rules: Sequence[PolicyRule], what: str) -> bool:
    """Whether any rule acting after a stage reads ``what``: 'reference', 'task' or 'accuracy'."""
    after = [r for r in rules if r.action != "early-stop"]
    if what == "accuracy":
        return any(r.accuracy_drop is not None for r in after)
    return any(r.signal == what and set(r.thresholds) - {"accuracy_drop"} for r in after)


def describe(record: Mapping[str, Any]) -> str:
    """One line for an intervention record (what ``slmcl run`` and ``slmcl watch`` print)."""
    what = {"alert": "alert", "stop": "run stopped after this stage", "revert": "stage reverted: the next "
            "stage starts from the last healthy checkpoint", "early-stop": "stage ended early"}[record["action"]]
    where = f"{record['signal']} {record['statistic']} {record['value']:.4f} > {record['threshold']:g}"
    extra = ""
    if record["action"] == "early-stop":
        extra = (f" at optimizer step {record.get('at_step')}/{record.get('total_steps')}, "
                 f"weights of step {record.get('kept_step')} kept")
    return f"{what}: {where}{extra}"


__all__ = ["ACTION_RANK", "Signals", "crossings", "describe", "needs", "statistic", "strongest"]
