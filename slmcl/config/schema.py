"""The experiment spec's JSON Schema, generated from the spec classes so that it cannot drift.

Editors check and complete a spec file with it (VS Code's YAML extension, JetBrains):
put ``# yaml-language-server: $schema=../docs/spec.schema.json`` (the path relative to the
YAML file) on a spec's first line. The schema lists the registered task kinds and strategies,
so after changing a spec class or adding a kind or a strategy, regenerate the committed copy:

    python -m slmcl.config.schema > docs/spec.schema.json

``tests/unit/test_spec.py`` fails while the committed copy differs from this output.
The schema describes the file as written (``model: embedded`` and bare task names are
allowed); the checks across fields (orders name declared tasks, no duplicate seeds, ...)
and the strategy's options are only checked by ``slmcl validate``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from slmcl.config.spec import _adapter

DIALECT = "https://json-schema.org/draft/2020-12/schema"


def spec_json_schema() -> dict[str, Any]:
    schema = _adapter().json_schema(mode="validation")
    return {
        "$schema": DIALECT,
        "title": "slmcl experiment spec",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def render() -> str:
    """The committed text: stable key order, two-space indent, one trailing newline."""
    return json.dumps(spec_json_schema(), indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
