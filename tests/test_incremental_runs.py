"""Nightly incremental runs end to end: real Ray, real Prefect, the Delta table read back with
deltalake (and, in test_table.py, Ray Data). The detector is the small shapes detector that
examples/shapes trains, so every detection is a real one."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from deltalake import DeltaTable
from parity import as_prediction, assert_same_detections
from test_reliability import CrashingRun

from detectflow import storage, workarounds
from detectflow.config import REPO_ROOT
from detectflow.table import RUN_ID_KEY, delta_options, read_table
from examples.shapes.data import make_dataset
from flows.detect_objects import detect_objects

SHAPES = "examples.shapes.model:tiny_fasterrcnn"
WEIGHTS = REPO_ROOT / "examples" / "shapes" / "shapes_detector.pth"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four photos to start with, and spares to add or change them with."""
    root = tmp_path_factory.mktemp("incremental")
    make_dataset(root / "in", 4, seed=31)
    make_dataset(root / "spare", 4, seed=32, subfolders=False)
    for folder in ("in", "spare"):
        (root / folder / "annotations.json").unlink()
    return root


def _run(inp, out, run_id, weights=WEIGHTS, **params):
    state = detect_objects(input_uri=str(inp), output_uri=str(out), model=SHAPES,
                           weights=str(weights), incremental=True, score_threshold=0.3,
                           batch_size=4, sample_size=1, run_id=run_id, return_state=True,
                           **({"num_actors": 1} | params))  # one actor: as test_reliability
    assert state.is_completed(), state.message
    return state.result()


def _uris(inp: Path) -> list[str]:
    return sorted(str(p) for p in inp.rglob("*") if p.suffix in (".jpg", ".png"))


def _version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _published_uris(out: Path, manifest: dict) -> list[str]:
    return [u for f in manifest["output"]["files"]
            for u in pq.read_table(out / manifest["run_id"] / f["path"])["image_uri"].to_pylist()]


@pytest.fixture(scope="module")
def nights(ray_local, prefect_api, images, tmp_path_factory):
    """Night 1 detects four photos; two are added and one changed before night 2; nothing changes
    before night 3."""
    inp, out = images / "in", tmp_path_factory.mktemp("out")
    first = _run(inp, out, "night-1")
    spare = sorted((images / "spare").iterdir())
    changed = inp / "b" / "img_00001.jpg"
    shutil.copy(spare[0], changed)  # other pixels (Pillow reads the format from the bytes)
    added = [inp / "a" / "added_1.png", inp / "b" / "added_2.png"]
    for target, source in zip(added, spare[1:]):
        shutil.copy(source, target)
    second = _run(inp, out, "night-2")
    history = len(DeltaTable(str(out / "table")).history())
    third = _run(inp, out, "night-3")
    return {"in": inp, "out": out, "runs": [first, second, third], "changed": changed,
            "added": added,
            "history": (history, len(DeltaTable(str(out / "table")).history()))}


def test_night_two_infers_the_added_and_the_changed_and_the_table_holds_each_once(nights):
    first, second, _ = nights["runs"]
    inp, out = nights["in"], nights["out"]
    assert first["incremental"] == {
        "listed": 4, "skipped": 0, "inferred": 4, "vanished": 0, "table": str(out / "table"),
        "table_version": None, "runs": {}}
    assert second["incremental"]["listed"] == 6
    assert (second["incremental"]["skipped"], second["incremental"]["inferred"]) == (3, 3)
    assert second["incremental"]["runs"] == {"night-1": 3}
    assert sorted(_published_uris(out, second)) == sorted(
        [str(nights["changed"])] + [str(p) for p in nights["added"]])
    assert second["counts"]["images"] == 3

    fingerprint = second["model"]["fingerprint"]
    assert fingerprint == first["model"]["fingerprint"]
    rows = read_table(str(out / "table"), fingerprint).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == _uris(inp)  # six images, each once
    by_uri = {r["image_uri"]: r for r in rows}
    for uri in _uris(inp):  # every row was computed from the image as it is now
        assert by_uri[uri]["image_version"] == _version(Path(uri)), uri
    assert by_uri[str(nights["changed"])]["run_id"] == "night-2"
    assert {r["run_id"] for r in rows} == {"night-1", "night-2"}
    # The changed image's night-2 row replaced its night-1 row: one row, the new detections.
    night2 = {r["image_uri"]: r for f in second["output"]["files"]
              for r in pq.read_table(out / "night-2" / f["path"]).to_pylist()}
    assert by_uri[str(nights["changed"])]["boxes"] == night2[str(nights["changed"])]["boxes"]
    # Each merge is a table version that names its run.
    runs = [c.get(RUN_ID_KEY) for c in DeltaTable(str(out / "table")).history()]
    assert runs.count("night-1") == runs.count("night-2") == 1


def test_night_three_with_nothing_new_infers_nothing_and_still_publishes(nights):
    third = nights["runs"][2]
    out = nights["out"]
    assert third["incremental"]["skipped"] == 6 and third["incremental"]["inferred"] == 0
    assert third["incremental"]["runs"] == {"night-1": 3, "night-2": 3}
    assert third["counts"]["images"] == 0 and third["output"]["files"] == []
    assert (out / "night-3" / "manifest.json").exists()
    assert json.loads((out / "latest.json").read_text())["run_id"] == "night-3"
    # No actor pool was planned, so none started (the plan is made just before it starts).
    assert third["resources"] is None and nights["runs"][1]["resources"] is not None
    assert nights["history"][1] == nights["history"][0]  # and nothing was committed


def test_new_weights_detect_every_image_again_beside_the_first_models_rows(nights, tmp_path):
    saved = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    state = saved["model"] if "model" in saved else saved
    name = next(k for k in state if k.endswith("cls_score.bias"))
    state[name] = state[name] + 0.01  # fine-tuned a little further
    weights = tmp_path / "retrained.pth"
    torch.save(saved, weights)
    retrained = _run(nights["in"], nights["out"], "retrained", weights=weights)
    first = nights["runs"][0]
    assert retrained["model"]["fingerprint"] != first["model"]["fingerprint"]
    assert (retrained["incremental"]["skipped"], retrained["incremental"]["inferred"]) == (0, 6)
    table = read_table(str(nights["out"] / "table"))
    counts = {fp: table["fingerprint"].to_pylist().count(fp)
              for fp in set(table["fingerprint"].to_pylist())}
    assert counts == {first["model"]["fingerprint"]: 6, retrained["model"]["fingerprint"]: 6}


@pytest.mark.slow
def test_a_run_killed_between_manifest_and_merge_is_merged_once_by_its_rerun(
        ray_local, prefect_api, images, tmp_path):
    inp, out = images / "in", tmp_path / "out"
    # On an existing cluster (the test worker's Ray): the failpoint is in the flow's own
    # process, which is all the kill takes (a local Ray's crash: test_reliability).
    args = ["--input", str(inp), "--output", str(out), "--model", SHAPES, "--weights",
            str(WEIGHTS), "--incremental", "--score-threshold", "0.3", "--run-id", "killed",
            "--num-actors", "1", "--ray-address", ray_local.get_runtime_context().gcs_address,
            "--no-ship-code"]
    run = CrashingRun(tmp_path, args, "before-merge", prefect_api, RAY_AUTH_MODE="token")
    run.wait_for_failpoint()
    run.kill()
    assert (out / "killed" / "manifest.json").exists() and not (out / "table").exists()
    assert not (out / "latest.json").exists()

    for attempt in range(2):  # the re-run completes the merge; another one changes nothing
        manifest = _run(inp, out, "killed")
        assert manifest["run_id"] == "killed"
        history = DeltaTable(str(out / "table")).history()
        assert [c.get(RUN_ID_KEY) for c in history].count("killed") == 1, attempt
        assert max(c["version"] for c in history) == 1  # created, then the one merge
        rows = read_table(str(out / "table"))
        assert sorted(rows["image_uri"].to_pylist()) == _uris(inp)
    assert json.loads((out / "latest.json").read_text())["run_id"] == "killed"


@pytest.fixture(scope="module")
def halves(moto_server, nights, tmp_path_factory, prefect_api, prefect_db, ray_local):
    """Two `detectflow run` processes over two halves of a bucket into one output prefix on the
    loopback S3 (delta-rs commits with S3's conditional writes): one on a local Ray of its own,
    the other on an existing cluster (the test worker's Ray). The photos are the nights' (as
    night 3 found them).

    Half a also runs with every start-up shortcut off (detectflow.workarounds): with no API
    configured, so Prefect's own temporary server, the plain torchvision import, Ray's own
    shutdown and no task-log flush; its detections are compared with the nights'."""
    import s3fs

    tmp_path = tmp_path_factory.mktemp("halves")
    url = moto_server()
    fs = s3fs.S3FileSystem(endpoint_url=url)
    fs.mkdir("nightly")
    for path in sorted(nights["in"].rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"nightly/photos/{path.relative_to(nights['in'])}")
    (tmp_path / "prefect-a").mkdir()  # a database that exists already, as a user's second run
    shutil.copy(prefect_db, tmp_path / "prefect-a" / "prefect.db")
    args = {"a": [], "b": ["--ray-address", ray_local.get_runtime_context().gcs_address]}
    extra_env = {"a": {workarounds.OFF_ENV: "off"},
                 # the existing cluster wants its token
                 "b": {"PREFECT_API_URL": prefect_api, "RAY_AUTH_MODE": "token"}}
    procs = []
    for half in ("a", "b"):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
        env.update(PREFECT_HOME=str(tmp_path / f"prefect-{half}"), **extra_env[half])
        log = open(tmp_path / f"{half}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "detectflow", "run", "--input", f"s3://nightly/photos/{half}",
             "--output", "s3://nightly/detections", "--model", SHAPES, "--weights", str(WEIGHTS),
             "--incremental", "--score-threshold", "0.3", "--run-id", f"half-{half}",
             "--num-actors", "1", "--s3-endpoint-url", url, *args[half]], cwd=REPO_ROOT,
            env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 400
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("concurrent runs did not finish")
    logs = {h: (tmp_path / f"{h}.log").read_text(errors="replace") for h in "ab"}
    assert [p.returncode for p in procs] == [0, 0], {h: t[-3000:] for h, t in logs.items()}

    storage.configure(url)
    try:
        uri = "s3://nightly/detections/table"
        table = read_table(uri)
        history = DeltaTable(uri, storage_options=delta_options(uri)).history()
    finally:
        storage.configure(None)
    return {"table": table, "history": history, "logs": logs}


@pytest.mark.slow
def test_two_runs_publishing_at_once_both_land_in_the_table_on_s3(halves, nights):
    table = halves["table"]
    assert sorted(table["image_uri"].to_pylist()) == sorted(
        f"s3://nightly/photos/{p.relative_to(nights['in'])}" for p in nights["in"].rglob("*")
        if p.is_file())
    assert sorted(table["run_id"].unique().to_pylist()) == ["half-a", "half-b"]
    runs = [c.get(RUN_ID_KEY) for c in halves["history"]]
    assert runs.count("half-a") == runs.count("half-b") == 1


@pytest.mark.slow
def test_every_workaround_off_gives_the_same_detections(halves, nights):
    """Half a, every shortcut off, against the nights' rows (every shortcut on) for its photos."""
    assert "Traceback" not in halves["logs"]["a"], halves["logs"]["a"][-3000:]
    first = nights["runs"][0]["model"]["fingerprint"]
    shortcut = {r["image_uri"]: r for r in read_table(str(nights["out"] / "table"), first)
                .to_pylist()}
    plain = [r for r in halves["table"].to_pylist() if r["run_id"] == "half-a"]
    assert len(plain) == len(list((nights["in"] / "a").iterdir())) >= 2
    assert any(r["boxes"] for r in plain)
    for row in plain:
        ref = shortcut[str(nights["in"] / row["image_uri"].removeprefix("s3://nightly/photos/"))]
        assert_same_detections(row, as_prediction(ref))


@pytest.fixture(scope="module")
def labelled(ray_local, prefect_api, tmp_path_factory):
    """Six labelled photos and one broken file, detected twice with ground truth: the second
    time nothing is new but the broken file, which failed."""
    root = tmp_path_factory.mktemp("labelled")
    gt = make_dataset(root / "in", 6, seed=33)
    (root / "gt.json").write_bytes(gt.read_bytes())
    gt.unlink()
    (root / "in" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    params = {"ground_truth": str(root / "gt.json"), "max_failure_fraction": 0.2}
    full = _run(root / "in", root / "out", "labelled", **params)
    again = _run(root / "in", root / "out", "labelled-again", min_map=0.01, **params)
    return {"in": root / "in", "out": root / "out", "full": full, "again": again}


def test_ground_truth_scores_skipped_images_by_their_rows_in_the_table(labelled):
    """With no new photo, every labelled image is still scored: by the rows the table holds for
    this model, so the AP is the full run's."""
    full, again = labelled["full"], labelled["again"]
    assert again["incremental"]["skipped"] == 6  # only the broken file is detected again
    assert again["evaluation"]["matched_images"] == full["evaluation"]["matched_images"] == 6
    assert again["evaluation"]["metrics"] == full["evaluation"]["metrics"]
    assert full["evaluation"]["metrics"]["AP"] > 0.5


def test_a_failed_image_is_retried_by_the_next_run_not_skipped(labelled):
    full, again = labelled["full"], labelled["again"]
    assert full["counts"]["failed"] == 1 and full["counts"]["images"] == 7
    # Only the broken image is detected again; it fails again, yet the run stays healthy: the
    # failure share is of every listed image, as in a full run.
    assert (again["incremental"]["skipped"], again["incremental"]["inferred"]) == (6, 1)
    assert _published_uris(labelled["out"], again) == [str(labelled["in"] / "a" / "broken.png")]
    assert again["counts"]["failed"] == 1
