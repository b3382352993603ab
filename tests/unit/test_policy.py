"""The stability policy's decision, on hand-made signals, and its rules as the spec checks them."""

from __future__ import annotations

from pathlib import Path

import pytest

from slmcl.config.spec import PolicyRule, spec_from_dict
from slmcl.errors import SpecError
from slmcl.protocol import policy
from slmcl.protocol.records import TrainedStage
from tests.conftest import tiny_spec_dict

REF = {"kl_to_base_mean": 0.30, "kl_to_base_p95": 0.90, "margin_delta_mean": -0.40}
TASK = {"kl_to_base_mean": 0.05, "kl_to_base_p95": 0.10, "margin_delta_mean": 0.20}


def test_crossings_name_stage_signal_value_threshold_and_action() -> None:
    rules = [PolicyRule(action="alert", kl_mean=0.2), PolicyRule(action="revert", kl_p95=1.0),
             PolicyRule(action="stop", signal="task", kl_mean=0.01, margin_drop=0.1)]
    out = policy.crossings(rules, policy.Signals(reference=REF, task=TASK), stage=3)
    # rule 0: 0.30 > 0.2; rule 1: 0.90 < 1.0; rule 2: task KL 0.05 > 0.01, but its margin rose (no drop)
    assert out == [
        {"stage": 3, "rule": 0, "action": "alert", "signal": "reference", "statistic": "kl_mean", "value": 0.30,
         "threshold": 0.2},
        {"stage": 3, "rule": 2, "action": "stop", "signal": "task", "statistic": "kl_mean", "value": 0.05,
         "threshold": 0.01},
    ]
    assert policy.strongest(out) == "stop"
    assert policy.strongest([]) is None


def test_margin_drop_is_the_fall_of_the_margin() -> None:
    rule = PolicyRule(action="alert", margin_drop=0.35)
    crossed = policy.crossings([rule], policy.Signals(reference=REF), stage=1)
    assert [c["value"] for c in crossed] == [pytest.approx(0.40)]  # margin fell by 0.40 > 0.35
    assert policy.crossings([PolicyRule(action="alert", margin_drop=0.45)], policy.Signals(reference=REF),
                            stage=1) == []


def test_accuracy_drop_against_the_base() -> None:
    rule = PolicyRule(action="revert", accuracy_drop=0.1)
    assert policy.crossings([rule], policy.Signals(reference_accuracy=0.55, base_reference_accuracy=0.70),
                            stage=2)[0]["value"] == pytest.approx(0.15)
    assert policy.crossings([rule], policy.Signals(reference_accuracy=0.65, base_reference_accuracy=0.70),
                            stage=2) == []
    assert policy.crossings([rule], policy.Signals(), stage=2) == []  # not measured: nothing to say


def test_actions_filter_and_what_a_stage_must_measure() -> None:
    rules = [PolicyRule(action="early-stop", kl_mean=0.1), PolicyRule(action="alert", signal="task", kl_p95=0.5)]
    signals = policy.Signals(reference=REF, task={"kl_to_base_p95": 0.6})
    assert [c["rule"] for c in policy.crossings(rules, signals, stage=1, actions=("alert", "stop", "revert"))] == [1]
    assert policy.needs(rules, "task") and not policy.needs(rules, "reference")  # early-stop acts during training
    assert not policy.needs(rules, "accuracy")
    assert policy.needs([PolicyRule(action="stop", accuracy_drop=0.2)], "accuracy")


def test_a_reverted_stage_hands_on_its_own_start() -> None:
    revert = [{"action": "revert"}, {"action": "alert"}]
    t = TrainedStage("r", ["a", "b", "c"], 1, 3, "c", "ckpt", starts_from=1, interventions=revert)
    assert t.action == "revert" and t.start == 1 and t.next_start == 1
    healthy = TrainedStage("r", ["a", "b", "c"], 1, 3, "c", "ckpt", starts_from=1)
    assert healthy.next_start == 3
    old = TrainedStage.from_json(TrainedStage("r", ["a"], 1, 1, "a", "ckpt").to_json().replace(
        '"starts_from": null,', ""))  # a record written before the policy existed
    assert old.start == 0 and old.next_start == 1


def test_describe_says_what_happened() -> None:
    line = policy.describe({"action": "early-stop", "signal": "reference", "statistic": "kl_mean", "value": 0.123456,
                            "threshold": 0.1, "at_step": 4, "kept_step": 3, "total_steps": 9})
    assert line == ("stage ended early: reference kl_mean 0.1235 > 0.1 at optimizer step 4/9, "
                    "weights of step 3 kept")


@pytest.mark.parametrize(("rule", "message"), [
    ({"action": "stop"}, "policy[0]: needs at least one threshold"),
    ({"action": "alert", "signal": "task", "accuracy_drop": 0.1}, "policy[0].accuracy_drop: is measured on the "
                                                                   "reference set"),
    ({"action": "early-stop", "accuracy_drop": 0.1}, "policy[0].accuracy_drop: early-stop checks during training"),
    ({"action": "halt", "kl_mean": 1}, "policy[0].action: must be one of"),
    ({"action": "stop", "kl_mean": -1}, "policy[0].kl_mean: must be > 0"),
])
def test_bad_rules_are_refused_naming_the_field(tmp_path: Path, data_dir: Path, rule: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec_from_dict(tiny_spec_dict(tmp_path, data_dir, tmp_path / "out", policy=[rule]), check_files=False)


def test_task_signal_needs_task_drift(tmp_path: Path, data_dir: Path) -> None:
    raw = tiny_spec_dict(tmp_path, data_dir, tmp_path / "out", policy=[{"action": "stop", "signal": "task",
                                                                        "kl_mean": 0.1}],
                         monitoring={"task_drift_examples": 0})
    with pytest.raises(SpecError, match=r"policy\[0\]\.signal: task drift is off"):
        spec_from_dict(raw, check_files=False)
