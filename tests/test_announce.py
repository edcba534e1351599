"""latest.json only ever moves forward, atomically, to a run whose manifest exists."""

import json

from detectflow import storage
from detectflow.announce import (
    PUBLISHED_EVENT,
    is_newer,
    published_event,
    read_latest,
    update_latest,
)
from detectflow.publish import write_manifest


def _manifest(root, run_id: str, created_at: str) -> dict:
    manifest = {"run_id": run_id, "run_uri": f"{root}/{run_id}", "created_at": created_at,
                "counts": {"images": 3, "failed": 1, "detections": 7}}
    write_manifest(manifest["run_uri"], manifest)
    return manifest


def test_newest_created_at_wins_and_the_same_run_is_not_newer():
    a = {"run_id": "a", "created_at": "2026-01-01T00:00:00+00:00"}
    b = {"run_id": "b", "created_at": "2026-01-02T00:00:00+00:00"}
    assert is_newer(a, None) and is_newer(b, a) and not is_newer(a, b) and not is_newer(a, a)


def test_pointer_moves_forward_only_and_names_a_verifiable_manifest(tmp_path):
    root = str(tmp_path)
    old = _manifest(root, "old", "2026-01-01T00:00:00+00:00")
    new = _manifest(root, "new", "2026-01-02T00:00:00+00:00")
    assert update_latest(root, new)["run_id"] == "new"
    assert update_latest(root, old) is None  # finished late: the newer pointer stays
    assert update_latest(root, new) is None  # re-publishing the same run: no-op
    latest = read_latest(root)
    assert latest["run_id"] == "new" and latest["manifest_uri"] == f"{root}/new/manifest.json"
    assert latest["manifest_sha256"] == storage.sha256_file(latest["manifest_uri"])
    assert json.loads((tmp_path / "latest.json").read_text()) == latest
    assert not list(tmp_path.glob("latest.json.tmp-*"))  # no temporary file left


def test_event_names_the_dataset_and_carries_the_manifest(tmp_path):
    root = str(tmp_path)
    latest = update_latest(root, _manifest(root, "r1", "2026-01-01T00:00:00+00:00"))
    event = published_event("s3://bucket/detections", latest)
    assert event["event"] == PUBLISHED_EVENT
    assert event["resource"]["prefect.resource.id"] == "detectflow.dataset.s3://bucket/detections"
    assert event["payload"]["manifest_uri"] == latest["manifest_uri"]
    assert (event["payload"]["images"], event["payload"]["failed"]) == (3, 1)
    assert all(isinstance(v, str) for v in event["resource"].values())  # Prefect's label type
