"""``train_<strategy>`` rows: one stage of each continual-learning strategy beside the study's ``lora``.

Timed is stage 2 (fomc -> scienceqa), where every method does its work: O-LoRA's penalty and
frozen slices, OSF's SVDs (inside the timed call: they are part of a stage's cost), ProCL's
routing and consolidation, replay's extra rows. Each rep starts from the strategy's own stage-1
checkpoint, so the rows compare like with like. In these rows the ``naive`` column is ``lora``'s
stage 2 and ``ours`` the strategy's; ratio = lora/strategy, so a ratio >= 0.67 is "within 1.5x".
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

from slmcl.config.spec import StrategySpec
from slmcl.training.strategies import validate_strategy_options

STRATEGIES = ("olora", "osf", "procl", "replay")


def phase_strategies(b: Any) -> None:  # b: bench.run_bench.Bench
    from bench.run_bench import SEED

    spec = b.make_spec()
    entries = {name: StrategySpec(name=name, options=validate_strategy_options(name, {}))
               for name in ("lora", *STRATEGIES)}
    spec = dataclasses.replace(spec, strategy=entries["lora"], strategies=list(entries.values()))
    b.use(spec)
    first, second = spec.task("fomc"), spec.task("scienceqa")
    n_stages = len(spec.orders[0])
    scratch = Path(tempfile.mkdtemp(dir=b.tmp, prefix="strategies-"))
    stage1: dict[str, Path] = {}

    def train_stage_1(name: str) -> None:
        b.engine.start_run(SEED, entries[name], n_stages=n_stages)
        r = b.engine.train(run_id=f"bench-{name}", seed=SEED, stage=1, task=first, previous_tasks=[],
                           n_stages=n_stages, strategy=entries[name])
        stage1[name] = b.engine.save_checkpoint(scratch / name, strategy_state=r.strategy_state)

    def stage_2(name: str) -> dict[str, Any]:
        b.engine.start_run(SEED, entries[name], n_stages=n_stages)
        state = b.engine.load_checkpoint(stage1[name])
        b.sync()
        t0 = time.perf_counter()
        r = b.engine.train(run_id=f"bench-{name}", seed=SEED, stage=2, task=second, previous_tasks=[first.name],
                           strategy_state=state, n_stages=n_stages, strategy=entries[name])
        b.sync()
        return {"seconds": time.perf_counter() - t0, "examples": r.examples, "params": r.trainable_params}

    t0 = time.perf_counter()
    for name in entries:
        train_stage_1(name)
    b.log(f"strategies: stage-1 checkpoints in {time.perf_counter() - t0:.1f}s")
    for name in STRATEGIES:
        lora, ours = b.interleaved(f"train_{name}", lambda: stage_2("lora"), lambda n=name: stage_2(n))
        b.add(f"train_{name}", "s/stage", [x["seconds"] for x in lora], [x["seconds"] for x in ours], "lower",
              f"stage 2 ({first.name} -> {second.name}), {ours[0]['examples']} examples, "
              f"{ours[0]['params']:,} parameters updated; naive column = lora's stage 2 "
              f"({lora[0]['params']:,}), ratio = lora/{name}")
    b.details["strategies"] = {"n_stages": n_stages}
