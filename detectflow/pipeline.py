"""The Ray Data detect pipeline: plan resources, stream listing → decode → infer → staged shards.

Results stream back to the caller (they carry no pixels, so they are small) and are written per
listing shard as soon as a shard is complete, under deterministic names. Progress is reported
through a callback, so the Prefect task can log it and move a progress artifact. Re-running a run
id reuses the shards an interrupted run already staged (verified, see ``resume``) and sends only
the other shards' images through Ray Data.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from detectflow import failpoints, listing, resume, storage
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig, fingerprint
from detectflow.errors import ConfigError
from detectflow.predictor import Detector, decode_batch, model_tuning

MAX_LISTED_FAILURES = 1000
DECODE_BATCH = 16
# CPU-only, one machine: at most this many model copies (each one's threads share the rest).
MAX_AUTO_CPU_ACTORS = 8
# Images per inference call when none is given. A GPU runs at 93% of the bare model's best rate
# at 16 and 79% at 4 (H100, benchmarks/RESULTS.md); on CPU larger batches gain nothing.
GPU_BATCH = 16
CPU_BATCH = 4
# Object-store budget of the detect dataset (see object_store_budget).
MIN_STORE_MIB = 256
STORE_MIB_PER_ACTOR = 128


@dataclass(frozen=True)
class ResourcePlan:
    """How the detect stage uses the cluster; logged once and recorded in the manifest.

    ``num_actors`` is the pool's size, or its minimum when ``max_actors`` is larger (Ray Data
    then grows the pool while work queues up, e.g. as an autoscaling cluster adds GPU nodes).
    ``decode_tasks`` is how many decode tasks the CPUs left beside the actors can run at once.
    """

    device: str
    num_actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    decode_cpus: float
    batch_size: int
    cluster_cpus: float
    cluster_gpus: float
    nodes: int = 1
    max_actors: int | None = None
    decode_tasks: int = 1
    object_store_bytes: int | None = None  # Ray Data's budget for this dataset; None: Ray's own
    gpu_decode: bool = False  # plain JPEGs shipped encoded and decoded by the GPU actors
    streams: int = 1  # batches each actor runs at once (GPU actors: one CUDA stream each)
    channels_last: bool = False  # the model's layout and folding (predictor.model_tuning)
    fold_batchnorm: bool = False
    keep_freed_memory: bool = False  # CPU actors' malloc keeps freed memory (allocator.py)

    def describe(self) -> str:
        pool = (f"{self.num_actors}-{self.max_actors}" if self.max_actors != self.num_actors
                else f"{self.num_actors}")
        return (
            f"{self.nodes} node(s), {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU; "
            f"{pool} {self.device} actor(s) x (gpus={self.gpus_per_actor:g}, "
            f"cpus={self.cpus_per_actor:g}), batch {self.batch_size}; "
            f"decode up to {self.decode_tasks} task(s) x {self.decode_cpus:g} CPU"
            + (f"; object store <= {self.object_store_bytes >> 20} MiB"
               if self.object_store_bytes else "")
            + ("; plain JPEGs decoded on the GPU" if self.gpu_decode else "")
            + (f"; {self.streams} batches at once per actor" if self.streams > 1 else "")
            + ("; batch norms folded" if self.fold_batchnorm else "")
            + ("; channels-last" if self.channels_last else "")
            + ("; freed memory kept" if self.keep_freed_memory else "")
        )

    def actor_pool(self):
        """Ray Data's compute strategy for the inference actors: fixed, or min-max."""
        import ray.data

        # Several batches at once per actor need Ray Data's threaded actors: the UDF itself runs
        # concurrently (each thread on its own CUDA stream), not only its input batching.
        streams = ({"max_concurrent_calls_per_actor": self.streams,
                    "enable_true_multi_threading": True} if self.streams > 1 else {})
        if self.max_actors == self.num_actors:
            return ray.data.ActorPoolStrategy(size=self.num_actors, **streams)
        return ray.data.ActorPoolStrategy(min_size=self.num_actors, max_size=self.max_actors,
                                          **streams)


def _pool_bounds(cfg: RunConfig, default: int) -> tuple[int, int]:
    """(min, max) actors: ``num_actors`` fixes the pool; with ``max_actors`` it is the minimum."""
    if cfg.max_actors is None:
        size = cfg.num_actors or default
        return size, size
    low = cfg.num_actors or 1
    if low > cfg.max_actors:
        raise ConfigError(f"num_actors={low} is larger than max_actors={cfg.max_actors}")
    return low, cfg.max_actors


def plan_resources(cfg: RunConfig, cluster: dict[str, float], nodes: int = 1,
                   images: int | None = None) -> ResourcePlan:
    """Pure: size the actor pool and decoding to the cluster found at run time.

    GPU actors (one per ``gpus_per_actor`` of the cluster's GPUs, unless a pool size is given)
    when the cluster has GPUs, else CPU actors: on one machine one per core (up to
    ``MAX_AUTO_CPU_ACTORS``), on a multi-node CPU cluster 1 by default. A pool sized
    automatically has no more actors than ``images`` (those to infer) fill decoded blocks: Ray
    Data hands an actor whole blocks, so an actor beyond them would load a model for nothing.
    Decoding gets the CPUs the actors leave; it must get at least ``decode_cpus``, or the
    pipeline could never make progress.
    """
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if cfg.device == "cuda" and gpus == 0:
        raise ConfigError("device=cuda was requested but the Ray cluster has no GPU")
    gpu = cfg.device != "cpu" and gpus > 0 and cfg.gpus_per_actor > 0
    batch_size = cfg.batch_size or (GPU_BATCH if gpu else CPU_BATCH)
    # A block is DECODE_BATCH images, or a batch where batches are larger (Ray Data bundles
    # blocks up to the batch size before it picks an actor).
    blocks = -(-images // max(DECODE_BATCH, batch_size)) if images else None

    def auto(size: int) -> int:
        return max(1, min(size, blocks or size))

    if gpu:
        low, high = _pool_bounds(cfg, auto(int(gpus // cfg.gpus_per_actor)))
        device, gpus_per_actor, cpus_per_actor = "cuda", cfg.gpus_per_actor, 1.0
    elif cfg.cpus_per_actor is None and cfg.num_actors is None and cfg.max_actors is None \
            and nodes == 1 and cpus > cfg.decode_cpus:
        # One machine, no GPU: small single-threaded models side by side beat one model with
        # every thread (torch's intra-op threads scale poorly; benchmarks/RESULTS.md). Together
        # the actors reserve what decoding leaves, so they never oversubscribe the cores.
        low = high = auto(min(int(cpus), MAX_AUTO_CPU_ACTORS))
        device, gpus_per_actor, cpus_per_actor = "cpu", 0.0, (cpus - cfg.decode_cpus) / low
    else:
        low, high = _pool_bounds(cfg, 1)
        device, gpus_per_actor, cpus_per_actor = "cpu", 0.0, cfg.cpus_per_actor or 1.0
    left = cpus - low * cpus_per_actor
    channels_last, fold_batchnorm = model_tuning(device, cfg.channels_last, cfg.fold_batchnorm)
    if left < cfg.decode_cpus:
        raise ConfigError(
            f"{low} {device} actor(s) x {cpus_per_actor:g} CPU + {cfg.decode_cpus:g} for "
            f"decoding exceed the cluster's {cpus:g} CPUs; lower num_actors or cpus_per_actor"
        )
    return ResourcePlan(
        device, low, gpus_per_actor, cpus_per_actor, cfg.decode_cpus,
        batch_size, cpus, gpus,
        nodes=nodes, max_actors=high, decode_tasks=int(left // cfg.decode_cpus),
        object_store_bytes=object_store_budget(cfg, high, cluster.get("object_store_memory")),
        gpu_decode=cfg.gpu_decode and device == "cuda",
        streams=cfg.gpu_streams if device == "cuda" else 1,
        channels_last=channels_last, fold_batchnorm=fold_batchnorm,
        keep_freed_memory=cfg.keep_freed_memory and device == "cpu",
    )


def object_store_budget(cfg: RunConfig, actors: int, store: float | None) -> int | None:
    """Bytes of Ray's object store the detect dataset may fill.

    Ray Data's default budget is a share of the whole store (GBs on a big node), and decoding is
    far faster than inference, so decoded pixels pile up until that share is full, growing with
    the number of images (benchmarks/RESULTS.md, memory). A budget that keeps a few
    batches ready per actor bounds memory whatever the number of images. Ray Data still runs
    one task at a time when a single block is larger than the budget (a huge image), it never
    stalls. ``object_store_mib`` overrides; 0 leaves Ray's default.
    """
    if cfg.object_store_mib == 0:
        return None
    mib = cfg.object_store_mib or max(MIN_STORE_MIB, STORE_MIB_PER_ACTOR * actors)
    budget = mib << 20
    if store:  # never more than half the store: the rest is for everything else on the node
        budget = min(budget, int(store) // 2)
    return budget


def shard_sizes(images: int, shard_size: int) -> dict[int, int]:
    """Expected row count of every listing shard."""
    full, rest = divmod(images, shard_size)
    sizes = {k: shard_size for k in range(full)}
    if rest:
        sizes[full] = rest
    return sizes


@dataclass
class DetectStats:
    """What the detect stage produced; small enough to pass between Prefect tasks."""

    images: int = 0
    failed: int = 0
    detections: int = 0
    per_class: Counter = field(default_factory=Counter)
    failures: list[dict[str, str]] = field(default_factory=list)
    staged: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    shards_reused: int = 0  # staged by an earlier, interrupted attempt and verified
    images_reused: int = 0
    images_inferred: int = 0  # rows that came out of the inference actors in this attempt
    plan: ResourcePlan | None = None

    def class_counts(self) -> dict[str, int]:
        """Detections per class, most frequent first (ties by name): the manifest's order."""
        return dict(sorted(self.per_class.items(), key=lambda kv: (-kv[1], kv[0])))

    def add(self, table: pa.Table) -> None:
        self.images += table.num_rows
        errors = table.column("error")
        failed_mask = pc.is_valid(errors)
        self.failed += pc.sum(failed_mask).as_py() or 0
        names = pc.list_flatten(table.column("label_names"))
        self.detections += len(names)
        for entry in pc.value_counts(names).to_pylist():
            self.per_class[entry["values"]] += entry["counts"]
        if len(self.failures) < MAX_LISTED_FAILURES:
            bad = table.filter(failed_mask).select(["image_uri", "error"]).to_pylist()
            self.failures.extend(bad[: MAX_LISTED_FAILURES - len(self.failures)])


class ShardWriter:
    """Buffers streamed rows per shard and writes each shard once it is complete.

    Rows are keyed by their listing ``index``: a block that Ray re-executes (after a lost actor,
    say) cannot put an image into the output twice.
    """

    def __init__(self, staging_uri: str, expected: dict[int, int],
                 listing_sha256: dict[int, str] | None = None, key: str = "") -> None:
        self.staging_uri = staging_uri
        self.expected = expected
        self.listing_sha256 = listing_sha256 or {}
        self.key = key
        self.pending: dict[int, list[pa.Table]] = {}
        self.seen: dict[int, set[int]] = {}
        self.counts: Counter = Counter()
        self.written: list[dict[str, Any]] = []

    def reuse(self, entry: dict[str, Any]) -> None:
        """Count a shard staged by an earlier attempt as complete."""
        self.counts[entry["shard"]] = entry["rows"]

    def add(self, table: pa.Table) -> pa.Table:
        """Buffer a batch; returns its rows that were not seen before."""
        fresh = []
        for shard in pc.unique(table.column("shard")).to_pylist():
            part = table.filter(pc.equal(table.column("shard"), shard))
            if self.counts[shard] >= self.expected[shard]:
                continue  # already complete: every row here is a repeat
            seen = self.seen.setdefault(shard, set())
            keep = []
            for index in part.column("index").to_pylist():
                keep.append(index not in seen)
                seen.add(index)
            part = part.filter(pa.array(keep, pa.bool_()))
            fresh.append(part)
            self.pending.setdefault(shard, []).append(part)
            self.counts[shard] += part.num_rows
            if self.counts[shard] >= self.expected[shard]:
                self._write(shard)
        return pa.concat_tables(fresh) if fresh else table.slice(0, 0)

    def _write(self, shard: int) -> None:
        table = pa.concat_tables(self.pending.pop(shard)).sort_by("index")
        del self.seen[shard]
        self.written.append(resume.write_staged(
            self.staging_uri, shard, table, self.listing_sha256.get(shard, ""), self.key))
        failpoints.hit("after-shards", len(self.written))

    def missing(self) -> dict[int, int]:
        return {k: n - self.counts[k] for k, n in self.expected.items() if self.counts[k] != n}


def actor_threads(plan: ResourcePlan) -> int:
    """Torch threads of a CPU actor: its own CPUs plus its share of decoding's.

    Decoding a JPEG costs a few percent of inferring it on CPU, so the CPUs reserved for decoding
    sit mostly idle; measured on 2 cores (benchmarks/RESULTS.md), one actor with 2 threads beat
    one with 1 thread. Never more threads than CPUs in total, so actors don't oversubscribe.
    """
    return max(1, int(plan.cpus_per_actor + plan.decode_cpus / max(1, plan.num_actors)))


def read_listing(batch: pa.Table) -> pa.Table:
    """Ray Data task UDF: listing-shard URIs → their rows.

    The flow wrote these small files and knows their names: a task reads them, where
    ``read_parquet`` would first start a pool of footer-reading actors (new worker processes,
    seconds of CPU on a small machine, before the first image is decoded).
    """
    import pyarrow.parquet as pq

    tables = []
    for uri in batch.column("listing").to_pylist():
        filesystem, path = storage.arrow_fs(uri)
        tables.append(pq.read_table(path, filesystem=filesystem))
    return pa.concat_tables(tables)


def build_dataset(cfg: RunConfig, listing_uris: list[str], plan: ResourcePlan,
                  actor_env: dict[str, Any] | None = None, spec: ModelSpec | None = None):
    """listing shards → decode (CPU tasks) → Detector (actor pool) as a lazy Ray Dataset."""
    import ray.data

    # Small blocks: decode spreads over every CPU even within one listing shard, and results
    # (hence progress) stream back every few images instead of once per shard.
    ds = ray.data.from_items([{"listing": uri} for uri in listing_uris]).map_batches(
        read_listing, batch_size=1, batch_format="pyarrow"
    ).repartition(target_num_rows_per_block=DECODE_BATCH)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"max_side": cfg.max_image_side, "ship_jpeg": plan.gpu_decode,
                   "keep_freed_memory": cfg.keep_freed_memory},
        batch_size=DECODE_BATCH,
        batch_format="pyarrow",
        num_cpus=plan.decode_cpus,
        # Ray Data fuses a task into the next actor pool when their remote args are equal (1 CPU
        # each by default), and decoding would then run serially inside the actors. Stating
        # Ray's default for task workers (reused without limit) makes the args differ, so
        # decoding stays a task pool on its own CPUs, in parallel with inference. Ray 2.60
        # deprecates the remote-args function that used to serve as this barrier.
        max_calls=0,
    )
    ds = ds.map_batches(
        Detector,
        fn_constructor_kwargs={
            "model": cfg.model,
            "weights": cfg.weights,
            "score_threshold": cfg.score_threshold,
            "run_id": cfg.run_id,
            "num_gpus": plan.gpus_per_actor,
            "device": cfg.device,
            "precision": cfg.precision,
            "channels_last": plan.channels_last,
            "fold_batchnorm": plan.fold_batchnorm,
            "keep_freed_memory": plan.keep_freed_memory,
            "cpu_threads": actor_threads(plan),
            **({"num_classes": spec.num_classes, "categories": spec.categories,
                "keep": spec.keep} if spec else {}),
        },
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        compute=plan.actor_pool(),
        num_gpus=plan.gpus_per_actor,
        num_cpus=plan.cpus_per_actor,
        # Ray merges it into the job's, key by key (the caller's start-up shortcuts).
        **({"runtime_env": actor_env} if actor_env else {}),
    )
    # Ray Data's progress bars are drawn for a terminal; from the Ray worker that runs the detect
    # task they reach the user as hundreds of lines of escape codes (373 lines for 96 images,
    # measured), more with every image. The detect task reports progress itself (a log line
    # every 5 s and a Prefect progress artifact). Like the budget below, this changes only this
    # dataset's own copy of the Data context.
    ds.context.enable_progress_bars = False
    if plan.object_store_bytes:
        options = ds.context.execution_options
        options.resource_limits = options.resource_limits.copy(
            object_store_memory=plan.object_store_bytes)
    return ds


def run_detection(
    cfg: RunConfig,
    listing_uri: str,
    staging_uri: str,
    images: int,
    plan: ResourcePlan,
    on_progress: Callable[[int, int, float], None] | None = None,
    spec: ModelSpec | None = None,
    actor_env: dict[str, Any] | None = None,
) -> DetectStats:
    """Execute the pipeline, stream results into staged shards, and count what came out.

    Shards that an earlier attempt of this run id staged and that are still intact and current
    are reused; only the other shards' images are read and inferred.
    """
    shards = listing.read_index(listing_uri)["files"]
    key = fingerprint(cfg, spec.weights.sha256, spec.categories) if spec else fingerprint(cfg)
    writer = ShardWriter(staging_uri, {f["shard"]: f["rows"] for f in shards},
                         {f["shard"]: f["sha256"] for f in shards}, key)
    stats = DetectStats(plan=plan)
    start = time.perf_counter()
    reused, todo = [], []
    for f, found in zip(shards, resume.reusable_shards(staging_uri, shards, key)):
        if found is None:
            todo.append(f["uri"])
            continue
        entry, table = found
        writer.reuse(entry)
        reused.append(entry)
        stats.add(table)
        stats.shards_reused += 1
        stats.images_reused += table.num_rows
    if todo:
        dataset = build_dataset(cfg, todo, plan, actor_env, spec)
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            fresh = writer.add(batch)
            stats.add(fresh)
            stats.images_inferred += fresh.num_rows
            if on_progress:
                on_progress(stats.images, images, time.perf_counter() - start)
    stats.seconds = time.perf_counter() - start
    missing = writer.missing()
    if missing:
        raise RuntimeError(f"detect stage lost rows: shard -> missing count {missing}")
    stats.staged = sorted(reused + writer.written, key=lambda w: w["shard"])
    return stats
