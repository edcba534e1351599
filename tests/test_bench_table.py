"""The benchmark's table (pure formatting); the benchmark itself never runs in the test suite."""

import os

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


def test_the_bound_and_the_whole_flow_get_no_ratio_to_the_recipe():
    rows = [Row("limit", 96, 8.0, 12.0, 12.0, limit=12.0, kind="bound"),
            Row("reference", 96, 40.0, 2.4, 4.0),
            Row("flow", 96, 50.0, 1.9, 3.0, overhead=15.0, kind="flow")]
    limit, ref, flow = (line.split() for line in format_table(rows, {96: rows[1]}, 12.0)
                        .splitlines()[2:])
    assert limit[5:8] == ["-", "-", "100%"]
    assert ref[5:8] == ["1.00", "1.00", "33%"]
    assert flow[5:8] == ["-", "-", "-"] and flow[-1] == "15.0"


def test_a_row_with_its_own_bound_is_compared_with_it():
    """An fp16 row against the fp16 bare model, not the fp32 one the table defaults to."""
    rows = [Row("fp16", 96, 10.0, 9.0, 12.0, limit=16.0), Row("fp32", 96, 10.0, 9.0, 6.0)]
    fp16, fp32 = format_table(rows, refs={}, limit=8.0).splitlines()[2:]
    assert "75%" in fp16.split() and "75%" in fp32.split()


def test_lever_variants_parse_and_pick_the_bounds_to_measure():
    from benchmarks.run import (
        CPU_UNTUNED,
        GPU_LEVERS,
        model_settings,
        parse_variant,
        setting_label,
        variants,
    )

    assert parse_variant("fp16, batch 16:precision=fp16,batch_size=16") == (
        "fp16, batch 16", {"precision": "fp16", "batch_size": 16})
    gpu = variants("cuda")
    assert gpu[0] == ("defaults", {}) and len(gpu) == 1 + len(GPU_LEVERS)
    assert variants("cpu", ["gpu decode:gpu_decode=true"])[1] == ("gpu decode",
                                                                  {"gpu_decode": True})
    assert model_settings({}, gpu, "cuda") == [
        ("fp32", False, False, False), ("fp32", True, False, False),
        ("fp16", True, False, False), ("fp16", True, True, False)]
    assert model_settings({"precision": "fp16"}, [("x", {"precision": "fp32"})], "cuda") == [
        ("fp16", False, False, False), ("fp32", False, False, False)]
    tuned = model_settings({}, [("x", {"channels_last": True, "gpu_streams": 2}),
                                ("y", {"fold_batchnorm": True})], "cuda")
    assert [setting_label(s) for s in tuned] == ["fp32", "fp32, channels-last",
                                                 "fp32, folded BN"]
    # On CPU the defaults fold and go channels-last; the untuned row gets its own bound.
    untuned = dict(variants("cpu"))[CPU_UNTUNED] if (os.cpu_count() or 1) > 1 else {
        "channels_last": False, "fold_batchnorm": False, "keep_freed_memory": False}
    cpu = [("1 actor", {"cpus_per_actor": 1.0}), (CPU_UNTUNED, untuned)]
    assert [setting_label(s) for s in model_settings({}, cpu, "cpu")] == [
        "fp32, channels-last, folded BN, freed memory kept", "fp32"]
