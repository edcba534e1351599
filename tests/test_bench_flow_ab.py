"""benchmarks.probes.flow_ab's arithmetic: the means, ranges and pair counts its table reports."""

import pytest

from benchmarks.probes.flow_ab import format_table, setting


def test_table_gives_means_ranges_and_pairs_where_b_was_quicker():
    runs = {"a": [{"wall": 20.0, "detect": 11.0, "outside": 9.0},
                  {"wall": 18.0, "detect": 10.0, "outside": 8.0}],
            "b": [{"wall": 19.0, "detect": 9.0, "outside": 10.0},
                  {"wall": 18.5, "detect": 8.0, "outside": 10.5}]}
    table = format_table({"a": "X=0", "b": "X=1"}, runs)
    assert "| 2 | X=0 | 19.00 (18.00-20.00) | 10.50 (10.00-11.00) | 8.50 (8.00-9.00) |" in table
    assert "| 2 | X=1 | 18.75 (18.50-19.00) | 8.50 (8.00-9.00) | 10.25 (10.00-10.50) |" in table
    assert "B - A, wall: mean -0.25 s, B quicker in 1 of 2 pairs" in table
    assert "B - A, detect: mean -2.00 s, B quicker in 2 of 2 pairs" in table
    assert "B - A, outside: mean +1.75 s, B quicker in 0 of 2 pairs" in table


def test_a_setting_is_name_equals_value_and_may_be_empty():
    assert setting("PREFECT_LOGGING_LEVEL=WARNING") == ("PREFECT_LOGGING_LEVEL", "WARNING")
    assert setting("ray_dashboard=") == ("ray_dashboard", "")
    with pytest.raises(SystemExit):
        setting("PREFECT_LOGGING_LEVEL")
