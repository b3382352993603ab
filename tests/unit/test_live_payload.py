"""The dashboard's payload (slmcl.report.live) against numbers worked out by hand.

One model, orders a→b and b→a (one the reverse of the other), one seed, every accuracy and drift value chosen
so that each figure's numbers can be checked on paper: the average accuracies, the matrix cells, the
KL-accuracy points and their Pearson r, the drift trajectories and the losses.
"""

from __future__ import annotations

import json
import math

import pytest

from slmcl.protocol.records import StageRecord
from slmcl.report.live import payload, progress

BASE = {"a": 0.2, "b": 0.4}


def _rec(order: list[str], step: int, acc: dict[str, float] | None, kl: float, losses: tuple[float, ...] = (),
         ent: float = 0.0, margin: float = 0.0) -> StageRecord:
    scores = {t: {"accuracy": v, "correct": round(v * 10), "total": 10, "score_sum": v * 10}
              for t, v in (acc or {}).items()}
    return StageRecord(run_id=f"{'.'.join(order)}-s1", order=order, seed=1, step=step,
                       checkpoint_task="base" if step == 0 else order[step - 1], model="m", scores=scores,
                       stability={"kl_to_base_mean": kl, "entropy_delta_mean": ent, "margin_delta_mean": margin},
                       train={"steps": [{"step": i + 1, "loss": x} for i, x in enumerate(losses)]})


def _records(sparse: bool = False) -> list[StageRecord]:
    ab, ba = ["a", "b"], ["b", "a"]
    return [
        _rec(ab, 0, BASE, 0.0), _rec(ab, 1, {"a": 0.8, "b": 0.3}, 0.5, (2.0, 1.5), ent=0.1, margin=-0.2),
        _rec(ab, 2, {"a": 0.6, "b": 0.9}, 1.0, (1.2, 0.7), ent=0.3, margin=-0.4),
        _rec(ba, 0, BASE, 0.0), _rec(ba, 1, {"a": 0.1, "b": 0.7}, 0.4, (2.5,)),
        _rec(ba, 2, None if sparse else {"a": 0.9, "b": 0.5}, 0.8, (1.0,)),
    ]


def test_average_accuracy_per_step_original_and_reversed() -> None:
    p = payload(_records(), {"orders": [["a", "b"], ["b", "a"]]})
    ab = next(s for s in p["avg_accuracy"] if s["order"] == ["a", "b"])
    ba = next(s for s in p["avg_accuracy"] if s["order"] == ["b", "a"])
    assert (ab["role"], ba["role"]) == ("original", "reversed")
    # (0.2 + 0.4) / 2, (0.8 + 0.3) / 2, (0.6 + 0.9) / 2 and (0.2 + 0.4) / 2, (0.1 + 0.7) / 2, (0.9 + 0.5) / 2
    assert [pt["mean"] for pt in ab["points"]] == pytest.approx([0.3, 0.55, 0.75])
    assert [pt["mean"] for pt in ba["points"]] == pytest.approx([0.3, 0.4, 0.7])
    assert all(pt["std"] is None and pt["n"] == 1 for pt in ab["points"])  # one seed: no std


def test_matrix_rows_follow_the_run_order() -> None:
    p = payload(_records())
    ba = next(m for m in p["matrices"] if m["order"] == ["b", "a"])
    assert ba["tasks"] == ["b", "a"] and ba["run_id"] == "b.a-s1"
    assert [r["label"] for r in ba["rows"]] == ["base", "after b", "after a"]
    assert [r["cells"] for r in ba["rows"]] == [[0.4, 0.2], [0.7, 0.1], [0.5, 0.9]]


def test_kl_accuracy_points_and_pearson_r() -> None:
    p = payload(_records())
    kla = p["kl_accuracy"]
    got = sorted((pt["kl"]["mean"], pt["acc"]["mean"]) for pt in kla["points"])
    # The base once for the model (both runs share it), then the four trained checkpoints.
    expected = sorted([(0.0, 0.3), (0.5, 0.55), (1.0, 0.75), (0.4, 0.4), (0.8, 0.7)])
    assert [v for pt in got for v in pt] == pytest.approx([v for pt in expected for v in pt])
    # x = 0, .5, 1, .4, .8 (mean .54); y = .3, .55, .75, .4, .7 (mean .54):
    # Sxy = .1296 - .0004 + .0966 + .0196 + .0416 = .287; Sxx = .592; Syy = .147
    r = 0.287 / math.sqrt(0.592 * 0.147)
    assert kla["correlation"]["m"]["pearson"] == pytest.approx(r, rel=1e-9)
    assert kla["correlation"]["m"]["points"] == 5 and kla["overall"]["pearson"] == pytest.approx(r, rel=1e-9)
    assert kla["correlation"]["m"]["warning"]  # 5 < 6 points: the report's warning rides along


def test_stability_and_losses() -> None:
    p = payload(_records())
    kl = next(s for s in p["stability"]["kl_to_base_mean"]["series"] if s["order"] == ["a", "b"])
    ent = next(s for s in p["stability"]["entropy_delta_mean"]["series"] if s["order"] == ["a", "b"])
    margin = next(s for s in p["stability"]["margin_delta_mean"]["series"] if s["order"] == ["a", "b"])
    assert [pt["mean"] for pt in kl["points"]] == [0.0, 0.5, 1.0]
    assert [pt["mean"] for pt in ent["points"]] == [0.0, 0.1, 0.3]
    assert [pt["mean"] for pt in margin["points"]] == [0.0, -0.2, -0.4]
    loss = next(run for run in p["loss"] if run["order"] == ["a", "b"])
    assert [(s["step"], s["task"], s["losses"]) for s in loss["stages"]] == [(1, "a", [2.0, 1.5]), (2, "b", [1.2, 0.7])]
    assert p["stages_done"] == 4 and p["records"] == 6


def test_a_stage_not_evaluated_is_no_point_and_no_zero() -> None:
    p = payload(_records(sparse=True))
    ba = next(m for m in p["matrices"] if m["order"] == ["b", "a"])
    assert ba["rows"][2]["cells"] == [None, None]
    avg = next(s for s in p["avg_accuracy"] if s["order"] == ["b", "a"])
    assert [pt["mean"] for pt in avg["points"]] == pytest.approx([0.3, 0.4, None])
    assert (0.8, None) not in [(pt["kl"]["mean"], pt["acc"]["mean"]) for pt in p["kl_accuracy"]["points"]]
    assert p["kl_accuracy"]["correlation"]["m"]["points"] == 4
    # its drift was measured all the same
    kl = next(s for s in p["stability"]["kl_to_base_mean"]["series"] if s["order"] == ["b", "a"])
    assert kl["points"][2]["mean"] == 0.8


def test_payload_is_strict_json_even_with_nan() -> None:
    recs = _records()
    recs[1].stability["kl_to_base_mean"] = float("nan")
    text = json.dumps(payload(recs), allow_nan=False)  # raises on a NaN left in
    assert json.loads(text)["stability"]["kl_to_base_mean"]["series"][0]["points"][1]["mean"] is None


def test_empty_experiment() -> None:
    p = payload([])
    assert p["stages_done"] == 0 and p["matrices"] == [] and p["kl_accuracy"]["points"] == []


def test_progress_folds_training_and_evaluation() -> None:
    events = [
        {"kind": "eval_progress", "run_id": "", "step": 0, "task": "a", "data": {"done": 2, "total": 4}},
        {"kind": "run_started", "run_id": "a.b-s1", "step": 0, "data": {}},
        {"kind": "train_step", "run_id": "a.b-s1", "step": 1, "task": "a",
         "data": {"step": 3, "total_steps": 8, "loss": 1.25}},
        {"kind": "stage_trained", "run_id": "a.b-s1", "step": 1, "task": "a", "data": {"final_loss": 1.0}},
        {"kind": "train_step", "run_id": "a.b-s1", "step": 2, "task": "b",
         "data": {"step": 1, "total_steps": 8, "loss": 2.5}},
        {"kind": "eval_progress", "run_id": "a.b-s1", "step": 1, "task": "a", "data": {"done": 3, "total": 4}},
        {"kind": "eval_progress", "run_id": "a.b-s1", "step": 1, "task": "b", "data": {"done": 1, "total": 4}},
        {"kind": "eval_progress", "run_id": "a.b-s1", "step": 1, "task": "a", "data": {"done": 4, "total": 4}},
        {"kind": "stage_done", "run_id": "a.b-s1", "step": 1, "task": "a", "data": {}},
    ]
    runs = progress(events)
    run = runs["a.b-s1"]
    assert run["state"] == "training"
    assert run["training"] == {"stage": 2, "task": "b", "step": 1, "total_steps": 8, "loss": 2.5}
    # a: 4 of 4 (its latest report), b: 1 of 4
    assert run["evaluation"] == {"stage": 1, "done": 5, "total": 8, "tasks": 2, "committed": True}
    assert run["stages_done"] == [1]
    assert runs[""]["evaluation"] == {"stage": 0, "done": 2, "total": 4, "tasks": 1}
    assert progress([*events, {"kind": "run_done", "run_id": "a.b-s1", "step": 2, "data": {}}])["a.b-s1"][
        "state"] == "done"
