"""Experiment trackers: optional copies of the results in a team's tracking server (``tracking:`` in the spec).

The results tree stays the record of an experiment; a tracker only mirrors it. Both modes call the same
two methods, with the committed stage records they have just read (the embedded runner after each stage,
the monitor after each commit), so a tracker is a sync of the records to the server: it logs what it has
not logged yet, which makes it idempotent on resume and lets it catch up after an outage. A tracker never
raises from these calls: a failure is a warning (``on_warning``), the experiment goes on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from slmcl.errors import SpecError

if TYPE_CHECKING:
    from slmcl.config.spec import ExperimentSpec
    from slmcl.protocol.records import StageRecord
    from slmcl.protocol.stages import ResultsTree

__all__ = ["FAILED", "KILLED", "MLFLOW_MISSING", "NullTracker", "Tracker", "check_tracking", "open_tracker"]

# How an experiment that did not complete ended, in the words trackers use (MLflow's run statuses).
FAILED, KILLED = "FAILED", "KILLED"

MLFLOW_MISSING = ("tracking.mlflow: needs the mlflow package, which is not installed "
                  "(pip install 'slmcl[tracking]', or pip install -r requirements-tracking.txt)")

Warn = Callable[[str], None]


class Tracker(Protocol):
    """Where the results are mirrored. Neither method raises: trouble is reported through ``on_warning``."""

    def sync(self, records: Sequence[StageRecord]) -> None:
        """Log every committed stage of ``records`` not logged yet (after a stage commit)."""

    def finished(self, records: Sequence[StageRecord]) -> None:
        """The experiment is complete: log what is left, then the tables, figures and spec; close the runs."""

    def stopped(self, records: Sequence[StageRecord], status: str) -> None:
        """The experiment ended early (``status``: ``FAILED`` or ``KILLED``, as MLflow names them): log the
        committed stages and close the runs with that status, so none is left looking alive. A resume reopens them."""


class NullTracker:
    """No tracking configured: every call does nothing."""

    def sync(self, records: Sequence[StageRecord]) -> None:
        return None

    def finished(self, records: Sequence[StageRecord]) -> None:
        return None

    def stopped(self, records: Sequence[StageRecord], status: str) -> None:
        return None


def mlflow_available() -> bool:
    return importlib.util.find_spec("mlflow") is not None


def check_tracking(spec: ExperimentSpec, missing: str = MLFLOW_MISSING) -> None:
    """Refuse, before anything runs, a spec whose tracker cannot be loaded here (a ``SpecError`` naming the field)."""
    if spec.tracking.mlflow is not None and not mlflow_available():
        raise SpecError(missing)


def open_tracker(spec: ExperimentSpec, tree: ResultsTree, on_warning: Warn, source: str = "",
                 report_dir: Path | None = None) -> Tracker:
    """The tracker of ``spec`` over its results ``tree`` (a ``NullTracker`` when ``tracking`` is empty).

    ``source`` names the results (an output directory, ``experiment:<id>``: a tag of the runs);
    ``report_dir`` is where figures are looked for at the end (``slmcl run`` writes them there).
    Raises ``SpecError`` when a tracker is asked for and its package is missing; nothing touches the network here.
    """
    if spec.tracking.mlflow is None:
        return NullTracker()
    check_tracking(spec)
    from slmcl.tracking.mlflow_logger import MlflowTracker

    return MlflowTracker(spec.tracking.mlflow, spec, tree, on_warning, source=source, report_dir=report_dir)
