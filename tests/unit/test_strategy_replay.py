"""Replay: the stage's data holds the configured share of earlier tasks' rows, the same for a seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmcl.config.spec import spec_from_dict
from slmcl.errors import SpecError
from slmcl.models.engine import Engine
from slmcl.models.loading import load_model
from slmcl.tasks.data import Example
from slmcl.training.strategies import StageContext, get_strategy, validate_strategy_options
from slmcl.training.strategies.replay import replay_count
from tests.conftest import tiny_spec_dict


def _rows(task: str, n: int) -> list[Example]:
    return [Example(i, f"{task} prompt {i}", "A", task_name=task) for i in range(n)]


def _ctx(stage: int, previous: list[str], seed: int = 5) -> StageContext:
    pools = {"a": _rows("a", 40), "b": _rows("b", 10)}
    return StageContext(model=None, run_id="r", seed=seed, stage=stage, task="c", previous_tasks=previous,
                        options={}, n_stages=3, task_examples=lambda name: pools[name])


@pytest.mark.parametrize(("n_new", "share", "added"), [(48, 0.2, 12), (48, 0.5, 48), (10, 0.25, 3), (48, 0.0, 0)])
def test_replayed_rows_make_the_share_of_the_stage(n_new: int, share: float, added: int) -> None:
    assert replay_count(n_new, share) == added
    if added:
        assert added / (n_new + added) == pytest.approx(share, abs=0.5 / (n_new + added))


def test_stage_data_holds_the_share_drawn_from_every_earlier_task() -> None:
    new = _rows("", 48)
    replay = get_strategy("replay", {"share": 0.2})
    mixed = list(replay.stage_examples(_ctx(3, ["a", "b"]), new))
    assert mixed[:48] == new
    old = mixed[48:]
    assert len(old) == 12 and len(mixed) == 60
    assert {r.task_name for r in old} <= {"a", "b"}
    assert len({(r.task_name, r.index) for r in old}) == 12  # drawn without replacement
    # deterministic for (seed, stage); another seed or stage draws other rows
    assert list(replay.stage_examples(_ctx(3, ["a", "b"]), new)) == mixed
    assert list(replay.stage_examples(_ctx(3, ["a", "b"], seed=6), new))[48:] != old
    assert list(replay.stage_examples(_ctx(2, ["a", "b"]), new))[48:] != old


def test_first_stage_and_a_small_pool() -> None:
    replay = get_strategy("replay", {"share": 0.5})
    new = _rows("", 48)
    assert list(replay.stage_examples(_ctx(1, []), new)) == new
    assert len(list(replay.stage_examples(_ctx(2, ["b"]), new))) == 48 + 10  # the whole pool, not more


def test_share_is_validated_at_load() -> None:
    with pytest.raises(SpecError, match=r"strategy\.options\.share: must be in \[0, 1\), got 1\.0"):
        validate_strategy_options("replay", {"share": 1.0})


def test_the_engine_trains_replayed_rows_with_their_own_task(tiny_model_dir: Path, data_dir: Path,
                                                             tmp_path: Path) -> None:
    spec = spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path, strategy={
        "name": "replay", "options": {"share": 0.25}}))
    engine = Engine(spec, loaded=load_model(spec.model, "cpu"))
    engine.start_run(7, spec.strategy, n_stages=2)
    first = engine.train(run_id="r", seed=7, stage=1, task=spec.task("fomc"), previous_tasks=[], n_stages=2)
    second = engine.train(run_id="r", seed=7, stage=2, task=spec.task("numgluecm"), previous_tasks=["fomc"],
                          n_stages=2)
    assert first.examples == 6 and second.examples == 6 + 2  # round(6 * .25 / .75) = 2 rows of fomc
    fomc_row = engine.task_examples("fomc")[0]
    # a replayed row is rendered with FOMC's instruction, not NumGLUE's
    ids = engine.encode([fomc_row])[0]
    text = engine.loaded.tokenizer.decode(ids)
    assert spec.task("fomc").instruction.split()[0] in text
