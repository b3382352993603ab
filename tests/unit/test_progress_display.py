"""The progress display: one evaluation bar per checkpoint, whose tasks are evaluated together."""

from __future__ import annotations

import io

from slmcl.cli.display import ProgressDisplay
from slmcl.protocol.embedded import Event


def test_one_bar_follows_all_tasks_and_shards_of_a_checkpoint() -> None:
    out = io.StringIO()
    with ProgressDisplay(enabled=True, stream=out) as disp:
        for task, total in (("fomc", 8), ("numgluecm", 6)):
            disp(Event("eval_progress", "r-s1", 1, task, {"done": 0, "total": total}))
        assert disp.phase is not None and (disp.phase.n, disp.phase.total) == (0, 14)
        disp(Event("eval_progress", "r-s1", 1, "fomc", {"done": 8, "total": 8}))
        disp(Event("eval_progress", "r-s1", 1, "numgluecm", {"done": 3, "total": 6}))
        assert (disp.phase.n, disp.phase.total) == (11, 14)
        # service mode: a task's shards report separately
        disp(Event("eval_progress", "r-s1", 2, "fomc", {"done": 2, "total": 4, "shard": 0}))
        disp(Event("eval_progress", "r-s1", 2, "fomc", {"done": 1, "total": 4, "shard": 1}))
        assert (disp.phase.n, disp.phase.total) == (3, 8), "a new checkpoint starts a new bar"


def test_base_lines_give_the_shared_time_once() -> None:
    out = io.StringIO()
    with ProgressDisplay(enabled=True, stream=out) as disp:
        for task, correct in (("fomc", 2), ("numgluecm", 1)):
            disp(Event("base_eval", task=task, data={"accuracy": correct / 4, "correct": correct, "total": 4,
                                                     "seconds": 12.5, "evaluated_with": ["fomc", "numgluecm"]}))
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("base")]
    assert lines[0].endswith("(2/4)")
    assert lines[1].endswith("(1/4, 12.5 s for 2 tasks)")
