import math

import pytest

from pipelines.registry import decide


@pytest.mark.parametrize(
    ("fid", "threshold", "champion", "promoted", "reason"),
    [
        (40.0, 50.0, None, True, "fid 40.00 <= threshold 50.00, no previous champion"),
        (50.0, 50.0, None, True, "fid 50.00 <= threshold 50.00"),  # at the threshold passes
        (50.01, 50.0, None, False, "fid 50.01 > threshold 50.00"),
        (30.0, 50.0, 35.0, True, "better than champion's 35.00"),
        (35.0, 50.0, 35.0, False, "not better than champion's 35.00"),  # ties keep the champion
        (40.0, 50.0, 35.0, False, "not better than champion's 35.00"),
        (math.nan, 50.0, None, False, "not finite"),
    ],
)
def test_gate_decision(fid, threshold, champion, promoted, reason):
    decision = decide(fid, threshold, champion)
    assert decision.promoted is promoted
    assert reason in decision.reason
