"""A results directory regrouped the way the report reads it: by model, strategy, order and seed.

Every number the report shows comes from here, and every accuracy-based one from ``slmcl.metrics``
(per seed first, then mean ± std over seeds, the study's convention), so the report can never
disagree with ``summary.json`` or ``slmcl metrics``. A stage whose tasks were not all evaluated
(``evaluation.every``) has no row in its run's matrix: its metrics are ``None`` and it is left out
of every accuracy figure, never drawn as 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from slmcl import metrics as mx
from slmcl.errors import NotFoundError
from slmcl.metrics.seeds import mean_std
from slmcl.protocol import layout
from slmcl.protocol.records import StageRecord
from slmcl.protocol.results import read_stages
from slmcl.storage.local import LocalStore

Order = tuple[str, ...]
Role = Literal["original", "reversed", "single"]


@dataclass(frozen=True)
class Stat:
    """A value over seeds: mean, sample std (None below two seeds) and how many seeds it is over."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        # NaN is a failed measurement, not a number to average (it would poison the mean).
        vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
        mean, std = mean_std(vals)
        return cls(mean, std, len(vals))


NO_STAT = Stat(None, None, 0)


def order_text(order: Sequence[str]) -> str:
    return " → ".join(order)


@dataclass(frozen=True)
class Run:
    """One run: a model, a strategy, an order and a seed, and its stage records in step order."""

    model: str
    strategy: str
    order: Order
    seed: int
    records: tuple[StageRecord, ...]

    @cached_property
    def matrix(self) -> dict[int, dict[str, float]]:
        """R[k][task] of the fully evaluated stages only: a stage between full evaluations has no row."""
        return {r.step: {t: float(r.scores[t]["accuracy"]) for t in self.order if t in r.scores}
                for r in self.records if r.evaluated}

    @cached_property
    def step_metrics(self) -> list[mx.StepMetrics]:
        return mx.step_metrics(self.matrix, self.order)

    def record(self, step: int) -> StageRecord | None:
        return next((r for r in self.records if r.step == step), None)

    @property
    def last(self) -> StageRecord:
        return self.records[-1]

    @property
    def finished(self) -> bool:
        """Its last stage is committed (or the stability policy stopped it): its final numbers are final."""
        return self.last.step == len(self.order) or self.last.action == "stop"


@dataclass(frozen=True)
class OrderGroup:
    """The seeds of one (model, strategy, order): what a row of the study's tables averages over."""

    model: str
    strategy: str
    order: Order
    runs: tuple[Run, ...]
    role: Role = "single"
    partner: Order | None = None  # the reverse of this order, where the experiment has it

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @cached_property
    def aggregates(self) -> dict[int, mx.AggregateStepMetrics]:
        """The metrics module's mean ± std over seeds, by step (metrics per seed first, then seeds)."""
        return {a.step: a for a in mx.aggregate_seeds([run.step_metrics for run in self.runs])}

    @property
    def steps(self) -> list[int]:
        """The steps at least one seed has committed, base included."""
        return sorted({r.step for run in self.runs for r in run.records})

    def metric(self, step: int, name: str) -> Stat:
        agg = self.aggregates.get(step)
        if agg is None:
            return NO_STAT
        n = sum(1 for run in self.runs for row in run.step_metrics if row.step == step and row.metric(name) is not None)
        return Stat(agg.mean.get(name), agg.std.get(name), n)

    def stability(self, step: int, key: str) -> Stat:
        """A drift statistic over the seeds that committed ``step`` (measured at every stage, evaluated or not)."""
        return Stat.of([rec.stability.get(key) for run in self.runs if (rec := run.record(step)) is not None])

    def evaluated_stability(self, step: int, key: str) -> Stat:
        """The same statistic over only the seeds whose ``step`` was fully evaluated: paired with their accuracy."""
        return Stat.of([rec.stability.get(key) for run in self.runs
                        if (rec := run.record(step)) is not None and rec.evaluated])

    def final(self) -> tuple[Stat, Stat]:
        """Final average accuracy and final KL to base over the finished runs (their last checkpoint)."""
        done = [run for run in self.runs if run.finished]
        accs = [run.step_metrics[run.last.step].avg_all_tasks for run in done]
        kls = [run.last.stability.get("kl_to_base_mean") for run in done]
        return Stat.of(accs), Stat.of(kls)

    def checkpoint_label(self, step: int) -> str:
        return "base" if step == 0 else f"after {self.order[step - 1]}"


@dataclass
class Study:
    """Everything of a results directory the report shows, grouped (models, then strategies, then orders)."""

    path: Path
    records: list[StageRecord]
    spec: dict[str, Any]
    spec_text: str
    groups: list[OrderGroup] = field(default_factory=list)
    stage_files: list[Path] = field(default_factory=list)

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(g.model for g in self.groups))

    @property
    def strategies(self) -> list[str]:
        return list(dict.fromkeys(g.strategy for g in self.groups))

    @property
    def several_strategies(self) -> bool:
        return len(self.strategies) > 1

    @property
    def has_reversed(self) -> bool:
        return any(g.role == "reversed" for g in self.groups)

    @cached_property
    def model_labels(self) -> dict[str, str]:
        return model_labels(self.models, spec_model_labels(self.spec))

    def by_model_strategy(self) -> list[tuple[str, str, list[OrderGroup]]]:
        out: dict[tuple[str, str], list[OrderGroup]] = {}
        for g in self.groups:
            out.setdefault((g.model, g.strategy), []).append(g)
        return [(m, s, gs) for (m, s), gs in out.items()]

    def group_label(self, g: OrderGroup) -> str:
        label = self.model_labels[g.model]
        return f"{label} · {g.strategy}" if self.several_strategies else label


def spec_model_labels(spec: dict[str, Any]) -> dict[str, str]:
    """Model name -> label as a several-model spec names them (its ``models`` entries: ``label``, else the
    name's last part, lowercased, as ``ModelSpec.key`` derives it), so the report calls a model what the run
    ids and the other tables call it."""
    out: dict[str, str] = {}
    for entry in spec.get("models") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        name: str = entry["name"]
        label = entry.get("label")
        if not (isinstance(label, str) and label):
            tail = re.split(r"[:/\\]", name.rstrip("/\\"))[-1].lower()
            label = re.sub(r"[^a-z0-9_.-]+", "-", tail).strip("-.") or "model"
        out[name] = label
    return out


def model_labels(models: Sequence[str], given: dict[str, str] | None = None) -> dict[str, str]:
    """Short names for legends and tables: the spec's label where it gives one, else a local model folder by
    its last component, unless two collide (then the full name).

    A Hub id (``Qwen/Qwen3.5-0.8B``) is already short and is kept whole; a path such as
    ``/data/models/llama-1b`` reads as ``llama-1b``. The full names stay in the CSV files.
    """
    def short(m: str) -> str:
        if given and m in given:
            return given[m]
        p = Path(m)
        return p.name if (p.is_absolute() or m.startswith(".")) and p.name else m

    shorts = {m: short(m) for m in models}
    clashes = {s for s in shorts.values() if list(shorts.values()).count(s) > 1}
    return {m: (m if s in clashes else s) for m, s in shorts.items()}


_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slug(*parts: str) -> str:
    """A file-name-safe name: the report's file names must never depend on a model path's separators."""
    return "_".join(_SLUG.sub("-", p).strip("-.") or "x" for p in parts)


def order_roles(orders: Sequence[Order]) -> dict[Order, tuple[Role, Order | None]]:
    """Which orders pair up as original and reversed.

    An order whose exact reverse is also in the experiment forms a pair with it; the one that comes
    first (the spec's order list, else first seen) is the "original". A one-task order is its own
    reverse and pairs with nothing. Every other order is "single": shown on its own.
    """
    present = set(orders)
    roles: dict[Order, tuple[Role, Order | None]] = {}
    for o in orders:
        if o in roles:
            continue
        rev = tuple(reversed(o))
        if rev != o and rev in present and rev not in roles:
            roles[o] = ("original", rev)
            roles[rev] = ("reversed", o)
        else:
            roles[o] = ("single", None)
    return roles


def is_results_dir(path: Path) -> bool:
    return path.is_dir() and ((path / layout.SPEC_JSON).is_file() or any(path.glob("runs/*/stage-*.json")))


def load_study(path: str | Path) -> Study:
    """Read a results directory; a folder that is not one raises ``NotFoundError`` naming it."""
    root = Path(path)
    if not is_results_dir(root):
        raise NotFoundError(f"{root}: not an slmcl results directory (no spec.json and no runs/*/stage-*.json)")
    spec: dict[str, Any] = {}
    if (root / layout.SPEC_JSON).is_file():
        loaded = json.loads((root / layout.SPEC_JSON).read_text())
        spec = loaded if isinstance(loaded, dict) else {}
    if (root / layout.SPEC_YAML).is_file():
        spec_text = (root / layout.SPEC_YAML).read_text()
    elif spec:
        spec_text = json.dumps(spec, indent=1)
    else:
        spec_text = ""
    records = read_stages(LocalStore(root))
    study = Study(root, records, spec, spec_text, stage_files=sorted(root.glob("runs/*/stage-*.json")))
    study.groups = groups_of(records, [tuple(o) for o in spec.get("orders") or [] if isinstance(o, list)], spec)
    return study


def groups_of(records: Sequence[StageRecord], spec_orders: Sequence[Order], spec: dict[str, Any]) -> list[OrderGroup]:
    runs: dict[tuple[str, str, Order, int], list[StageRecord]] = {}
    for r in records:
        runs.setdefault((r.model, r.strategy, tuple(r.order), r.seed), []).append(r)
    seen_orders = list(dict.fromkeys([*spec_orders, *(k[2] for k in runs)]))
    roles = order_roles([o for o in seen_orders if any(k[2] == o for k in runs)])
    rank = {o: i for i, o in enumerate(seen_orders)}
    spec_models = list(spec_model_labels(spec))  # the spec's order of models, where it lists several
    models = sorted({k[0] for k in runs}, key=lambda m: (spec_models.index(m) if m in spec_models else len(spec_models),
                                                          model_labels([m])[m].lower(), m))
    strategies = list(dict.fromkeys(k[1] for k in sorted(runs, key=lambda k: k[1] != layout.DEFAULT_STRATEGY)))

    by_group: dict[tuple[str, str, Order], list[Run]] = {}
    for (model, strategy, order, seed), recs in runs.items():
        run = Run(model, strategy, order, seed, tuple(sorted(recs, key=lambda r: r.step)))
        by_group.setdefault((model, strategy, order), []).append(run)
    keys = sorted(by_group, key=lambda k: (models.index(k[0]), strategies.index(k[1]), rank[k[2]]))
    return [OrderGroup(m, s, o, tuple(sorted(by_group[(m, s, o)], key=lambda r: r.seed)), *roles[o])
            for m, s, o in keys]
