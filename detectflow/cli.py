"""``detectflow run``: run the flow locally and print a one-screen summary.

Known user errors (bad parameter, missing input, unavailable weights) print one line and exit 2
before Ray starts or the flow runs (Prefect's temporary API server, started first to save time,
is stopped again); the exit code is 0 only when the flow run is Completed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from detectflow.config import DEFAULTS
from detectflow.errors import DetectflowError

D = DEFAULTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detectflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="detect objects in a folder or s3:// prefix of images")
    run.add_argument("--input", dest="input_uri", default=D["input_uri"],
                     help="folder or s3://bucket/prefix (default: bundled sample images)")
    run.add_argument("--output", dest="output_uri", default="output",
                     help="folder or s3:// prefix; the run writes OUTPUT/RUN_ID/")
    run.add_argument("--model", default=D["model"], help=f"torchvision detector (default {D['model']})")
    run.add_argument("--weights", default=None,
                     help=".pth path or s3:// URI (default: torchvision's pretrained weights)")
    run.add_argument("--score-threshold", type=float, default=D["score_threshold"])
    run.add_argument("--batch-size", type=int, default=D["batch_size"],
                     help="images per inference call (default: 16 per GPU actor, 4 on CPU)")
    run.add_argument("--limit", type=int, default=None, help="only the first N images")
    run.add_argument("--extensions", default=",".join(D["extensions"]),
                     help="comma-separated file extensions to include")
    run.add_argument("--run-id", default=None, help="output folder name (default: time-based)")
    run.add_argument("--ray-address", default=None,
                     help="existing Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--s3-endpoint-url", default=None,
                     help="S3-compatible endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    run.add_argument("--device", choices=["auto", "cuda", "cpu"], default=D["device"])
    run.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=D["precision"],
                     help="bf16/fp16: autocast inference (for GPUs; default fp32)")
    run.add_argument("--gpu-decode", action="store_true",
                     help="GPU actors decode plain JPEGs (nvJPEG); decode tasks only read bytes")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                     help="run the model in the channels-last (NHWC) layout "
                          "(default: on for CPU actors, off for GPUs)")
    run.add_argument("--fold-batchnorm", action=argparse.BooleanOptionalAction, default=None,
                     help="fold batch norms into the convolutions before them "
                          "(default: on for CPU actors, off for GPUs)")
    run.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction,
                     default=D["keep_freed_memory"],
                     help="CPU actors and decode tasks keep freed memory for the next batch "
                          "(glibc malloc; default on)")
    run.add_argument("--gpu-streams", type=int, default=D["gpu_streams"],
                     help="batches each GPU actor runs at once, one CUDA stream each (default 2)")
    run.add_argument("--num-actors", type=int, default=None,
                     help="inference actors (default: one per GPU, or 1 on CPU)")
    run.add_argument("--max-actors", type=int, default=None,
                     help="let the actor pool grow from --num-actors (or 1) up to this")
    run.add_argument("--gpus-per-actor", type=float, default=D["gpus_per_actor"])
    run.add_argument("--cpus-per-actor", type=float, default=D["cpus_per_actor"])
    run.add_argument("--sample-size", type=int, default=D["sample_size"])
    run.add_argument("--max-failure-fraction", type=float, default=D["max_failure_fraction"],
                     help="exit non-zero when more than this share of images cannot be read")
    run.add_argument("--shard-size", type=int, default=D["shard_size"],
                     help="images per output file; an interrupted run resumes shard by shard")
    return parser


def format_summary(result: dict[str, Any]) -> str:
    counts = result["counts"]
    lines = [
        f"run {result['run_id']}: {counts['images']} images, {counts['succeeded']} ok, "
        f"{counts['failed']} failed, {counts['detections']} detections",
        f"model {result['model']['name']} (weights {result['model']['weights']['file']}, "
        f"sha256 {result['model']['weights']['sha256'][:12]}…)",
        f"detect stage: {result['images_per_second']} images/s; stages (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items()),
    ]
    per_class = list(result["counts"]["per_class"].items())
    if per_class:
        lines.append("detections per class:")
        lines += [f"  {name:<20} {n}" for name, n in per_class[:15]]
        if len(per_class) > 15:
            lines.append(f"  … {len(per_class) - 15} more classes")
    for failure in result["failures"][:5]:
        lines.append(f"failed: {failure['image_uri']}: {failure['error']}")
    lines.append(f"manifest: {result['run_uri']}/manifest.json")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Parse and check, then start the slow things side by side (benchmarks/RESULTS.md):
    Prefect's API server in a subprocess from the first moment, Ray in the main thread (its
    processes die with the thread that started them) while a thread imports Prefect and the
    flow; the flow starts when all three are ready."""
    from detectflow.gcpause import collection_paused

    connected = None
    try:
        # The start-up's imports run without cyclic garbage collection (``gcpause``); the flow
        # itself collects as usual.
        with collection_paused():
            from detectflow.config import parse_config

            params = {k: v for k, v in vars(args).items() if k != "command"}
            cfg = parse_config(**params).with_run_id()
            server = None
            if not os.environ.get("PREFECT_API_URL"):
                from detectflow.api_server import TemporaryApiServer

                server = TemporaryApiServer()
                # A plain atexit hook runs after Prefect's own exit hooks have sent the last
                # logs and events to this server; stopping it any earlier makes them retry for
                # a minute.
                atexit.register(server.stop)
            from detectflow import raycluster, storage
            from detectflow.preflight import preflight

            storage.configure(cfg.s3_endpoint_url)
            # Seconds, not minutes, to learn that weights, input or output are unusable.
            preflight(cfg)
            flow = _Background(_import_flow, server)  # Ray is imported by now, Prefect isn't
            api_url = server.url if server else os.environ["PREFECT_API_URL"]
            connected = raycluster.connect(cfg.ray_address,
                                           raycluster.worker_env(api_url, cfg.s3_endpoint_url))
            detect_objects, settings = flow.result()
            if settings is not None:
                server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        flow_params = {k: v for k, v in cfg.model_dump().items()
                       if k in detect_objects.parameters.properties}
        with settings if settings is not None else contextlib.nullcontext():
            state = detect_objects(**flow_params, return_state=True)
    finally:
        if connected is not None:
            raycluster.shutdown()
    # Only now: Ray prints to stderr until it has shut down (e.g. "worker died" for a warm-up
    # task cut short by a run that failed fast), and the outcome must be the last line.
    return report(cfg, state)


def report(cfg, state) -> int:
    """Print the outcome; the exit code (0 only for a Completed run)."""
    if not state.is_completed():
        print(f"detectflow: run {cfg.run_id} failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    print(format_summary(result))
    print(result["run_uri"], flush=True)
    return 0


class _Background(threading.Thread):
    """A function run in a thread whose result (or exception) ``result()`` hands back."""

    def __init__(self, fn, *args) -> None:
        super().__init__(daemon=True)
        self._fn, self._args, self._out, self._exc = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self._out = self._fn(*self._args)
        except BaseException as exc:  # re-raised in the caller's thread
            self._exc = exc

    def result(self):
        self.join()
        if self._exc is not None:
            raise self._exc
        return self._out


def _import_flow(server):
    """Thread: import Prefect and the flow. Returns the flow and the settings that point it at
    ``server`` (None when the user's Prefect profile already names an API, which is used).

    Against our own temporary server the flow sends no heartbeats: they exist so that a server
    can mark a run Crashed when its process dies, and this server dies with the process. They
    cost time too: Prefect's heartbeat thread sleeps in whole seconds and the flow joins it at
    the end (0.9 s measured at the end of a run).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.detect_objects import detect_objects

    if server is None or PREFECT_API_URL.value():
        if server is not None:
            server.stop()
        return detect_objects, None
    return detect_objects, temporary_settings({PREFECT_API_URL: server.url,
                                               "flows.heartbeat_frequency": None})


def main(argv: Sequence[str] | None = None) -> int:
    # The temporary API server's telemetry heartbeat races the flow for its SQLite database.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a configured API, Prefect starts a temporary server and waits 20 s for it; a busy
    # 2-core machine can need longer (measured: CI timed out at 20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DetectflowError as exc:
        print(f"detectflow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The ``detectflow`` command (and ``python -m detectflow``): ``main``, then a quick exit.

    Once every exit hook has run (Prefect's have sent the last logs, the temporary API server
    is stopped), what is left is the interpreter tearing down torch, Ray and Prefect's modules:
    measured 2.6 s on 2 cores, for nothing. The hook registered first runs last, so it can
    flush and ``os._exit`` with main's code. ``main`` alone (as tests call it) exits normally.
    """
    import logging

    code: list[int] = []

    def exit_now() -> None:
        if code:  # main returned: nothing is left to do but the teardown
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code[0])

    atexit.register(exit_now)
    code.append(main())
    raise SystemExit(code[0])
