"""The monitor's image has no torch (docker/Dockerfile TORCH_FLAVOR=none): everything it runs must work without it.

The monitor validates specs (task kinds, strategy options), aggregates drift rows and writes the
results tree; forward passes happen on the evaluators. This runs those paths in a process where
importing torch, transformers or peft fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, tiny_spec_dict

BLOCKED = ("torch", "transformers", "peft", "accelerate", "safetensors", "gguf")


def test_the_monitor_runs_its_work_without_torch(tmp_path: Path, data_dir: Path) -> None:
    spec = tiny_spec_dict(tmp_path / "model", data_dir, tmp_path / "out",
                          strategy={"name": "l2-anchor", "options": {"weight": 0.5}})
    code = textwrap.dedent(f"""
        import json, sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # `import torch` now raises ImportError
        import monitor_service.__main__, monitor_service.control, monitor_service.server, monitor_service.stages
        from service_common.datasets import parse_spec_json
        from slmcl.config.spec import spec_from_dict
        from slmcl.protocol.drift import DriftRows, summarize_drift
        from slmcl.protocol.layout import run_id
        from slmcl.protocol.records import TrainedStage
        from slmcl.protocol.stages import Measurement, ResultsTree, TaskResult, commit_base, commit_stage
        from slmcl.storage.factory import open_store

        spec = spec_from_dict(json.loads({json.dumps(spec)!r}), check_files=False)
        spec = parse_spec_json(spec.to_json())
        assert spec.strategy.options == {{"weight": 0.5}}
        base = DriftRows(kl_to_base=[0.0, 0.0], entropy=[1.0, 2.0], margin=[0.5, 0.25])
        rows = DriftRows(kl_to_base=[0.1, 0.3], entropy=[1.5, 2.5], margin=[0.25, 0.75])
        tree = ResultsTree(open_store({str(tmp_path / "results")!r}))
        score = {{"accuracy": 0.5, "correct": 1, "total": 2, "score_sum": 1.0}}
        results = [TaskResult(t.name, score, [], 0.0) for t in spec.tasks]
        commit_base(tree, spec, Measurement(results, summarize_drift(base, None), 0.0, 0.0))
        order = spec.orders[0]
        rid = run_id(order, spec.seeds[0])
        trained = TrainedStage(rid, order, spec.seeds[0], 1, order[0], f"checkpoints/{{rid}}/step-1")
        commit_stage(tree, spec, trained, Measurement(results, summarize_drift(rows, base), 0.0, 0.0))
        records = tree.write_tables()
        assert [r.step for r in records] == [0, 1], records
        assert abs(records[1].stability["kl_to_base_mean"] - 0.2) < 1e-12
        assert not [m for m in {BLOCKED!r} if sys.modules.get(m) is not None]
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
