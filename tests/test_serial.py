"""Serial comparison: ordering, deltas, change percentages, new involvement, trend thresholds."""

from datetime import date, datetime

import pytest

from appliance.config import SerialConfig
from appliance.pipeline.serial import ScanPoint, change, compare, trend


def point(key, day, whole, rll=None):
    return ScanPoint(key, datetime(2020, 2, day, 10), {"whole": whole, "RLL": rll if rll is not None else whole})


def test_order_roles_and_changes():
    scans = [point("c", 20, 4.0), point("a", 1, 2.0), point("b", 10, 12.0)]
    out = compare(scans, onset=date(2020, 1, 28))
    assert [e["key"] for e in out] == ["a", "b", "c"]
    assert out[0]["role"] == "baseline" and out[0]["trend"] is None
    assert out[1]["days_since_baseline"] == 9 and out[1]["days_since_onset"] == 13
    assert out[1]["vs_baseline"]["whole"]["delta_pts"] == pytest.approx(10.0)
    assert out[1]["vs_baseline"]["whole"]["change_pct"] == pytest.approx(500.0)
    assert out[1]["trend"] == "progressing"
    assert out[2]["vs_previous"]["whole"]["change_pct"] == pytest.approx(-100 * 8 / 12)
    assert out[2]["vs_baseline"]["whole"]["delta_pts"] == pytest.approx(2.0)
    assert out[2]["trend"] == "improving"


def test_change_undefined_below_involvement_minimum():
    c = change(0.05, 3.0, 0.1)
    assert c["change_pct"] is None and c["new_involvement"] is True and c["delta_pts"] == pytest.approx(2.95)
    assert trend(c, SerialConfig()) == "progressing"
    c = change(0.05, 0.08, 0.1)
    assert c["new_involvement"] is False and trend(c, SerialConfig()) == "stable"


@pytest.mark.parametrize(
    ("earlier", "later", "expected"),
    [(10.0, 12.0, "progressing"), (10.0, 11.9, "stable"), (20.0, 23.0, "stable"),  # +3 pts but +15%
     (10.0, 8.0, "improving"), (20.0, 17.0, "stable"), (1.0, 2.9, "stable")],
)
def test_trend_thresholds(earlier, later, expected):
    assert trend(change(earlier, later, 0.1), SerialConfig()) == expected
