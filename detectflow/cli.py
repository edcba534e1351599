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
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from detectflow.errors import DetectflowError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detectflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="detect objects in a folder or s3:// prefix of images",
                         description="Detect objects in every image under --input and publish "
                                     "the run under --output.")
    add_config_options(run)
    export = sub.add_parser(
        "export", help="write a published run's detections as COCO, YOLO, Pascal VOC or "
                       "Label Studio files",
        description="Write the detections of a published run in a labelling or training format.")
    export.add_argument("source", metavar="SOURCE",
                        help="A run folder, or an output prefix (its latest.json run); local or "
                             "s3://.")
    export.add_argument("--format", required=True, choices=("coco", "yolo", "voc", "labelstudio"))
    export.add_argument("--out", required=True, metavar="URI", help="Folder or s3:// prefix.")
    export.add_argument("--min-score", type=float, default=0.0, metavar="X",
                        help="Leave out boxes scoring below this. (default: 0)")
    export.add_argument("--only", default="", metavar="A,B",
                        help="Export only these classes (comma-separated names).")
    export.add_argument("--image-root", metavar="URL",
                        help="Label Studio: the URL the input folder is served at; s3:// images "
                             "keep their URI.")
    export.add_argument("--yolo-scores", action="store_true",
                        help="YOLO: a sixth column with each box's score.")
    export.add_argument("--s3-endpoint-url", metavar="TEXT",
                        help="S3-compatible endpoint; empty = AWS_ENDPOINT_URL(_S3) or AWS.")
    return parser


def export_run(args: argparse.Namespace) -> int:
    """``detectflow export``: the run's published Parquet files, streamed into ``--format``."""
    from detectflow import storage
    from detectflow.exports import export
    from detectflow.publish import find_run

    storage.configure(args.s3_endpoint_url)
    run_uri, manifest = find_run(args.source)
    names = manifest["model"].get("classes", {}).get("names")
    if names is None:  # a run published before runs recorded their classes: COCO's
        from detectflow.models import COCO_CATEGORIES

        names = list(COCO_CATEGORIES[1:])
    model = manifest["model"]
    done = export(
        [storage.join(run_uri, f["path"]) for f in manifest["output"]["files"]],
        args.out.rstrip("/"), args.format, categories=["__background__", *names],
        input_uri=manifest["parameters"]["input_uri"],
        model_version=model.get("fingerprint") or model["weights"]["sha256"],
        min_score=args.min_score, only=[n.strip() for n in args.only.split(",") if n.strip()],
        image_root=args.image_root, yolo_scores=args.yolo_scores)
    print(f"exported run {manifest['run_id']}: {done.images} images, {done.boxes} boxes, "
          f"{done.skipped_errors} failed images skipped, {done.renamed} renamed "
          f"({args.format}, {len(done.files)} files) to {args.out}")
    return 0


def config_options() -> list[tuple[str, dict[str, Any], bool]]:
    """(flag, argparse keywords, advanced) for each ``RunConfig`` field: flag, type, choices,
    default and help all come from the field. Options not given are left out of the parsed
    arguments, so the field's own default applies."""
    from detectflow.config import RunConfig, knob

    options = []
    for name, field in RunConfig.model_fields.items():
        meta = knob(field)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": _help(field)}
        base = _without_none(field.annotation)
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(base) is Literal:
            kwargs["choices"] = get_args(base)
            if len(kwargs["choices"]) > 4:  # too long for the usage line: listed in the help
                kwargs.update(metavar="NAME", help=_help(field, kwargs["choices"]))
        elif get_origin(base) is tuple:
            kwargs["metavar"] = "A,B"
            if get_origin(item := get_args(base)[0]) is Literal:
                kwargs["help"] = _help(field, get_args(item), "Any of")
        elif literals := [a for a in get_args(base) if get_origin(a) is Literal]:
            # A torchvision name or one of the user's own: the names are listed, not enforced.
            kwargs.update(metavar="NAME", help=_help(field, get_args(literals[0]),
                                                     "torchvision's"))
        elif base in (int, float):
            kwargs.update(type=base, metavar="N" if base is int else "X")
        else:
            kwargs["metavar"] = "URI" if name.endswith(("_uri", "weights", "classes",
                                                        "ground_truth")) else "TEXT"
        options.append((meta.flag or "--" + name.replace("_", "-"), kwargs, meta.advanced))
    return options


def add_config_options(parser: argparse.ArgumentParser) -> None:
    groups = {False: parser.add_argument_group("run options"),
              True: parser.add_argument_group("advanced options")}
    for flag, kwargs, advanced in config_options():
        groups[advanced].add_argument(flag, **kwargs)


def options_table() -> str:
    """README's table of the options: the same flags and help as ``detectflow run --help``."""
    rows = ["| option | what it does |", "|---|---|"]
    advanced_flags = []
    for flag, kwargs, advanced in config_options():
        if kwargs.get("action") is argparse.BooleanOptionalAction:
            shown = f"--[no-]{flag[2:]}"
        else:
            shown = f"{flag} {kwargs.get('metavar') or '{' + ','.join(kwargs['choices']) + '}'}"
        if advanced:  # the pool, the model's layout, the cluster: named here, told by --help
            advanced_flags.append(f"`{shown}`")
            continue
        what = kwargs["help"].replace("%%", "%").replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{shown}` | {what} |")
    rows.append(f"| advanced | {', '.join(advanced_flags)}: the actor pool, the model's layout "
                "and the cluster; the defaults suit most runs (`detectflow run --help`) |")
    return "\n".join(rows)


def _without_none(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if get_origin(annotation) in (Union, UnionType) and len(args) == 1 \
        else annotation


def _help(field: Any, listed: Sequence[str] = (), listing: str = "One of") -> str:
    """The field's description, its bounds and its default (argparse escapes ``%``)."""
    from detectflow.config import REPO_ROOT

    bounds = [f"{op} {getattr(m, attr)}" for m in field.metadata
              for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if getattr(m, attr, None) is not None]
    default = field.default
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, tuple):
        shown = ",".join(default) or None
    elif isinstance(default, str) and default.startswith(str(REPO_ROOT)):
        shown = os.path.relpath(default, REPO_ROOT)  # the same help on every checkout
    else:
        shown = default
    text = field.description + (f" {listing}: {', '.join(listed)}." if listed else "") \
        + (f" [{', '.join(bounds)}]" if bounds else "")
    return (text + (f" (default: {shown})" if shown is not None else "")).replace("%", "%%")


def format_summary(result: dict[str, Any]) -> str:
    counts = result["counts"]
    lines = [
        f"run {result['run_id']}: {counts['images']} images, {counts['succeeded']} ok, "
        f"{counts['failed']} failed, {counts['detections']} detections",
        f"model {result['model']['name']} (weights {result['model']['weights']['file']}, "
        f"sha256 {result['model']['weights']['sha256'][:12]}…)",
        (f"detect stage: {result['images_per_second']} images/s; " if result[
            "images_per_second"] else "") + "stages (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items()),
    ]
    if inc := result.get("incremental"):
        lines.insert(1, f"incremental: {inc['listed']} listed, {inc['skipped']} already in "
                        f"{inc['table']} (from {len(inc['runs'])} earlier run(s)), "
                        f"{inc['inferred']} detected, {inc['vanished']} no longer listed")
    if (table := result.get("table")) and table["version"] is not None:
        lines.append(f"table: {table['table']} version {table['version']}")
    per_class = list(result["counts"]["per_class"].items())
    if per_class:
        lines.append("detections per class:")
        lines += [f"  {name:<20} {n}" for name, n in per_class[:15]]
        if len(per_class) > 15:
            lines.append(f"  … {len(per_class) - 15} more classes")
    for failure in result["failures"][:5]:
        lines.append(f"failed: {failure['image_uri']}: {failure['error']}")
    if evaluation := result.get("evaluation"):
        m = evaluation["metrics"]
        lines.append(f"accuracy on {evaluation['matched_images']} labelled images: AP "
                     f"{m['AP']}, AP50 {m['AP50']}, AP75 {m['AP75']}, AR@100 {m['AR100']}")
    from detectflow.listing import summarise_skipped  # loaded by the run already

    if skipped := summarise_skipped(result["input"].get("skipped", {})):  # older manifests: none
        lines.append(f"skipped: {skipped}")
    lines.append(f"manifest: {result['run_uri']}/manifest.json")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Parse and check, then start the slow things side by side (benchmarks/RESULTS.md):
    Prefect's API server in a subprocess from the first moment, Ray in the main thread (its
    processes die with the thread that started them) while a thread imports Prefect and the
    flow; the flow starts when all three are ready."""
    from detectflow.gcpause import collection_paused
    from detectflow.interrupt import Interrupted, interrupted

    connected = cfg = stopped = None
    held = contextlib.ExitStack()
    try:
        # The start-up's imports run without cyclic garbage collection (``gcpause``); the flow
        # itself collects as usual.
        with collection_paused():
            from detectflow.config import parse_config

            params = {k: v for k, v in vars(args).items() if k != "command"}
            cfg = parse_config(**params).with_run_id()
            args.run_id = cfg.run_id  # for the line that an interrupted run prints
            from detectflow import workarounds

            server = None
            own_api = not os.environ.get("PREFECT_API_URL")
            if own_api and workarounds.applies("api_server"):
                from detectflow.workarounds.api_server import TemporaryApiServer

                # Held: it imports and builds at once, but opens its database only once the
                # checks below have passed (a run that fails them leaves it untouched).
                server = TemporaryApiServer(held=True)
                # A plain atexit hook runs after Prefect's own exit hooks have sent the last
                # logs and events to this server; stopping it any earlier makes them retry for
                # a minute.
                atexit.register(server.stop)
            from detectflow import raycluster, storage

            # Before anything connects: the API, Ray and S3 endpoints on this machine are
            # reached directly, behind a proxy too (and Ray's processes inherit it).
            os.environ.update(raycluster.loopback_no_proxy(os.environ))
            from detectflow.lease import run_lease
            from detectflow.preflight import model_spec, preflight

            storage.configure(cfg.s3_endpoint_url)
            # Default weights are found through torchvision's model registry (given ones are
            # checked in a subprocess, and this process never needs torch).
            if not cfg.weights and workarounds.applies("torchvision_import"):
                from detectflow.workarounds.torchvision_import import import_torchvision

                import_torchvision()
            # Seconds, not minutes, to learn that weights, input or output are unusable; the
            # weights' check goes on while Prefect is imported, and is waited for before Ray.
            weights = preflight(cfg, wait=False)
            # One run of a run id at a time: the flow (in this process) holds the same lease.
            held.enter_context(run_lease(cfg.run_uri, cfg.run_id, wait=cfg.wait))
            flow = _Background(_import_flow, server)  # Ray is imported by now, Prefect isn't
            model_spec(cfg, weights)
            if server is not None:
                server.release()
            if server is not None or not own_api:
                api_url = server.url if server else os.environ["PREFECT_API_URL"]
                connected = raycluster.connect(
                    cfg.ray_address, raycluster.worker_env(api_url, cfg.s3_endpoint_url),
                    ship_code=cfg.ship_code, dashboard=cfg.ray_dashboard, model=cfg.model)
            # else the plain path: Prefect starts its own temporary server with the flow, and
            # the flow connects Ray once that server's URL is known.
            detect_objects, settings = flow.result()
            if settings is not None:
                server.wait(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
        with settings if settings is not None else contextlib.nullcontext():
            state = detect_objects(**cfg.model_dump(), return_state=True)
    except BaseException as exc:
        # Once stopped, whatever the signal's exception became on its way out (a Ray call it
        # landed in wraps it) means the same thing.
        if (signum := interrupted()) is None:
            raise
        stopped = exc if isinstance(exc, Interrupted) else Interrupted(signum)
    finally:
        if connected is not None:
            raycluster.shutdown()
        held.close()
    # Only now: Ray prints to stderr until it has shut down (e.g. "worker died" for a warm-up
    # task cut short by a run that failed fast), and the outcome must be the last line.
    if stopped is None and interrupted() is not None:  # the flow ended on the signal
        stopped = Interrupted(interrupted())
    if stopped is not None:
        print(interrupted_line(getattr(cfg, "run_id", None)), file=sys.stderr, flush=True)
        return stopped.exit_code
    return report(cfg, state)


def interrupted_line(run_id: str | None) -> str:
    return "detectflow: interrupted" + (
        f"; re-run with --run-id {run_id} to resume" if run_id else "")


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
    can mark a run Crashed when its process dies, and this server dies with the process; and
    Prefect's heartbeat thread sleeps in whole seconds, which the flow waits out at its end.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.detect_objects import detect_objects

    # The server's own URL may be in the environment meanwhile: the main thread puts it there
    # while it starts a local Ray (``raycluster.connect``).
    if server is None or PREFECT_API_URL.value() not in (None, "", server.url):
        if server is not None:
            server.stop()
        return detect_objects, None
    return detect_objects, temporary_settings({PREFECT_API_URL: server.url,
                                               "flows.heartbeat_frequency": None})


def main(argv: Sequence[str] | None = None) -> int:
    # The temporary API server's telemetry heartbeat races the flow for its SQLite database.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without a configured API, Prefect starts a temporary server and waits 20 s for it; a busy
    # 2-core machine can need longer.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    from detectflow.interrupt import Interrupted, stop_on_signals

    # Ctrl-C or SIGTERM stops the run (``interrupt``), at any point of it.
    try:
        last_line = lambda: print(interrupted_line(getattr(args, "run_id", None)),  # noqa: E731
                                  file=sys.stderr)
        with stop_on_signals(on_deadline=last_line):
            return export_run(args) if args.command == "export" else run(args)
    except DetectflowError as exc:
        print(f"detectflow: error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as exc:
        print(interrupted_line(getattr(args, "run_id", None)), file=sys.stderr)
        return getattr(exc, "exit_code", 130)


def entry() -> None:
    """The ``detectflow`` command (and ``python -m detectflow``): ``main``, then a quick exit.

    Once every exit hook has run (Prefect's have sent the last logs, the temporary API server
    is stopped), what is left is the interpreter tearing down torch, Ray and Prefect's modules,
    seconds for nothing (benchmarks/RESULTS.md, lever log). The hook registered first runs
    last, so it can flush and ``os._exit`` with main's code. ``main`` alone (as tests call it)
    exits normally.
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
    if any(isinstance(t, _Background) and t.is_alive() for t in threading.enumerate()):
        # Failed fast while a thread still imports Prefect: none of its hooks has anything to
        # send, and the import, left running into the exit hooks, would print its own error
        # (too late to register one) after the run's last line. The held API server stops on
        # its own once this process is gone.
        exit_now()
    raise SystemExit(code[0])
