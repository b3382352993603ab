"""A results tree read back as objects (the Python API behind ``slmcl.read_results``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmcl.errors import NotFoundError
from slmcl.protocol import layout
from slmcl.protocol.records import StageRecord
from slmcl.protocol.tables import summarize
from slmcl.storage.local import ArtifactStore, LocalStore


def read_stages(store: ArtifactStore, rid: str | None = None) -> list[StageRecord]:
    """Every committed stage record (of one run, or all), in (order, seed, step) order."""
    keys = [k for k in store.list_keys(layout.runs_prefix(rid)) if layout.is_stage_key(k)]
    recs = [StageRecord.from_json(store.get_bytes(k)) for k in keys]
    return sorted(recs, key=lambda r: (r.model, r.strategy, layout.order_id(r.order), r.seed, r.step))


@dataclass(frozen=True)
class Results:
    """A results directory as objects: per strategy and order, the matrix, metrics and stability."""

    path: Path
    records: list[StageRecord]
    summary: dict[str, Any]

    @property
    def orders(self) -> list[list[str]]:
        return [o["order"] for o in self.summary["orders"]]

    @property
    def comparison(self) -> list[dict[str, Any]]:
        """Per model and strategy: final metrics, drift and cost, mean ± std over runs (comparison.csv)."""
        return list(self.summary.get("comparison", []))

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.records))

    def matrix(self, order: Sequence[str] | None = None, strategy: str | None = None,
               model: str | None = None) -> dict[int, dict[str, float]]:
        return {int(k): v for k, v in self._order(order, strategy, model)["matrix_mean"].items()}

    def metrics(self, order: Sequence[str] | None = None, strategy: str | None = None,
                model: str | None = None) -> list[dict[str, Any]]:
        return self._order(order, strategy, model)["metrics"]

    def stability(self, order: Sequence[str] | None = None, strategy: str | None = None,
                  model: str | None = None) -> dict[int, dict[str, float | None]]:
        return {int(k): v for k, v in self._order(order, strategy, model)["stability_mean"].items()}

    def _order(self, order: Sequence[str] | None, strategy: str | None = None,
               model: str | None = None) -> dict[str, Any]:
        """The summary entry of (model, strategy, order); ``model`` is a model's name as records hold it."""
        entries = [e for e in self.summary["orders"] if (strategy is None or e.get("strategy") == strategy)
                   and (model is None or e.get("model") == model)]
        if not entries:
            raise NotFoundError(f"no results for strategy {strategy!r}, model {model!r} in {self.path}")
        if order is None:
            return entries[0]
        for e in entries:
            if list(e["order"]) == list(order):
                return e
        raise NotFoundError(f"no results for order {'>'.join(order)} in {self.path}")


def read_results(path: str | Path) -> Results:
    store = LocalStore(path)
    if not Path(path).is_dir():
        raise NotFoundError(f"results directory not found: {path}")
    records = read_stages(store)
    if not records:
        raise NotFoundError(f"{path}: no finished stages (runs/*/stage-*.json) in this directory")
    return Results(Path(path), records, summarize(records))
