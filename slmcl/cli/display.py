"""Progress bars for ``slmcl run`` (and ``slmcl watch``): stages overall, then the phase at hand.

It consumes the runner's ``Event``s, so the same drawing serves a local run and a
remote experiment watched over gRPC.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def intervention_line(run_id: str, stage: int, task: str, record: dict[str, Any]) -> str:
    """What the stability policy did, as ``slmcl run`` and ``slmcl watch`` print it."""
    from slmcl.protocol.policy import describe

    return f"  POLICY {run_id} stage {stage} ({task}): {describe(record)}"


def stage_summary(data: dict[str, Any]) -> str:
    """A committed stage in one line: its accuracies (or the estimate, labelled), KL on both signals."""
    stab = data.get("stability") or {}
    if data.get("scores"):
        head = "  ".join(f"{t} {s['accuracy']:.3f}" for t, s in data["scores"].items())
    elif data.get("estimate"):
        est = data["estimate"]
        interval = f" [{est['low']:.3f}, {est['high']:.3f}]" if est.get("low") is not None else ""
        head = f"avg accuracy {est['value']:.3f}{interval} ESTIMATED from KL ({est['points']} points)"
    else:
        head = "not evaluated (evaluation.every)"
    kl = stab.get("kl_to_base_mean")
    line = f"{head}  | KL {kl:.4f}" if kl is not None else head
    task_kl = stab.get("task_kl_to_base_mean")
    if task_kl is not None:
        line += f" (own task {task_kl:.4f})"
    if data.get("action"):
        line += f" | {data['action']}"
    return line


class ProgressDisplay:
    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.overall: tqdm | None = None
        self.phase: tqdm | None = None
        self._phase_key: tuple[Any, ...] | None = None
        self._eval_parts: dict[tuple[str, Any], tuple[int, int]] = {}

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._close_phase()
        if self.overall is not None:
            self.overall.close()

    def _close_phase(self) -> None:
        if self.phase is not None:
            self.phase.close()
            self.phase = None
            self._phase_key = None

    def _open_phase(self, key: tuple[Any, ...], desc: str, total: int, unit: str) -> tqdm:
        if self._phase_key != key:
            self._close_phase()
            self.phase = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream,
                              disable=not self.enabled, dynamic_ncols=True)
            self._phase_key = key
        assert self.phase is not None
        return self.phase

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=self.stream)

    def __call__(self, event: Any) -> None:
        e = event.as_dict() if hasattr(event, "as_dict") else event
        kind, rid, stage, task, data = e["kind"], e["run_id"], e["stage"], e["task"], e["data"]
        if kind == "experiment_started":
            self.overall = tqdm(total=data["stages"], initial=data.get("stages_done", 0), desc="stages",
                                unit="stage", file=self.stream, disable=not self.enabled, dynamic_ncols=True)
            self.write(f"{data['runs']} run(s), {data['stages']} stage(s) -> {data['output_dir']}")
        elif kind == "model_loaded":
            self.write(f"model {data['model']} on {data['device']} ({data['seconds']:.1f} s)")
        elif kind == "base_eval":
            self._close_phase()
            together = data.get("evaluated_with") or [task]
            timing = (f", {data['seconds']:.1f} s" + (f" for {len(together)} tasks" if len(together) > 1 else "")
                      if task == together[-1] else "")
            self.write(f"base  {task:<12} accuracy {data['accuracy']:.3f} ({data['correct']}/{data['total']}{timing})")
        elif kind == "run_started":
            self.write(f"run {rid}")
        elif kind == "train_step":
            bar = self._open_phase(("train", rid, stage), f"train {task} [{rid} stage {stage}]",
                                   data["total_steps"], "step")
            bar.n = data["step"]
            bar.set_postfix(loss=f"{data['loss']:.4f}", ex_s=f"{data['examples_per_s']:.1f}", refresh=False)
            bar.refresh()
        elif kind == "eval_progress":
            # One bar per checkpoint: its tasks (and shards) are evaluated together.
            key = ("eval", rid, stage)
            if self._phase_key != key:
                self._eval_parts = {}
            self._eval_parts[(task, data.get("shard"))] = (data["done"], data["total"])
            bar = self._open_phase(key, "eval" + (f" [{rid} stage {stage}]" if rid else " [base]"), 0, "ex")
            bar.total = sum(t for _, t in self._eval_parts.values())
            bar.n = sum(d for d, _ in self._eval_parts.values())
            bar.set_postfix_str(" ".join(dict.fromkeys(t for t, _ in self._eval_parts)), refresh=False)
            bar.refresh()
        elif kind == "stage_skipped":
            self.write(f"  stage {stage} ({task}) already done: skipped")
        elif kind == "intervention":
            self._close_phase()
            self.write(intervention_line(rid, stage, task, data))
        elif kind == "tracking_warning":
            self._close_phase()
            self.write(f"  warning: {data['message']}")
        elif kind == "stage_done":
            self._close_phase()
            self.write(f"  stage {stage} after {task}: {stage_summary(data)} | {data['seconds']:.0f} s")
            if self.overall is not None:
                self.overall.update(1)
        elif kind == "experiment_done":
            self._close_phase()
