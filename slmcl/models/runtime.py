"""Process set-up for long-lived slmcl processes (``slmcl run``, the services, the benchmark).

A run alternates phases with different memory shapes: training (activations, gradients),
generation (KV slots), stability (a forward per reference row). With glibc's defaults,
memory freed at the end of a phase goes back to the kernel (heap trimming, and blocks
above the adaptive mmap threshold are unmapped), and the next phase faults it in again,
page by page. On the 2-core VM we measure on, a SmolLM2 run after another workload in the
same process took ~700k page faults and a fifth longer than one after itself; with the
heap kept, ~20k. So the process keeps what it freed: a fixed mmap threshold (32 MiB,
glibc's maximum) and no trimming. Resident memory then stays at the peak of the phases,
which a process dedicated to one experiment or one service can afford.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 32 * 1024 * 1024
_NO_TRIM = 2**31 - 1  # mallopt takes an int: trim only above 2 GiB of free heap top

_done = False


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed memory to the kernel; a no-op elsewhere or with
    ``SLMCL_KEEP_FREED_MEMORY=0``. Returns whether the setting took effect."""
    global _done
    if _done:
        return True
    if os.environ.get("SLMCL_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    ok = bool(mallopt(_M_TRIM_THRESHOLD, _NO_TRIM)) and ok
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    _done = ok
    return ok


def configure_process(threads: str | None = None) -> None:
    """What every long-lived slmcl process does first: keep freed memory, and cap torch's
    CPU threads when asked (``threads``, e.g. ``SLMCL_TORCH_THREADS``: a replica beside
    others on one machine should not oversubscribe its cores)."""
    keep_freed_memory()
    if threads:
        import torch

        torch.set_num_threads(int(threads))
