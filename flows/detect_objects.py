"""The detection DAG on one screen: parameters → five tasks → summary.

list_images [→ skip what <output>/table/ holds] → detect (Ray Data: decode on CPU, infer on an
actor pool) → [evaluate against ground truth] → validate_sample → write_parquet → [export] →
publish_manifest (the commit point) → merge_table → publish_latest (+ a Prefect event).
"""

from dataclasses import asdict

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Failed

from detectflow import storage
from detectflow.announce import published_event
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig, flow_signature, parse_config
from detectflow.errors import DetectflowError
from detectflow.interrupt import noted_in_flow
from detectflow.lease import run_lease
from detectflow.orchestration import (
    LazyRayTaskRunner,
    alive_nodes,
    completed,
    ray_cluster,
    task_options,
    worker_env,
)
from detectflow.preflight import preflight, require_shared_storage
from detectflow.publish import read_manifest
from tasks import (
    detect,
    evaluate,
    export,
    list_images,
    merge_table,
    publish_latest,
    publish_manifest,
    validate_sample,
    write_parquet,
)


@flow(name="detect-objects", task_runner=LazyRayTaskRunner())
@flow_signature  # one keyword parameter per RunConfig field: the UI form is RunConfig's
def detect_objects(**params) -> dict:
    """Detect objects in every image under ``input_uri``; publish ``<output_uri>/<run_id>/``."""
    try:
        with noted_in_flow():  # a stop that lands in a library still ends as interrupted
            return _run(parse_config(**params).with_run_id())
    except DetectflowError as exc:  # a user's mistake: one line, no traceback
        get_run_logger().error("%s", exc)
        return Failed(message=f"{type(exc).__name__}: {exc}")


def _run(cfg: RunConfig) -> dict:
    storage.configure(cfg.s3_endpoint_url)
    spec = preflight(cfg)  # seconds: weights, classes, input and output are all usable
    if notice := spec.unnamed_notice():
        get_run_logger().warning("%s", notice)
    with run_lease(cfg.run_uri, cfg.run_id, wait=cfg.wait):  # one run of a run id at a time
        if manifest := read_manifest(cfg.run_uri):  # re-running a published run changes nothing
            get_run_logger().warning("run %s is already published; nothing to do", cfg.run_id)
            return finish(cfg, manifest)
        return finish(cfg, _detect(cfg, spec))


def _detect(cfg: RunConfig, spec: ModelSpec) -> dict:
    env = worker_env(cfg.s3_endpoint_url)
    with ray_cluster(cfg, env), task_options(env):
        require_shared_storage(cfg, alive_nodes())  # every node must reach input and output
        # Each stage starts when the one before has completed (the DAG is a chain): a failure
        # surfaces as that stage's own error, and one warm Ray worker runs every task.
        listing = completed(list_images.submit(cfg, spec))
        detected = completed(detect.submit(cfg, listing, spec))
        scored = (completed(evaluate.submit(cfg, detected, spec, listing))
                  if cfg.ground_truth else None)
        sample = completed(validate_sample.submit(cfg, detected, spec))
        written = completed(write_parquet.submit(cfg, detected, spec))
        exported = completed(export.submit(cfg, written, spec)) if cfg.exports else None
        return completed(publish_manifest.submit(
            cfg, spec, listing, detected, sample, written, scored, exported
        )).result()


def finish(cfg: RunConfig, manifest: dict):
    """Outputs are written either way; too many unreadable images, or an AP below ``min_map``,
    marks the run Failed, and only a healthy run moves ``latest.json`` and emits the event
    consumers trigger on."""
    failed, images = manifest["counts"]["failed"], manifest["counts"]["images"]
    # An incremental run's share is of every listed image: those skipped were read fine before.
    images += (manifest.get("incremental") or {}).get("skipped", 0)
    if failed > cfg.max_failure_fraction * images:
        return Failed(message=f"{failed} of {images} images failed (more than "
                      f"max_failure_fraction={cfg.max_failure_fraction:g}); outputs are in "
                      f"{cfg.run_uri}", data=manifest)
    ap = (manifest.get("evaluation") or {}).get("metrics", {}).get("AP")
    if cfg.min_map is not None and (ap is None or ap < cfg.min_map):
        return Failed(message=f"AP@[.50:.95] against the ground truth is {ap} (below min_map="
                      f"{cfg.min_map:g}); outputs are in {cfg.run_uri}", data=manifest)
    # Both run here, in the flow process, with retries; the merge is once per run id.
    tabled = merge_table(cfg, manifest) if cfg.table else None
    if latest := publish_latest(cfg, manifest):
        emit_event(**published_event(cfg.output_uri, latest))
    return {**manifest, **({"table": asdict(tabled)} if tabled else {})}
