"""The slmcl exception tree.

Every error a user can cause (a bad spec, a malformed dataset, a missing file) is a
``SlmclError``: the CLI prints it as one line and exits non-zero, and the services map it
to a gRPC status code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class SlmclError(Exception):
    """Base of every error slmcl raises on purpose."""


class SpecError(SlmclError, ValueError):
    """An experiment spec is invalid; the message names the field (``lora.rank: must be > 0``)."""


class DataError(SlmclError, ValueError):
    """A dataset file is missing or malformed; the message names the file and row."""


class ModelError(SlmclError):
    """A model or adapter cannot be loaded."""


class TrainingError(SlmclError):
    """Training cannot go on (a non-finite loss, for instance); no checkpoint is published."""


class NotFoundError(SlmclError, LookupError):
    """A run, experiment, checkpoint or results directory does not exist."""


class CancelledError(SlmclError):
    """The caller asked the work to stop (cooperative cancellation through the progress callback)."""


class PermissionDeniedError(SlmclError):
    """A service refuses what a spec asks for (remote code, a model path outside the allowlist); the message
    names the operator setting that would allow it."""


class LimitExceededError(SlmclError):
    """A request is larger than a configured limit (request size, dataset rows, experiments in flight)."""
