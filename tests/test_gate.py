import math

import pytest

from gen_core.config import GateConfig
from pipelines.common import StageError
from pipelines.registry import decide

QUICK = "quick:1000-vs-eval1000:inception-fp32:clean"
GATE = GateConfig(model_name="m", fid_threshold=50.0, recall_floor=0.1, class_accuracy_floor=0.5)


def candidate(fid: float, recall: float = 0.5, class_accuracy: float = 0.9, protocol_id: str = QUICK) -> dict:
    return {"fid": fid, "recall": recall, "class_accuracy": class_accuracy, "protocol_id": protocol_id}


def champion(fid: float, protocol_id: str | None = QUICK) -> dict:
    return {"version": "3", "fid": fid, "protocol_id": protocol_id}


@pytest.mark.parametrize(
    ("metrics", "champ", "promoted", "reason"),
    [
        (candidate(40.0), None, True, "fid 40.00 <= threshold 50.00, recall 0.500 >= floor 0.100, class_accuracy 0.900 >= floor 0.500, no previous champion"),
        (candidate(50.0), None, True, "fid 50.00 <= threshold 50.00"),  # at the threshold passes
        (candidate(50.01), None, False, "fid 50.01 > threshold 50.00"),
        (candidate(30.0), champion(35.0), True, "better than champion's 35.00"),
        (candidate(35.0), champion(35.0), False, "not better than champion's 35.00"),  # ties keep the champion
        (candidate(40.0), champion(35.0), False, "not better than champion's 35.00"),
        (candidate(math.nan), None, False, "not finite"),
        (candidate(40.0, recall=0.1), None, True, "recall 0.100 >= floor 0.100"),  # at the floor passes
        (candidate(40.0, class_accuracy=0.49), None, False, "class_accuracy 0.490 < floor 0.500"),
    ],
)
def test_gate_decision(metrics, champ, promoted, reason):
    decision = decide(metrics, GATE, champ)
    assert decision.promoted is promoted
    assert reason in decision.reason


def test_a_collapsed_model_is_rejected_however_good_its_fid():
    """Today's champions had recall 0.003 (per-class mode collapse) with FIDs under the threshold."""
    decision = decide(candidate(20.0, recall=0.003), GATE, champion(35.0))
    assert not decision.promoted
    assert decision.reason == "recall 0.003 < floor 0.100"


def test_every_failed_criterion_is_named():
    decision = decide(candidate(80.0, recall=0.003, class_accuracy=0.2), GATE, champion(35.0))
    assert not decision.promoted
    assert decision.reason == (
        "fid 80.00 > threshold 50.00, recall 0.003 < floor 0.100, class_accuracy 0.200 < floor 0.500, "
        "fid 80.00 is not better than champion's 35.00"
    )


@pytest.mark.parametrize("champion_protocol", ["standard:10000-vs-test10000:inception-fp32:clean", None])
def test_the_gate_refuses_to_compare_across_protocols_in_one_line(champion_protocol):
    with pytest.raises(StageError) as err:
        decide(candidate(10.0), GATE, champion(35.0, champion_protocol))
    message = str(err.value)
    assert "\n" not in message and message.startswith("gate: champion v3 was measured under protocol")
    assert QUICK in message and "not comparable" in message


def test_default_gates_reject_the_collapsed_champions_of_the_default_run():
    """The shipped thresholds: the default run's champions (recall 0.003) must not pass either family's gate."""
    from gen_core.config import load_config

    registry = load_config("params.yaml").registry
    for gate in (registry.gan, registry.ldm):
        assert not decide(candidate(gate.fid_threshold / 2, recall=0.003), gate, None).promoted


def version(number: int, fid: float, recall: float = 0.5, class_accuracy: float = 0.9, protocol_id: str = QUICK, revoked: bool = False,
            pinned: str | None = None) -> dict:  # fmt: skip
    return {"version": str(number), "fid": fid, "recall": recall, "class_accuracy": class_accuracy, "protocol_id": protocol_id, "revoked": revoked,
            "pinned": pinned}  # fmt: skip


@pytest.mark.parametrize(
    ("versions", "champ", "expected"),
    [
        ([version(1, 40.0)], None, "1"),
        ([version(1, 40.0), version(2, 30.0)], None, "2"),  # whoever asks, the best passing version
        ([version(1, 40.0), version(2, 30.0)], "1", "2"),
        ([version(1, 40.0), version(2, 30.0)], "2", "2"),  # a stale move to v1 is undone by the next read
        ([version(1, 30.0), version(2, 30.0)], None, "1"),  # ties: the lower version number
        ([version(1, 30.0), version(2, 30.0)], "2", "2"),  # ...but a tie never displaces the champion
        ([version(1, 60.0)], None, None),  # over the threshold: no champion rather than a bad one
        ([version(1, 40.0), version(2, 20.0, recall=0.003)], "1", "1"),  # collapsed: never wins
        ([version(1, 40.0), version(2, 20.0, protocol_id="standard:x")], "1", "1"),  # other protocol: not a candidate
        ([version(1, 40.0), version(2, math.inf)], None, "1"),  # untagged (crashed before tagging): never wins
        ([version(1, 20.0, revoked=True), version(2, 40.0)], "1", "2"),  # a revoked champion is replaced
        ([version(1, 20.0, revoked=True)], "1", "1"),  # ...but never by nothing
        ([version(1, 45.0, recall=0.0), version(2, 49.0)], "1", "2"),  # a champion failing today's gate keeps only what nothing beats
        ([version(1, 90.0, pinned="demo"), version(2, 20.0)], "1", "1"),  # promoted by override: pinned until `promote` runs
        ([version(1, 90.0, pinned="demo"), version(2, 20.0)], "2", "2"),  # ...a pin on a version that is not champion means nothing
    ],
)
def test_converge_names_the_best_passing_version_whoever_asks(versions, champ, expected):
    from pipelines.registry import converge

    assert converge(versions, champ, GATE, QUICK) == expected


def test_a_champion_that_fails_todays_gate_is_replaced_by_any_model_that_passes():
    """Champions crowned before the recall floor existed (recall 0.003) must not block healthy models forever."""
    collapsed = {**champion(20.0), "recall": 0.003, "class_accuracy": 0.9}
    decision = decide(candidate(45.0), GATE, collapsed)
    assert decision.promoted and "champion v3 fails this gate (recall 0.003 < floor 0.100)" in decision.reason
