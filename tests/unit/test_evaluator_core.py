"""An evaluator replica's core in process (no gRPC, a folder store): drift rows equal the embedded
Engine's, slots keep Evaluate and Drift apart, and every cache stays within its bound."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from evaluator_service.core import MAX_ADAPTERS_ENV, EvaluatorCore
from service_common.settings import Settings
from slmcl.config.spec import ExperimentSpec, spec_from_dict
from slmcl.errors import SpecError
from slmcl.models.engine import Engine
from slmcl.protocol.drift import summarize_drift
from slmcl.storage.local import LocalStore, put_dir
from tests.conftest import tiny_spec_dict


def make_spec(tiny_model_dir: Path, data_dir: Path, tmp_path: Path, **overrides: Any) -> ExperimentSpec:
    return spec_from_dict(tiny_spec_dict(tiny_model_dir, data_dir, tmp_path / "out", **overrides))


def make_adapter(engine: Engine, out: Path, seed: int, scale: float = 0.5) -> Path:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in engine.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return engine.save_adapter(out)


@pytest.fixture()
def setup(tiny_model_dir: Path, data_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """A store holding two adapters of the tiny model, and the embedded Engine that made them."""
    spec = make_spec(tiny_model_dir, data_dir, tmp_path)
    store = LocalStore(tmp_path / "store")
    engine = Engine(spec)
    prefixes = []
    for seed in (1, 2):
        prefix = f"experiments/e/checkpoints/r/step-{seed}"
        put_dir(store, prefix, make_adapter(engine, tmp_path / f"adapter-{seed}", seed))
        prefixes.append(prefix)
    return {"spec": spec, "store": store, "engine": engine, "prefixes": prefixes,
            "settings": Settings(work_dir=str(tmp_path / "work"), device="cpu")}


def drift(core: EvaluatorCore, spec: ExperimentSpec, prefix: str) -> Any:
    return core.run_drift(core.prepare_drift(experiment_id="e", spec_json=spec.to_json(), checkpoint_prefix=prefix))


def test_replica_drift_equals_the_embedded_engine(setup: dict[str, Any], tmp_path: Path) -> None:
    spec, store, engine, prefixes = setup["spec"], setup["store"], setup["engine"], setup["prefixes"]
    core = EvaluatorCore(setup["settings"], store, "r0")
    base = drift(core, spec, "").rows
    assert base.num_rows == 6 and base.kl_to_base == [0.0] * 6
    assert len(store.list_keys("cache/base-reference-logp")) == 1  # p_0 shared with every replica and the embedded mode

    engine.load_adapter(tmp_path / "adapter-1")
    embedded = engine.drift_rows(LocalStore(tmp_path / "embedded-store"))  # its own p_0, computed here
    served = drift(core, spec, prefixes[0])
    assert served.rows == embedded, "replica and embedded engine must compute identical rows"
    assert min(served.rows.kl_to_base) > 1e-4 and served.seconds > 0
    assert summarize_drift(served.rows, base) == engine.stability().as_dict()
    assert base == engine.drift_rows(base=True)

    other = drift(core, spec, prefixes[1]).rows
    assert other != served.rows
    (resident,) = core._slots[0].engines.values()
    forwards = resident.forward_passes
    assert drift(core, spec, prefixes[0]).rows == served.rows  # p_0 from memory: one forward per row, no more
    assert resident.forward_passes == forwards + 6
    assert core.requests_served == 4


def test_slots_keep_evaluate_and_drift_apart(setup: dict[str, Any], tmp_path: Path) -> None:
    spec, store, engine, prefixes = setup["spec"], setup["store"], setup["engine"], setup["prefixes"]
    core = EvaluatorCore(setup["settings"], store, "r0", capacity=2)
    assert core.capacity == 2 and len(core._slots) == 2

    def evaluate(prefix: str) -> Any:
        job = core.prepare(experiment_id="e", spec_json=spec.to_json(), task="fomc", shard_index=0, shard_count=0,
                           checkpoint_prefix=prefix)
        return core.run(job).evaluation

    engine.load_adapter(tmp_path / "adapter-1")
    want_eval = engine.evaluate(spec.task("fomc"))
    engine.load_adapter(tmp_path / "adapter-2")
    want_drift = engine.drift_rows()

    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def worker(name: str, fn: Any) -> None:
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test below
            errors.append(exc)

    for _ in range(2):  # the second round finds both slots warm, with the other request's adapter
        threads = [threading.Thread(target=worker, args=("eval", lambda: evaluate(prefixes[0]))),
                   threading.Thread(target=worker, args=("drift", lambda: drift(core, spec, prefixes[1]).rows))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [p.as_dict() for p in results["eval"].predictions] == [p.as_dict() for p in want_eval.predictions]
        assert results["drift"] == want_drift
    assert core.resident_models() == [str(spec.model.name)]  # two slots, one model name


def test_adapter_folders_are_bounded(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    spec, store, prefixes = setup["spec"], setup["store"], setup["prefixes"]
    monkeypatch.setenv(MAX_ADAPTERS_ENV, "1")
    core = EvaluatorCore(setup["settings"], store, "r0")
    work = Path(setup["settings"].work_dir) / "adapters"
    first = drift(core, spec, prefixes[0]).rows
    assert (work / prefixes[0] / "adapter_model.safetensors").is_file()
    drift(core, spec, prefixes[1])
    assert core.cached_adapters == [prefixes[1]]
    assert not (work / prefixes[0]).exists(), "the least recently used adapter folder is removed"
    assert drift(core, spec, prefixes[0]).rows == first  # fetched again
    # A new life of the replica counts the folders it finds against the same bound.
    again = EvaluatorCore(setup["settings"], store, "r1")
    assert again.cached_adapters == [prefixes[0]]


def test_p0_and_models_are_bounded(setup: dict[str, Any], tiny_model_dir: Path, data_dir: Path,
                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = setup["store"]
    monkeypatch.setenv("SLMCL_EVAL_P0_CACHE_MB", "0")  # nothing kept beyond the entry in use
    core = EvaluatorCore(setup["settings"], store, "r0")
    three = make_spec(tiny_model_dir, data_dir, tmp_path, reference={"max_examples": 3})
    four = make_spec(tiny_model_dir, data_dir, tmp_path, reference={"max_examples": 4})
    assert drift(core, three, "").rows.num_rows == 3
    assert drift(core, four, "").rows.num_rows == 4
    assert len(core.p0_cache) == 1
    other_lora = make_spec(tiny_model_dir, data_dir, tmp_path, lora={"rank": 2})
    drift(core, other_lora, "")
    assert len(core._slots[0].engines) == 1  # SLMCL_EVAL_MAX_RESIDENT=1: the first model was evicted


def test_bad_settings_name_the_variable(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLMCL_EVALUATOR_CAPACITY", "0")
    with pytest.raises(SpecError, match="SLMCL_EVALUATOR_CAPACITY"):
        EvaluatorCore(setup["settings"], setup["store"], "r0")
    monkeypatch.setenv("SLMCL_EVALUATOR_CAPACITY", "two")
    with pytest.raises(SpecError, match="SLMCL_EVALUATOR_CAPACITY: expected an integer"):
        EvaluatorCore(setup["settings"], setup["store"], "r0")
