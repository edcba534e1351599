"""The detection DAG on one screen: parameters → five tasks → summary.

list_images → detect (Ray Data: decode on CPU, infer on an actor pool) → validate_sample
→ write_parquet → publish_manifest (the commit point).
"""

from prefect import flow, get_run_logger

from detectflow.config import (
    DEFAULTS,
    BatchSize,
    CpusPerActor,
    Device,
    GpusPerActor,
    ImageLimit,
    InputUri,
    ModelName,
    NumActors,
    OutputUri,
    RayAddress,
    RunId,
    SampleSize,
    ScoreThreshold,
    WeightsUri,
    parse_config,
)
from detectflow.models import resolve_weights
from detectflow.orchestration import LazyRayTaskRunner, ray_cluster, task_options, worker_env
from detectflow.publish import read_manifest
from tasks import detect, list_images, publish_manifest, validate_sample, write_parquet

D = DEFAULTS


@flow(name="detect-objects", task_runner=LazyRayTaskRunner(), log_prints=True)
def detect_objects(
    input_uri: InputUri = D["input_uri"],
    output_uri: OutputUri = D["output_uri"],
    model: ModelName = D["model"],
    weights: WeightsUri = D["weights"],
    score_threshold: ScoreThreshold = D["score_threshold"],
    batch_size: BatchSize = D["batch_size"],
    limit: ImageLimit = D["limit"],
    run_id: RunId = D["run_id"],
    ray_address: RayAddress = D["ray_address"],
    device: Device = D["device"],
    num_actors: NumActors = D["num_actors"],
    gpus_per_actor: GpusPerActor = D["gpus_per_actor"],
    cpus_per_actor: CpusPerActor = D["cpus_per_actor"],
    sample_size: SampleSize = D["sample_size"],
) -> dict:
    """Detect objects in every image under ``input_uri``; publish ``<output_uri>/<run_id>/``."""
    cfg = parse_config(**locals()).with_run_id()
    if manifest := read_manifest(cfg.run_uri):  # re-running a published run changes nothing
        get_run_logger().warning("run %s is already published; nothing to do", cfg.run_id)
        return manifest
    weights_id = resolve_weights(cfg.model, cfg.weights).as_dict()  # fail fast, before any work
    env = worker_env()
    with ray_cluster(cfg.ray_address, env), task_options(env):
        listing = list_images.submit(cfg)
        detected = detect.submit(cfg, listing)
        sample = validate_sample.submit(cfg, detected)
        written = write_parquet.submit(cfg, detected, weights_id, wait_for=[sample])
        published = publish_manifest.submit(cfg, weights_id, listing, detected, sample, written)
        for stage in (listing, detected, sample, written):
            stage.wait()
            stage.result()  # raises the first failing stage's own error
        return published.result()
