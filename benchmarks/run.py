"""``make bench``: reference recipe vs ours (detect stage; whole flow on its own and against
long-lived services) vs the bare model's limit.

All runs use the same N images, model and weights, in one process run (one after another, so
they never share the CPUs). Prints one table and writes it, with its notes and the targets'
verdicts, as markdown under ``output/bench/results/`` (``--markdown PATH`` elsewhere): raw
results stay out of the repository; benchmarks/RESULTS.md keeps the current table and method.
``--scale`` adds the detect stage on 10xN images (time should grow 10x, memory stay flat).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.targets import FLOW_ROW, SERVICES_ROW

ROOT = Path(__file__).resolve().parent.parent
SMALL_MODEL = "fasterrcnn_mobilenet_v3_large_320_fpn"
GPU_MODEL = "fasterrcnn_resnet50_fpn_v2"  # the flow's default model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=96, help="images (default 96)")
    p.add_argument("--scale", action="store_true", help="also run the detect stage on 10xN")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default=None,
                   help=f"default: {SMALL_MODEL} on cpu, {GPU_MODEL} (the flow's) on cuda")
    p.add_argument("--weights", default=None,
                   help="default: torchvision's if in the hub cache, else calibrated offline ones")
    p.add_argument("--score-threshold", type=float, default=0.5)
    p.add_argument("--levers-at-scale", action="store_true",
                   help="with --scale: run the lever variants on the 10xN images too")
    p.add_argument("--skip", default="",
                   help="comma list of: limit,reference,detect,flow,services")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="RunConfig field for ours (detect stage and flow), e.g. batch_size=1")
    p.add_argument("--variant", dest="variants", action="append", default=None,
                   metavar="NAME:KEY=VALUE,...",
                   help="an extra detect-stage run with these RunConfig fields (repeatable; "
                        "replaces the built-in levers), e.g. 'fp16:precision=fp16'")
    p.add_argument("--no-variants", action="store_true",
                   help="our detect stage with its defaults only (as changed by --set)")
    p.add_argument("--repeat", type=int, default=1, metavar="K",
                   help="measure everything K times in rounds (each round's ratios against its "
                        "own reference and bound); then medians with their ranges")
    p.add_argument("--cache-dir", default=str(ROOT / "output" / "bench"))
    p.add_argument("--markdown", default=None,
                   help="write the table here (markdown; default: "
                        "CACHE_DIR/results/<UTC time>-<device>-n<N>.md)")
    return p.parse_args(argv)


def pick_weights(model: str, weights: str | None, cache: Path) -> str | None:
    """The user's weights; else torchvision's when present; else calibrated offline weights."""
    from detectflow import models

    if weights:
        return weights
    if models.hub_checkpoint_path(model).exists():  # never try a download from here
        return None
    path = cache / "weights" / f"{model}-calibrated.pth"
    if not path.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from calibrated_weights import write_calibrated_weights

        print(f"bench: making offline calibrated weights {path}", flush=True)
        write_calibrated_weights(model, ROOT / "data" / "sample_images", path)
    return str(path)


def parse_sets(sets: list[str]) -> dict[str, object]:
    import json

    out: dict[str, object] = {}
    for item in sets:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def flow_flags(sets: list[str]) -> list[str]:
    """``--set KEY=VALUE`` items as ``detectflow run`` options, for the whole-flow rows; a
    boolean as its flag (``--gpu-decode``, ``--no-channels-last``), which takes no value."""
    flags = []
    for key, value in parse_sets(sets).items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags.append(f"--{name}={value}")
    return flags


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("bench: --repeat must be at least 1")
    from benchmarks.images import make_images
    from benchmarks.table import format_summary, format_table, summarize
    from benchmarks.targets import check, format_verdicts

    cache = Path(args.cache_dir)
    model = args.model or (GPU_MODEL if args.device == "cuda" else SMALL_MODEL)
    weights = pick_weights(model, args.weights, cache)
    ours = {"model": model, "weights": weights, "score_threshold": args.score_threshold,
            "device": args.device, **parse_sets(args.sets)}
    images = make_images(args.n, cache / "images")
    header = (f"{args.n} images {images.name}, model {model}, weights "
              f"{Path(weights).name if weights else 'torchvision'}, device {args.device}, "
              f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    rounds, markdown = [], []
    for k in range(1, args.repeat + 1):
        title = f"round {k} of {args.repeat}: " if args.repeat > 1 else ""
        notes = [title + header]
        rows, refs, limit_rate = measure_round(args, images, model, weights, ours, cache, notes)
        rounds.append((rows, refs, limit_rate))
        print("\n" + "\n".join(notes) + "\n\n" + format_table(rows, refs, limit_rate),
              flush=True)
        markdown.append("\n".join(f"- {n}" for n in notes) + "\n\n"
                        + format_table(rows, refs, limit_rate, markdown=True))
    summaries = summarize(rounds)
    verdicts = format_verdicts(check(summaries, args.device), args.device, args.repeat)
    if args.repeat > 1:
        title = f"medians over {args.repeat} rounds (min-max); memory: the peak of all rounds"
        print(f"\n{title}\n\n{format_summary(summaries)}", flush=True)
        markdown.append(f"{title}:\n\n{format_summary(summaries, markdown=True)}")
    print("\n" + verdicts, flush=True)
    path = Path(args.markdown) if args.markdown else default_results_path(cache, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(markdown) + f"\n\n```\n{verdicts}\n```\n")
    print(f"bench: results written to {path}", flush=True)
    return 0


def default_results_path(cache: Path, args: argparse.Namespace) -> Path:
    """Where a run's raw results go unless ``--markdown`` says: under the cache, never in git."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ")
    return cache / "results" / f"{stamp}-{args.device}-n{args.n}.md"


def measure_round(args, images: Path, model: str, weights: str | None, ours: dict, cache: Path,
                  notes: list[str]):
    """One round: the bound, the recipe and our detect stage on one local Ray, the whole flow.
    Its rows, the references by image count and the defaults' bound."""
    from benchmarks.table import Row

    skip = {s for s in args.skip.split(",") if s}
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=cache))
    rows: list = []
    limit_rate = None
    refs: dict = {}
    try:
        runs = variants(args.device, [] if args.no_variants else args.variants)
        if args.sets:  # the row says what its "defaults" were changed to
            runs[0] = (f"defaults, {', '.join(args.sets)}", runs[0][1])
        bounds: dict[Setting, dict] = {}  # the bare model per setting: the sweep's result
        bound_rows: dict[Setting, Row] = {}
        if "limit" not in skip:
            from benchmarks.limit import run_limit

            batches = (1, 2, 4, 8, 16) if args.device == "cuda" else (1, 2, 4, 8)
            for setting in model_settings(ours, runs, args.device):
                label = setting_label(setting)
                precision, channels_last, fold, keep_memory = setting
                lim = attempt(notes, f"limit {label}", run_limit, images, model, weights,
                              args.score_threshold, args.device, batch_sizes=batches,
                              sweep_images=min(args.n, 192 if args.device == "cuda" else 96),
                              precision=precision,
                              channels_last=channels_last, fold_batchnorm=fold,
                              keep_freed_memory=keep_memory)
                if lim is None:
                    continue
                bounds[setting] = lim
                notes.append(f"limit ({label}) images/s, sweep: " + "; ".join(
                    f"{b}: {r:.2f}" for b, r in lim["rates"].items()) + "; best measured again: "
                    + ", ".join(f"{r:.2f}" for r in lim["again"]))
                bound_rows[setting] = Row(
                    f"limit (bare model, {label}: {lim['best']})", lim["images"],
                    lim["images"] / lim["rate"], lim["rate"], lim["rate"], lim["peaks"].rss,
                    lim["peaks"].pss, limit=lim["rate"], kind="bound",
                    group=f"limit (bare model, {label})")
                emit(rows, bound_rows[setting])
        if {"reference", "detect"} - skip:
            measured = run_on_ray(args, images, work, model, weights, ours, skip, notes, cache,
                                  runs)
            rows += [row for row, _ in measured]
            refs = {r.images: r for r in rows if r.pipeline.startswith("reference")}
            bracket_bounds(bounds, bound_rows, measured, notes)
        if (default_bound := bound_rows.get(model_setting(ours, args.device))) is not None:
            limit_rate = default_bound.limit
        extra = flow_flags(args.sets)
        flow_args = (images, model, weights, args.score_threshold, args.device, extra)
        if "flow" not in skip:
            flow = attempt(notes, "whole flow", run_flow, work / "flow", cache / "flow-last.log",
                           *flow_args)
            if flow:
                emit(rows, flow_row(FLOW_ROW, flow, notes))
        if "services" not in skip:
            flow = attempt(notes, "whole flow, long-lived services", run_flow,
                           work / "flow-services", cache / "flow-services-last.log", *flow_args,
                           services=True)
            if flow:
                emit(rows, flow_row(SERVICES_ROW, flow, notes))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows, refs, limit_rate


def bracket_bounds(bounds: dict, bound_rows: dict, measured: list, notes: list[str]) -> None:
    """Measure each bound that a pipeline row is compared with again, after those rows, make
    the bound the mean of its runs before and after them, and give each row its bound.

    A round takes ~13 minutes, and this machine's speed drifts within that (the same loop
    moved ±10% within minutes on this 2-core VM): a bound from before the runs alone judged
    a 960-image run made 8 minutes later against a faster or slower machine. Bracketing cancels
    a steady drift either way. A bound that cannot be measured again keeps its first value.
    """
    used = [s for s in bounds if any(setting == s for _, setting in measured)]
    for setting in used:
        lim, label = bounds[setting], setting_label(setting)
        after = attempt(notes, f"limit {label} after the pipelines", lim["measure_again"])
        if not after:
            continue
        runs = [*(lim["again"] or [lim["rate"]]), *after]
        rate = sum(runs) / len(runs)
        notes.append(f"limit ({label}) measured again after the pipelines: "
                     + ", ".join(f"{r:.2f}" for r in after)
                     + f"; bound {rate:.2f} images/s (mean before and after; {lim['rate']:.2f}"
                     " before alone)")
        row = bound_rows[setting]
        row.rate = row.steady = row.limit = rate
        row.wall = row.images / rate
    for row, setting in measured:
        if setting in used:
            row.limit = bound_rows[setting].limit


def run_flow(work: Path, log: Path, images: Path, model: str, weights: str | None,
             threshold: float, device: str, extra: list[str], services: bool = False) -> dict:
    """The whole flow as ``detectflow run``: on its own, or against long-lived services (a
    Prefect server and a Ray head started first, outside the timing)."""
    from benchmarks.ours import run_whole_flow

    if not services:
        return run_whole_flow(images, work, model, weights, threshold, device, extra, log=log)
    from benchmarks.services import long_lived_services

    work.mkdir(parents=True, exist_ok=True)
    with long_lived_services(os.cpu_count() or 1, gpu_count(device), work) as running:
        return run_whole_flow(images, work, model, weights, threshold, device, extra, log=log,
                              services=running)


def gpu_count(device: str) -> int:
    """GPUs the local Ray (or Ray head) is given: all of the machine's on cuda, none on cpu."""
    if device != "cuda":
        return 0
    import torch

    return torch.cuda.device_count()


def flow_row(name: str, flow: dict, notes: list[str]):
    from benchmarks.table import Row

    notes.append(f"{name}: stage seconds " + ", ".join(
        f"{k} {v:.1f}" for k, v in flow["stages"].items()))
    notes.append(f"{name}: timeline (s from process start) " + ", ".join(
        f"{k} {v:.1f}" for k, v in flow["timeline"].items()) + f", exit {flow['wall']:.1f}")
    return Row(name, flow["images"], flow["wall"], flow["images"] / flow["wall"],
               flow["images"] / flow["detect_seconds"], flow["peaks"].rss, flow["peaks"].pss,
               overhead=flow["overhead"], kind="flow")


def emit(rows: list, row) -> None:
    """Keep a row and print it at once: a run cut short still shows what it measured."""
    rows.append(row)
    print(f"bench: {row}", flush=True)


def attempt(notes: list[str], name: str, fn, *args, **kwargs):
    """Run one measurement; a failure is noted and the others still run (one table at the end)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the table's notes
        import traceback

        traceback.print_exc()
        notes.append(f"{name} FAILED: {type(exc).__name__}: {exc}"[:400])
        return None


Setting = tuple[str, bool, bool, bool]


def model_setting(params: dict, device: str) -> Setting:
    """What changes the bare model's own speed, so that each gets its own bound: precision,
    memory layout and folded batch norms (as ``predictor.model_tuning`` resolves them), and a
    CPU process's allocator (``keep_freed_memory``, as the plan resolves it)."""
    from detectflow.config import DEFAULTS
    from detectflow.predictor import model_tuning

    return (params.get("precision", "fp32"),
            *model_tuning(device, params.get("channels_last"), params.get("fold_batchnorm")),
            device == "cpu" and params.get("keep_freed_memory", DEFAULTS["keep_freed_memory"]))


def setting_label(setting: Setting) -> str:
    precision, channels_last, fold, keep_memory = setting
    return (precision + ", channels-last" * channels_last + ", folded BN" * fold
            + ", freed memory kept" * keep_memory)


def model_settings(ours: dict, runs: list[tuple[str, dict]], device: str) -> list[Setting]:
    """The settings the bare model is measured at: ours', then any a variant uses."""
    seen = [model_setting(ours, device)]
    for _, extra in runs:
        if (setting := model_setting({**ours, **extra}, device)) not in seen:
            seen.append(setting)
    return seen


class _Identity:
    def __call__(self, batch):
        return batch


def start_ray_data_helpers() -> None:
    """Run a two-row dataset through an actor pool, untimed, before the first measured row.

    Ray Data starts three helper actors (``_StatsActor``, ``_AutoscalingCoordinatorActor``,
    ``ActorLocationTracker``) with the first actor-pool dataset of a job, and keeps them for the
    job. Those starts cost ~4 CPU-s, ~2 s of wall time on 2 cores. Without this run, whichever
    pipeline ran first (the reference) paid them, and the ones after did not. The whole-flow
    rows still pay them, as a real run does.
    """
    import ray

    ray.data.range(2).map_batches(_Identity, batch_size=None, num_cpus=0,
                                  compute=ray.data.ActorPoolStrategy(size=1)).materialize()


def run_on_ray(args, images: Path, work: Path, model: str, weights: str | None, ours: dict,
               skip: set[str], notes: list[str], cache: Path,
               runs: list[tuple[str, dict]]) -> list:
    """Reference and our detect stage on one local Ray (start-up not timed). Each row with the
    model setting whose bound it is compared with (None: the table's default bound), which
    ``bracket_bounds`` gives it once the bound is final."""
    import ray

    from benchmarks.images import make_images

    rows, settings = [], []
    ray.init(num_cpus=os.cpu_count(), num_gpus=gpu_count(args.device), include_dashboard=False,
             namespace="bench", log_to_driver=False)
    try:
        start_ray_data_helpers()
        if "reference" not in skip:
            from benchmarks.reference import run_reference

            sets = [(images, "reference")]
            if args.scale:
                sets.append((make_images(10 * args.n, cache / "images"), "reference-10x"))
            for folder, name in sets:
                ref = attempt(notes, name, run_reference, folder, work / name, model, weights,
                              args.score_threshold, args.device)
                if ref:
                    emit(rows, _ray_row("reference (Ray recipe)", ref))
                    settings.append(None)
        if "detect" not in skip:
            from benchmarks.ours import run_detect_stage

            # The defaults at N (and 10xN with --scale), then the levers at N (or 10xN).
            (name, extra), levers = runs[0], runs[1:]
            plan = [(name, args.n, images, extra)]
            lever_n, lever_images = args.n, images
            if args.scale:
                big = make_images(10 * args.n, cache / "images")
                plan.append((name, 10 * args.n, big, extra))
                if args.levers_at_scale:
                    lever_n, lever_images = 10 * args.n, big
            plan += [(name, lever_n, lever_images, extra) for name, extra in levers]
            for i, (name, n, folder, extra) in enumerate(plan):
                params = {**ours, **extra}
                det = attempt(notes, f"ours ({name}) {n} images", run_detect_stage, folder,
                              work / f"detect-{i}", **params)
                if det is None:
                    continue
                notes.append(f"ours ({name}) {n} images: {det['plan'].describe()}; "
                             f"{det['detections']} boxes, {det['failed']} failed")
                setting = model_setting(params, args.device)
                emit(rows, _ray_row(f"ours: detect stage ({name})", det))
                settings.append(setting)
    finally:
        ray.shutdown()
    return list(zip(rows, settings))


# The levers measured against the defaults (batch 16 per GPU actor, 2 CUDA streams, fp32, CPU
# decode) on a GPU. Those already settled (batch 4 and 8, fp16 alone, GPU decode alone, 2 actors
# per GPU, cuDNN's benchmark mode) are in benchmarks/RESULTS.md, "Lever log"; --variant
# measures any again.
GPU_LEVERS = (
    "1 stream:gpu_streams=1",
    "3 streams:gpu_streams=3",
    "channels-last:channels_last=true",
    # bf16 matches fp32 too poorly to be worth measuring
    "fp16 + gpu decode, channels-last:precision=fp16,gpu_decode=true,channels_last=true",
    "fp16 + gpu decode, channels-last, 3 streams:"
    "precision=fp16,gpu_decode=true,channels_last=true,gpu_streams=3",
    # Not yet measured on a GPU: batch norms take a sixth of the default model's GPU time
    # (benchmarks/RESULTS.md, "Open on a GPU").
    "fp16 + gpu decode, channels-last, 3 streams, folded BN:"
    "precision=fp16,gpu_decode=true,channels_last=true,gpu_streams=3,fold_batchnorm=true",
)


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:KEY=VALUE,KEY=VALUE' → (NAME, {KEY: VALUE})."""
    name, _, fields = text.partition(":")
    return name.strip(), parse_sets([f for f in fields.split(",") if f])


# On CPU the defaults fold batch norms, use channels-last and keep freed memory in the actors'
# malloc; this row runs the model as built in a process as started.
CPU_UNTUNED = "model as built: batch norms, NCHW, default malloc"


def variants(device: str, given: list[str] | None = None) -> list[tuple[str, dict]]:
    """Our detect stage with its defaults first, then the levers: ``given`` ones, else on a GPU
    ``GPU_LEVERS`` and on CPU what the defaults replaced (one actor using every thread; the
    model as built, without folding or channels-last)."""
    if given is None and device == "cuda":
        given = list(GPU_LEVERS)
    if given is not None:
        return [("defaults", {})] + [parse_variant(v) for v in given]
    if (os.cpu_count() or 1) < 2:
        return [("defaults", {})]
    return [("defaults", {}), ("1 actor, all threads", {"cpus_per_actor": 1.0}),
            (CPU_UNTUNED, {"channels_last": False, "fold_batchnorm": False,
                           "keep_freed_memory": False})]


def _ray_row(name: str, result: dict):
    from benchmarks.table import Row

    clock, peaks = result["clock"], result["peaks"]
    return Row(name, result["images"], clock.wall, result["images"] / clock.wall,
               clock.steady_rate(result["images"]), peaks.rss, peaks.pss, peaks.store,
               peaks.spilled, store_budget=getattr(result.get("plan"), "object_store_bytes", None))


if __name__ == "__main__":
    raise SystemExit(main())
