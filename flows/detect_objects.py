"""The detection DAG on one screen: parameters → five tasks → summary.

list_images → detect (Ray Data: decode on CPU, infer on an actor pool) → validate_sample
→ write_parquet → publish_manifest (the commit point) → publish_latest (+ a Prefect event).
"""

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.states import Failed

from detectflow import config as t
from detectflow import storage
from detectflow.announce import published_event
from detectflow.config import DEFAULTS as D
from detectflow.config import RunConfig, parse_config
from detectflow.errors import DetectflowError
from detectflow.orchestration import (
    LazyRayTaskRunner,
    alive_nodes,
    completed,
    prestart_detectors,
    ray_cluster,
    task_options,
    worker_env,
)
from detectflow.preflight import preflight, require_shared_storage
from detectflow.publish import read_manifest
from tasks import (
    detect,
    list_images,
    publish_latest,
    publish_manifest,
    validate_sample,
    write_parquet,
)


@flow(name="detect-objects", task_runner=LazyRayTaskRunner())
def detect_objects(
    input_uri: t.InputUri = D["input_uri"],
    output_uri: t.OutputUri = D["output_uri"],
    model: t.ModelName = D["model"],
    weights: t.WeightsUri = D["weights"],
    score_threshold: t.ScoreThreshold = D["score_threshold"],
    batch_size: t.BatchSize = D["batch_size"],
    limit: t.ImageLimit = D["limit"],
    extensions: t.Extensions | None = None,
    run_id: t.RunId = D["run_id"],
    ray_address: t.RayAddress = D["ray_address"],
    s3_endpoint_url: t.S3EndpointUrl = D["s3_endpoint_url"],
    device: t.Device = D["device"],
    precision: t.Precision = D["precision"],
    gpu_decode: t.GpuDecode = D["gpu_decode"],
    channels_last: t.ChannelsLast = D["channels_last"],
    fold_batchnorm: t.FoldBatchNorm = D["fold_batchnorm"],
    gpu_streams: t.GpuStreams = D["gpu_streams"],
    keep_freed_memory: t.KeepFreedMemory = D["keep_freed_memory"],
    num_actors: t.NumActors = D["num_actors"],
    max_actors: t.MaxActors = D["max_actors"],
    gpus_per_actor: t.GpusPerActor = D["gpus_per_actor"],
    cpus_per_actor: t.CpusPerActor = D["cpus_per_actor"],
    sample_size: t.SampleSize = D["sample_size"],
    max_failure_fraction: t.FailureFraction = D["max_failure_fraction"],
    shard_size: t.ShardSize = D["shard_size"],
) -> dict:
    """Detect objects in every image under ``input_uri``; publish ``<output_uri>/<run_id>/``."""
    try:
        return _run(parse_config(**locals()).with_run_id())
    except DetectflowError as exc:  # a user's mistake: one line, no traceback
        get_run_logger().error("%s", exc)
        return Failed(message=f"{type(exc).__name__}: {exc}")


def _run(cfg: RunConfig) -> dict:
    storage.configure(cfg.s3_endpoint_url)
    weights_id = preflight(cfg)  # seconds: weights, input and output are all usable
    if manifest := read_manifest(cfg.run_uri):  # re-running a published run changes nothing
        get_run_logger().warning("run %s is already published; nothing to do", cfg.run_id)
        return finish(cfg, manifest)
    env = worker_env(cfg.s3_endpoint_url)
    with ray_cluster(cfg.ray_address, env), task_options(env):
        prestart_detectors(cfg, env)  # the inference actors' workers import torch meanwhile
        require_shared_storage(cfg, alive_nodes())  # every node must reach input and output
        # Each stage starts when the one before has completed (the DAG is a chain): a failure
        # surfaces as that stage's own error, and one warm Ray worker runs every task.
        listing = completed(list_images.submit(cfg))
        detected = completed(detect.submit(cfg, listing, weights_id))
        sample = completed(validate_sample.submit(cfg, detected))
        written = completed(write_parquet.submit(cfg, detected, weights_id))
        manifest = publish_manifest.submit(
            cfg, weights_id, listing, detected, sample, written
        ).result()
    return finish(cfg, manifest)


def finish(cfg: RunConfig, manifest: dict):
    """Outputs are written either way; too many unreadable images marks the run Failed, and only
    a healthy run moves ``latest.json`` and emits the event consumers trigger on."""
    failed, images = manifest["counts"]["failed"], manifest["counts"]["images"]
    if failed > cfg.max_failure_fraction * images:
        return Failed(message=f"{failed} of {images} images failed (more than "
                      f"max_failure_fraction={cfg.max_failure_fraction:g}); outputs are in "
                      f"{cfg.run_uri}", data=manifest)
    if latest := publish_latest(cfg, manifest):  # runs here, in the flow process, with retries
        emit_event(**published_event(cfg.output_uri, latest))
    return manifest
