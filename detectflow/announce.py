"""Tell consumers that a run is published: the output root's ``latest.json`` and a Prefect event.

Both happen only after the manifest (the commit point) is written and the run passed its failure
check, so a consumer that follows either one always finds a complete run. The pointer only moves
forward: a run that finishes after a newer one was published leaves it alone.
"""

from __future__ import annotations

import json
from typing import Any

from detectflow import storage
from detectflow.publish import run_paths

LATEST = "latest.json"
PUBLISHED_EVENT = "detectflow.manifest.published"


def latest_uri(output_uri: str) -> str:
    return storage.join(output_uri, LATEST)


def read_latest(output_uri: str) -> dict[str, Any] | None:
    uri = latest_uri(output_uri)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def pointer(manifest: dict[str, Any], manifest_sha256: str | None = None) -> dict[str, Any]:
    """What ``latest.json`` says: enough to find and verify the run without listing anything."""
    counts = manifest["counts"]
    return {
        "run_id": manifest["run_id"],
        "run_uri": manifest["run_uri"],
        "manifest_uri": run_paths(manifest["run_uri"])["manifest"],
        "manifest_sha256": manifest_sha256,
        "created_at": manifest["created_at"],
        "images": counts["images"],
        "failed": counts["failed"],
        "detections": counts["detections"],
    }


def is_newer(candidate: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Pure: does ``candidate`` replace ``current``? Newest ``created_at`` wins, run id breaks ties;
    the same run is not "newer", so re-publishing it is a no-op."""
    if current is None:
        return True
    key = (candidate["created_at"], candidate["run_id"])
    return key > (current.get("created_at", ""), current.get("run_id", ""))


def update_latest(output_uri: str, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Point ``latest.json`` at this run when it is the newest; returns the pointer if it moved.

    The file is replaced atomically (rename locally, one PUT on S3), so readers never see half of it.
    """
    manifest_uri = run_paths(manifest["run_uri"])["manifest"]
    new = pointer(manifest, storage.sha256_bytes(storage.read_bytes(manifest_uri)))
    if not is_newer(new, read_latest(output_uri)):
        return None
    storage.atomic_write_bytes(latest_uri(output_uri), json.dumps(new, indent=2).encode())
    return new


def published_event(output_uri: str, latest: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``prefect.events.emit_event``: the resource is the dataset (the output
    root), so an automation can trigger on "new data under s3://bucket/prefix"."""
    return {
        "event": PUBLISHED_EVENT,
        "resource": {
            "prefect.resource.id": f"detectflow.dataset.{output_uri}",
            "prefect.resource.name": output_uri,
            "detectflow.run-id": latest["run_id"],
        },
        "payload": {
            "manifest_uri": latest["manifest_uri"],
            "manifest_sha256": latest["manifest_sha256"],
            "run_id": latest["run_id"],
            "images": latest["images"],
            "failed": latest["failed"],
            "detections": latest["detections"],
        },
    }
