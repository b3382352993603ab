"""Process set-up: glibc keeps what the process frees (fixed mmap threshold, no trimming).

Its effect (no page-fault storm when a run switches phases, ~700k faults fewer per SmolLM2
run on the 2-core VM) is a timing matter for the benchmark; here: that it takes effect."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = "from slmcl.models.runtime import keep_freed_memory; print(keep_freed_memory(), keep_freed_memory())"


def _probe(**env: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_glibc_accepts_the_settings_once_per_process() -> None:
    assert _probe() == "True True"


def test_opting_out_keeps_glibc_defaults() -> None:
    assert _probe(SLMCL_KEEP_FREED_MEMORY="0") == "False False"
