"""slmcl: sequential LoRA personalization of small language models, monitored stage by stage.

The light public API (no torch on import):

    from slmcl import load_spec, run_experiment, read_results
    spec = load_spec("examples/demo.yaml")
    out = run_experiment(spec, progress=print)      # imports torch on first call
    res = read_results(out)
    res.matrix(), res.metrics(), res.stability()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from slmcl.config.spec import ExperimentSpec, load_spec, spec_from_dict
from slmcl.errors import DataError, ModelError, NotFoundError, SlmclError, SpecError, TrainingError

if TYPE_CHECKING:
    from pathlib import Path

    from slmcl.protocol.events import Event
    from slmcl.protocol.results import Results

__version__ = "0.1.0"

__all__ = [
    "DataError", "ExperimentSpec", "ModelError", "NotFoundError", "SlmclError", "SpecError", "TrainingError",
    "load_spec", "spec_from_dict", "run_experiment", "read_results", "__version__",
]


def run_experiment(spec: ExperimentSpec, progress: Callable[[Event], None] | None = None) -> Path:
    """Run or resume ``spec`` in this process; ``progress`` receives each ``Event``."""
    from slmcl.protocol.embedded import run_experiment as _run

    return _run(spec, progress)


def read_results(path: Any) -> Results:
    """Read a results directory (written by ``slmcl run`` or ``slmcl results``)."""
    from slmcl.protocol.results import read_results as _read

    return _read(path)
