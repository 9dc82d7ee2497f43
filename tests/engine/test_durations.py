"""flowchat.durations: durations as flow authors write them, and back."""

import pytest

from flowchat.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1.5s", 1.5), (" 10m ", 600.0), ("24h", 86400.0), ("7d", 604800.0), (3, 3.0)],
)
def test_units_and_plain_seconds_read_as_seconds(written, seconds):
    assert parse_duration(written) == seconds


@pytest.mark.parametrize("written", ["2", "2 weeks", "-1s", "s", "", True, -1, None, [1]])
def test_anything_else_is_refused_with_an_example(written):
    with pytest.raises(ValueError) as caught:
        parse_duration(written)
    assert "500ms" in str(caught.value) or "negative" in str(caught.value)


@pytest.mark.parametrize(
    ("seconds", "written"), [(0.5, "500ms"), (2.0, "2s"), (90.0, "90s"), (600.0, "10m"), (86400.0, "1d")]
)
def test_format_writes_the_largest_whole_unit_and_reads_back(seconds, written):
    assert format_duration(seconds) == written
    assert parse_duration(format_duration(seconds)) == seconds
