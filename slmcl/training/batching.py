"""Cutting length-sorted rows into batches with the least padding (pure, no torch).

On a CPU every padded token costs as much as a real one, while each extra forward pass
costs a roughly fixed overhead: a small dynamic program over the sorted lengths picks the
contiguous groups that minimise padded tokens + overhead, under a row and a token cap.
"""

from __future__ import annotations

from collections.abc import Sequence


def length_batches(lengths: Sequence[int], *, max_rows: int, token_budget: int, overhead: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches, longest rows first.

    A batch's cost is rows x its longest row (what padding makes it process) plus
    ``overhead`` token-equivalents; no batch exceeds ``max_rows`` rows or ``token_budget``
    padded tokens (a single longer row still gets a batch of its own).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    sizes = [lengths[i] for i in order]
    n = len(order)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        for j in range(i - 1, -1, -1):
            rows = i - j
            padded = sizes[j] * rows  # group order[j:i] is padded to its longest row, sizes[j]
            if rows > 1 and (rows > max_rows or padded > token_budget):
                break
            cost = best[j] + padded + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    groups: list[list[int]] = []
    i = n
    while i > 0:
        groups.append(order[cut[i]:i])
        i = cut[i]
    return groups[::-1]
