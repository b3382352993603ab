"""Specs across hosts: dataset files travel as content-addressed objects in the store.

The client ships the bytes of every file its spec names; the monitor stores each once
under ``datasets/<sha256>.json`` and rewrites the spec's paths to ``store:`` keys; a
worker fetches (and caches) them back to local files before it touches the spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from service_common.auth import check_model
from service_common.keys import STORE_PREFIX
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import SpecError
from slmcl.protocol.layout import dataset_key
from slmcl.storage.base import ArtifactStore


def spec_paths(spec: ExperimentSpec) -> list[tuple[str, str]]:
    """(field, path) of every dataset file a spec names."""
    out = []
    for i, t in enumerate(spec.tasks):
        out += [(f"tasks[{i}].train_file", t.train_file), (f"tasks[{i}].test_file", t.test_file)]
    out.append(("reference.file", spec.reference.file))
    return out


def map_paths(spec: ExperimentSpec, fn: Callable[[str], str]) -> ExperimentSpec:
    tasks = [dataclasses.replace(t, train_file=fn(t.train_file), test_file=fn(t.test_file)) for t in spec.tasks]
    reference = dataclasses.replace(spec.reference, file=fn(spec.reference.file))
    return dataclasses.replace(spec, tasks=tasks, reference=reference)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def localize(spec: ExperimentSpec, store: ArtifactStore, work_dir: str | Path) -> ExperimentSpec:
    """Replace ``store:`` dataset paths by local cached copies (verified by their hash)."""
    cache = Path(work_dir) / "datasets"
    cache.mkdir(parents=True, exist_ok=True)

    def fetch(path: str) -> str:
        if not path.startswith(STORE_PREFIX):
            return path
        key = path[len(STORE_PREFIX):]
        local = cache / Path(key).name
        if not local.is_file():
            data = store.get_bytes(key)
            fd, tmp = tempfile.mkstemp(dir=cache)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, local)
        return str(local)

    return map_paths(spec, fetch)


def parse_spec_json(text: str) -> ExperimentSpec:
    """The request's spec: JSON of a resolved spec; every error is a SpecError naming the field.

    Every spec that arrives over the wire passes here (the monitor's submit, the evaluator's requests), so the
    model policy of ``service_common.auth`` (no remote code, models from the allowlist) is applied here too.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec_json: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"spec_json: expected a JSON object (a resolved spec), got {type(raw).__name__}")
    spec = spec_from_dict(raw, check_files=False, source="in spec_json")
    for model in spec.models:  # the operator's model policy, whatever the spec asks (PermissionDeniedError)
        check_model(model)
    return spec


__all__ = ["dataset_key", "localize", "map_paths", "parse_spec_json", "sha256_hex", "spec_paths"]
