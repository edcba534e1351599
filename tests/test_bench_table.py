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


def _round(ref_wall: float, ours_wall: float, bound: float, overhead: float) -> tuple:
    """One round's rows: the recipe and ours over 96 images (steady = wall rate x 1.2), the
    bound, the whole flow."""
    from benchmarks.targets import FLOW_ROW

    ref = Row("reference (Ray recipe)", 96, ref_wall, 96 / ref_wall, 1.2 * 96 / ref_wall)
    ours = Row("ours: detect stage (defaults)", 96, ours_wall, 96 / ours_wall,
               1.2 * 96 / ours_wall, pss=1000 * MIB, store=80 * MIB, store_budget=256 * MIB)
    flow = Row(FLOW_ROW, 96, 30.0, 3.2, 4.0, overhead=overhead, kind="flow")
    return [ref, ours, flow], {96: ref}, bound


MIB = 1 << 20


def test_rounds_take_each_ratio_within_its_round_then_the_median():
    from benchmarks.table import format_summary, summarize

    # Round 2's recipe was slow and so was ours: its ratio is 2.0 however slow both were.
    rounds = [_round(30.0, 20.0, 10.0, 9.0), _round(60.0, 30.0, 10.0, 11.0),
              _round(30.0, 15.0, 10.0, 9.5)]
    summary = {s.pipeline: s for s in summarize(rounds)}
    ours = summary["ours: detect stage (defaults)"]
    assert [round(v, 6) for v in ours.values["x ref wall"]] == [1.5, 2.0, 2.0]
    assert round(ours.median("x ref wall"), 6) == 2.0 and ours.median("wall") == 20.0
    assert [round(v, 3) for v in ours.values["x limit"]] == [0.576, 0.384, 0.768]
    assert summary["ours: whole flow (detectflow run)"].median("overhead") == 9.5
    assert "x ref" not in summary["ours: whole flow (detectflow run)"].values  # no recipe match
    line = next(ln for ln in format_summary(list(summary.values())).splitlines()
                if ln.startswith("ours: detect"))
    assert "2.00 (1.50-2.00)" in line and " 3 " in line
    # An even count: the mean of the middle two.
    assert round(summarize(rounds[:2])[1].median("x ref wall"), 6) == 1.75


def test_targets_are_judged_on_the_medians_per_device():
    from benchmarks.table import summarize
    from benchmarks.targets import check

    rounds = [_round(30.0, 18.0, 5.0, 9.0), _round(30.0, 19.0, 5.0, 10.5),
              _round(30.0, 21.0, 5.0, 9.8)]
    cpu = {v.target: v for v in check(summarize(rounds), "cpu")}
    speed = cpu["ours (defaults) >= 1.5x reference on wall time, 96 images"]
    assert speed.met and speed.value == "1.58x wall, 1.58x steady"  # 30 / 19 s
    assert cpu["ours (defaults) >= 90% of the limit, 96 images"].met  # 6.06 img/s vs 5.0
    assert cpu["whole flow outside detect < 10 s (on its own)"].met  # median 9.8 s
    gpu = {v.target: v for v in check(summarize(rounds), "cuda")}
    assert not gpu["ours (defaults) >= 3x reference on wall time, 96 images"].met
    assert gpu["best setting >= 3x reference on wall time, 96 images"].met is False
    assert gpu["whole flow outside detect < 10 s (on its own)"].met is None  # CPU target only
    slow = {v.target: v for v in check(summarize([_round(30.0, 25.0, 6.0, 10.5)]), "cpu")}
    assert not slow["ours (defaults) >= 90% of the limit, 96 images"].met  # 4.61 vs 6.0
    assert not slow["ours (defaults) >= 1.5x reference on wall time, 96 images"].met
    assert not slow["whole flow outside detect < 10 s (on its own)"].met


def test_memory_is_flat_only_if_pss_holds_and_the_store_keeps_to_its_budget():
    from benchmarks.table import summarize
    from benchmarks.targets import check

    def rows(pss_big: int, store_big: int) -> tuple:
        small = Row("ours: detect stage (defaults)", 96, 10.0, 9.6, 10.0, pss=1000 * MIB,
                    store=85 * MIB, store_budget=256 * MIB)
        big = Row("ours: detect stage (defaults)", 960, 60.0, 16.0, 17.0, pss=pss_big * MIB,
                  store=store_big * MIB, store_budget=256 * MIB)
        return [small, big], {}, None

    def flat(pss_big: int, store_big: int) -> bool:
        (verdict,) = [v for v in check(summarize([rows(pss_big, store_big)]), "cpu")
                      if v.target.startswith("memory flat")]
        return verdict.met

    assert flat(1050, 198) and not flat(1200, 198) and not flat(1050, 845)


def test_a_bound_is_bracketed_around_the_rows_compared_with_it():
    """The bound measured before and after the pipelines: their mean, on the bound's row and on
    every row compared with it; a bound no row uses is not measured again."""
    from benchmarks.run import bracket_bounds

    calls = []

    def again(rates):
        return lambda: calls.append(rates) or list(rates)

    fast, slow = ("fp32", True, True, True), ("fp32", False, False, False)
    bounds = {fast: {"rate": 18.0, "again": [18.0, 18.0], "measure_again": again([16.0, 16.0])},
              slow: {"rate": 14.0, "again": [14.0], "measure_again": again([1.0])}}
    bound_rows = {fast: Row("limit fast", 96, 96 / 18.0, 18.0, 18.0, limit=18.0, kind="bound"),
                  slow: Row("limit slow", 96, 96 / 14.0, 14.0, 14.0, limit=14.0, kind="bound")}
    ours = Row("ours", 960, 60.0, 16.0, 16.2, limit=18.0)
    ref = Row("reference", 960, 120.0, 8.0, 8.1)
    notes: list[str] = []
    bracket_bounds(bounds, bound_rows, [(ref, None), (ours, fast)], notes)
    assert calls == [[16.0, 16.0]]  # the slow bound compares with no row here
    assert ours.limit == 17.0 and bound_rows[fast].steady == 17.0
    assert bound_rows[fast].wall == 96 / 17.0 and bound_rows[slow].limit == 14.0
    assert ref.limit is None and "bound 17.00" in notes[-1]
    assert format_table([ours], {}, None).splitlines()[2].split()[7] == "95%"


def test_a_bound_whose_sweep_picked_another_layout_is_one_row_over_the_rounds():
    from benchmarks.table import summarize

    def bound(layout: str, rate: float) -> tuple:
        row = Row(f"limit (bare model, fp32: {layout})", 96, 96 / rate, rate, rate, limit=rate,
                  kind="bound", group="limit (bare model, fp32)")
        return [row], {}, rate

    (summary,) = summarize([bound("batch 4", 14.0), bound("batch 1", 13.0)])
    assert summary.pipeline == "limit (bare model, fp32)" and summary.values["steady"] == [14.0,
                                                                                          13.0]


def test_set_values_become_options_that_detectflow_run_accepts():
    """The whole-flow rows pass ``--set`` as ``detectflow run`` options: a boolean as its flag,
    since ``--channels-last=True`` is refused."""
    from benchmarks.run import flow_flags
    from detectflow.cli import build_parser

    flags = flow_flags(["batch_size=8", "precision=fp16", "gpu_decode=true",
                        "channels_last=true", "fold_batchnorm=false"])
    assert flags == ["--batch-size=8", "--precision=fp16", "--gpu-decode", "--channels-last",
                     "--no-fold-batchnorm"]
    args = build_parser().parse_args(["run", *flags])
    assert (args.batch_size, args.precision, args.gpu_decode, args.channels_last,
            args.fold_batchnorm) == (8, "fp16", True, True, False)
