"""The benchmark's table (pure formatting); the benchmark itself never runs in the test suite."""

from benchmarks.table import COLUMNS, Row, format_table


def test_table_ratios_use_steady_rates_and_mark_missing_values():
    rows = [Row("reference", 96, 40.0, 2.4, 4.0), Row("ours", 96, 20.0, 4.8, 6.0, 2 << 30),
            Row("ours", 960, 100.0, 9.6, 6.0)]
    text = format_table(rows, refs={96: rows[0]}, limit=8.0)
    header, _, ref, ours, scaled = text.splitlines()
    assert header.split()[0] == "pipeline" and len(ours.split()) == len(COLUMNS)
    assert "1.50" in ours.split() and "75%" in ours.split() and "2,048" in ours.split()
    assert "2.00" in ours.split()  # wall: 4.8 / 2.4
    assert scaled.split()[5:7] == ["-", "-"]  # no reference run over 960 images
    assert ref.split()[-1] == "-"
    md = format_table(rows, refs={96: rows[0]}, limit=8.0, markdown=True).splitlines()
    assert md[0].startswith("| pipeline |") and md[1].count("---") == len(COLUMNS)
