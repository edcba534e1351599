"""S3 in and out against a real S3 server on loopback (moto server mode), through s3fs/pyarrow."""

import hashlib
import json

import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import S3_SECRET
from prefect.client.orchestration import get_client
from settle import completed_task_runs, flow_run_logs, settled

from detectflow import storage
from detectflow.listing import _iter_s3, iter_images
from flows.detect_objects import detect_objects

SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"
NAMES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "motorcycle.jpg", "rocket.jpg"]


@pytest.fixture(autouse=True)
def _fresh_s3_clients():
    # s3fs caches clients per argument set; tests that change credentials need new ones.
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(None)
    yield
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(None)


@pytest.fixture(scope="module")
def s3_run(s3, ray_local, prefect_api, small_weights):
    fs = s3fs.S3FileSystem(endpoint_url=s3)
    fs.put_file(str(small_weights), "detectflow-in/weights/small.pth")
    state = detect_objects(
        input_uri="s3://detectflow-in/photos", output_uri="s3://detectflow-out/runs",
        model=SMALL, weights="s3://detectflow-in/weights/small.pth", score_threshold=0.3,
        run_id="s3-run", s3_endpoint_url=s3, num_actors=1, return_state=True,
    )
    assert state.is_completed(), state.message
    return {"fs": fs, "state": state, "result": state.result()}


def test_s3_to_s3_run_publishes_parquet_samples_and_manifest(s3_run, s3, small_weights):
    fs = s3_run["fs"]
    run = "detectflow-out/runs/s3-run"
    manifest = json.loads(fs.cat_file(f"{run}/manifest.json"))
    assert manifest["input"] == {"uri": "s3://detectflow-in/photos", "count": 5, "skipped": {
        "hidden": 0, "broken_link": 0, "unreadable": 0, "run_output": 0}}
    assert manifest["model"]["weights"]["sha256"] == hashlib.sha256(
        small_weights.read_bytes()).hexdigest()
    for entry in manifest["output"]["files"]:  # a reader can trust every listed file
        data = fs.cat_file(f"{run}/{entry['path']}")
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert sorted(fs.ls(run, detail=False)) == [f"{run}/{n}" for n in
                                                 ("detections", "manifest.json", "samples")]
    assert len(fs.ls(f"{run}/samples")) == 4

    from pyarrow.fs import S3FileSystem

    arrow_s3 = S3FileSystem(endpoint_override=s3, scheme="http")
    table = pq.read_table(f"{run}/detections/part-00000.parquet", filesystem=arrow_s3)
    assert table.column("image_uri").to_pylist() == [f"s3://detectflow-in/photos/{n}" for n in NAMES]
    assert table.column("error").null_count == 5
    assert sum(len(b) for b in table.column("boxes").to_pylist()) > 0


def _finished(logs) -> int:
    """Logs that end a run: one per task run and one for the flow run."""
    return sum(log.message.startswith("Finished in state") for log in logs)


def test_no_secret_in_manifest_logs_artifacts_or_parameters(s3_run):
    fs = s3_run["fs"]
    texts = [fs.cat_file("detectflow-out/runs/s3-run/manifest.json").decode()]
    flow_run_id = s3_run["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        # Every task's last log and the flow's: Ray workers ship theirs in the background.
        logs = settled(lambda: flow_run_logs(client, flow_run_id),
                       lambda logs: _finished(logs) >= 7)
        texts += [log.message for log in logs]
        texts += [str(a.data) + str(a.description) for a in client.read_artifacts()
                  if a.flow_run_id == flow_run_id]
        texts += [str(t.task_inputs) for t in completed_task_runs(client, flow_run_id, 6)]
        texts.append(str(client.read_flow_run(flow_run_id).parameters))
    assert _finished(logs) >= 7, logs
    assert not [t for t in texts if S3_SECRET in t]


def test_listing_streams_page_by_page_in_key_order(s3):
    storage.configure(s3)
    fs, path = storage.get_fs("s3://detectflow-in/photos")
    listed = list(_iter_s3(fs, path, page_size=2))  # three pages
    assert [k for k, *_ in listed] == [f"detectflow-in/photos/{n}" for n in NAMES]
    # Each image's version is its size and ETag, as the listing gave them (nothing is read).
    for key, size, version in listed:
        etag = fs.info(key)["ETag"].strip('"')
        assert version == f"{size}:{etag}" and len(etag) >= 16


def test_one_object_can_be_the_input_as_one_local_file_can(s3):
    storage.configure(s3)
    uri = f"s3://detectflow-in/photos/{NAMES[0]}"
    (listed,) = iter_images(uri, (".jpg",))
    assert listed.uri == uri and listed.version == f"{listed.size}:{storage.get_fs(uri)[0].info(uri)['ETag'].strip(chr(34))}"
    assert list(iter_images("s3://detectflow-in/photos/missing.jpg", (".jpg",))) == []


def test_aws_endpoint_url_environment_variable_is_honoured(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3)
    uris = [u for u, *_ in iter_images("s3://detectflow-in/photos", (".jpg",))]
    assert uris == [f"s3://detectflow-in/photos/{n}" for n in NAMES]


def _fails_fast(s3_endpoint_url, **params):
    state = detect_objects(model=SMALL, weights=params.pop("weights"), return_state=True,
                           s3_endpoint_url=s3_endpoint_url, **params)
    assert state.is_failed()
    message = state.message
    assert "\n" not in message and S3_SECRET not in message
    return message


@pytest.mark.parametrize(
    "input_uri, output_uri, expected",
    [
        ("s3://no-such-bucket/photos", "s3://detectflow-out/bad",
         "cannot list s3://no-such-bucket/photos: bucket does not exist"),
        ("s3://detectflow-in/nothing-here", "s3://detectflow-out/bad",
         "no images with extensions .jpg under s3://detectflow-in/nothing-here"),
        ("s3://detectflow-in/other", "s3://detectflow-out/bad",
         "no images with extensions .jpg under s3://detectflow-in/other"),
        ("s3://detectflow-in/photos", "s3://no-such-out-bucket/runs",
         "cannot write to s3://no-such-out-bucket/runs: bucket does not exist"),
    ],
)
def test_bad_locations_fail_with_one_line_naming_the_uri(s3, small_weights, input_uri,
                                                         output_uri, expected):
    fs = s3fs.S3FileSystem(endpoint_url=s3)
    before = fs.find("detectflow-out")
    message = _fails_fast(s3, input_uri=input_uri, output_uri=output_uri,
                          weights=str(small_weights), extensions=[".jpg"])
    assert expected in message
    assert fs.find("detectflow-out") == before  # nothing written


def test_unreachable_endpoint_fails_fast(small_weights):
    from conftest import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    message = _fails_fast(endpoint, input_uri="s3://detectflow-in/photos",
                          output_uri="s3://detectflow-out/x", weights=str(small_weights))
    assert f"cannot list s3://detectflow-in/photos: cannot reach the storage endpoint {endpoint}" \
        in message


def test_wrong_credentials_fail_with_one_line(s3_auth, small_weights, monkeypatch):
    url, _, _ = s3_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    message = _fails_fast(url, input_uri="s3://auth-in/photos", output_uri="s3://auth-out/runs",
                          weights=str(small_weights))
    assert "cannot list s3://auth-in/photos: invalid credentials" in message


def test_access_denied_on_output_fails_before_writing(s3_auth, small_weights, monkeypatch):
    url, key_id, secret = s3_auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    message = _fails_fast(url, input_uri="s3://auth-in/photos", output_uri="s3://auth-out/runs",
                          weights=str(small_weights))
    assert "cannot write to s3://auth-out/runs: access denied" in message
    assert secret not in message and key_id not in message
