"""Publish a run: staged shards → final Parquet files, then the manifest as the commit point.

Order matters for consumers: every data file is complete (atomic write) before the manifest that
lists it exists, and the manifest is written once, atomically, last. A reader that finds
``manifest.json`` can trust every file it names (row counts, sizes and sha256 are in it).
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from detectflow import __version__, storage
from detectflow.schema import published

if TYPE_CHECKING:
    from detectflow.pipeline import DetectStats

MANIFEST = "manifest.json"
DETECTIONS = "detections"
SAMPLES = "samples"
EVALUATION = "evaluation"
STAGING = "_staging"


def run_paths(run_uri: str) -> dict[str, str]:
    """Every location of a run, defined once."""
    return {
        "run": run_uri,
        "manifest": storage.join(run_uri, MANIFEST),
        "detections": storage.join(run_uri, DETECTIONS),
        "samples": storage.join(run_uri, SAMPLES),
        "evaluation": storage.join(run_uri, EVALUATION),
        "staging": storage.join(run_uri, STAGING),
        "listing": storage.join(run_uri, STAGING, "listing"),
        "todo": storage.join(run_uri, STAGING, "todo"),  # incremental: the listing rows to detect
        "staged": storage.join(run_uri, STAGING, "detections"),
    }


def publish_shard(staged_uri: str, target_uri: str, metadata: dict[str, str]) -> dict[str, Any]:
    """Rewrite one staged shard with the published schema (+ run metadata), atomically."""
    fs, path = storage.get_fs(staged_uri)
    with fs.open(path, "rb") as handle:
        table = published(pq.read_table(handle))
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    return {"rows": table.num_rows, **storage.write_parquet(target_uri, table, compression="zstd")}


def publish_shards(staged: list[dict[str, Any]], detections_uri: str, metadata: dict[str, str],
                   workers: int = storage.IO_WORKERS) -> list[dict[str, Any]]:
    """Publish each staged shard as ``detections_uri/part-NNNNN.parquet``; the manifest's file
    entries, in the order of ``staged``. A shard is a read, a re-encode and a write, and a large
    run has thousands: ``workers`` are in flight at once (benchmarks/shards.py)."""
    def one(entry: dict[str, Any]) -> dict[str, Any]:
        name = f"part-{entry['shard']:05d}.parquet"
        target = storage.join(detections_uri, name)
        return {"path": f"{DETECTIONS}/{name}", **publish_shard(entry["uri"], target, metadata)}

    return list(storage.map_concurrently(one, staged, workers))


def installed_version(package: str) -> str:
    """``package.__version__`` without importing the package: read from its ``version.py``,
    which keeps the build tag (``+cu130``, ``+cpu``) that the wheel's metadata may drop."""
    import importlib.util
    import re
    from importlib.metadata import version

    spec = importlib.util.find_spec(package)  # a top-level name: found, not imported
    if spec and spec.origin:
        path = Path(spec.origin).parent / "version.py"
        if path.is_file() and (found := re.search(r"^__version__\s*=\s*['\"]([^'\"]+)",
                                                   path.read_text(), re.M)):
            return found.group(1)
    return version(package)


def versions() -> dict[str, str]:
    """The stack that produced the run. torch's and torchvision's are read, not imported: that
    would cost seconds in a task worker that never needs them."""
    import prefect
    import ray

    return {
        "detectflow": __version__,
        "python": platform.python_version(),
        "torch": installed_version("torch"),
        "torchvision": installed_version("torchvision"),
        "ray": ray.__version__,
        "prefect": prefect.__version__,
        "pyarrow": pa.__version__,
    }


def build_manifest(
    *,
    run_id: str,
    run_uri: str,
    parameters: dict[str, Any],
    weights: dict[str, str],
    classes: dict[str, Any],
    fingerprint: str,
    evaluation: dict[str, Any] | None,
    exports: list[dict[str, Any]],
    input_count: int,
    input_skipped: dict[str, int],
    stats: DetectStats,
    incremental: dict[str, Any] | None = None,
    files: list[dict[str, Any]],
    samples: list[str],
    stage_seconds: dict[str, float],
) -> dict[str, Any]:
    """Pure: the manifest document. Paths inside are relative to the run folder."""
    detect_seconds = stage_seconds.get("detect") or 0.0
    return {
        "manifest_version": 1,
        "run_id": run_id,
        "run_uri": run_uri,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "parameters": parameters,
        "model": {"name": parameters["model"], "weights": weights,
                  "precision": parameters.get("precision", "fp32"), "classes": classes,
                  "fingerprint": fingerprint},
        "resources": asdict(stats.plan) if stats.plan else None,
        "input": {"uri": parameters["input_uri"], "count": input_count,
                  "skipped": input_skipped},
        "output": {
            "format": "parquet",
            "rows": sum(f["rows"] for f in files),
            "files": files,
            "samples": samples,
            **({"exports": exports} if exports else {}),
        },
        "counts": {
            "images": stats.images,
            "succeeded": stats.images - stats.failed,
            "failed": stats.failed,
            "detections": stats.detections,
            "per_class": stats.class_counts(),
        },
        "failures": stats.failures,
        # Listed, skipped (already in <output>/table/), inferred, vanished; runs relied on.
        **({"incremental": incremental} if incremental else {}),
        **({"evaluation": evaluation} if evaluation else {}),
        "resume": {  # what an interrupted earlier attempt of this run id had already staged
            "shards": len(stats.staged),
            "shards_reused": stats.shards_reused,
            "images_reused": stats.images_reused,
            "images_inferred": stats.images_inferred,
        },
        "stage_seconds": {k: round(v, 3) for k, v in stage_seconds.items()},
        # Inference throughput of this attempt: shards reused from an earlier one cost no time.
        "images_per_second": round(stats.images_inferred / detect_seconds,
                                   3) if detect_seconds else None,
        "versions": versions(),
    }


def write_manifest(run_uri: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Publish ``manifest``, create-only: a published manifest never changes (consumers may hold
    its sha256). The manifest now published: this one, or the one that was there already (a
    retried publish whose first attempt got that far)."""
    data = json.dumps(manifest, indent=2, sort_keys=False).encode()
    if storage.create_only_bytes(run_paths(run_uri)["manifest"], data):
        return manifest
    return read_manifest(run_uri)


def read_manifest(run_uri: str) -> dict[str, Any] | None:
    uri = run_paths(run_uri)["manifest"]
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def find_run(source: str) -> tuple[str, dict[str, Any]]:
    """A published run and its manifest: ``source`` is its folder, or an output prefix whose
    ``latest.json`` names it."""
    from detectflow.errors import InputError

    source = source.rstrip("/")
    latest = storage.join(source, "latest.json")
    try:
        if manifest := read_manifest(source):
            return source, manifest
        if storage.exists(latest):
            run_uri = json.loads(storage.read_bytes(latest))["run_uri"]
            if manifest := read_manifest(run_uri):
                return run_uri, manifest
            raise InputError(f"{latest} names {run_uri}, which has no manifest")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read a run at {source}: {storage.explain(exc)}") from None
    raise InputError(f"no published run at {source}: neither manifest.json nor latest.json")
