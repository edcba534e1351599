"""The detections table across runs: real delta-rs on local files and on a loopback S3 (moto)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import s3fs
from conftest import ROOT, S3_SECRET, free_port
from deltalake import DeltaTable

from detectflow import storage
from detectflow.errors import OutputError
from detectflow.schema import TABLE_SCHEMA
from detectflow.table import (
    Merged,
    delta_options,
    merge_run,
    merged_version,
    read_table,
    table_uri,
)

FP, OTHER = "fp-small", "fp-large"
BUCKET = "table-bkt"


def rows(run_id: str, images: dict[str, float], fingerprint: str = FP) -> pa.Table:
    """One row per image; its score (and box) says which run it came from."""
    return pa.Table.from_pylist([
        {"image_uri": f"s3://in/{name}.jpg", "width": 640, "height": 480,
         "boxes": [[1.0, 2.0, 3.0 + score, 4.0]], "scores": [score], "labels": [17],
         "label_names": ["cat"], "model": "m", "run_id": run_id, "error": None,
         "fingerprint": fingerprint, "image_version": f"{name}:v"}
        for name, score in images.items()], schema=TABLE_SCHEMA)


def by_image(table: pa.Table) -> dict[str, str]:
    return dict(zip(table["image_uri"].to_pylist(), table["run_id"].to_pylist()))


def run_ids(table: str) -> dict[int, str | None]:
    return {c["version"]: c.get("detectflow.run_id")
            for c in DeltaTable(table, storage_options=delta_options(table)).history()}


@pytest.fixture(scope="module")
def s3_url(moto_server):
    url = moto_server()
    s3fs.S3FileSystem(endpoint_url=url).mkdir(BUCKET)
    return url


@pytest.fixture
def on_s3(s3_url, monkeypatch):
    monkeypatch.setitem(storage._ENDPOINT, "url", s3_url)
    return s3_url


def test_latest_row_per_image_and_fingerprint_with_history_and_time_travel(tmp_path):
    table = table_uri(str(tmp_path / "out"))
    first = merge_run(table, rows("run-1", {"a": .1, "b": .1, "c": .1, "d": .1}), "run-1")
    # The second run arrives as a stream, as a big run's rows would.
    second_rows = rows("run-2", {"c": .2, "e": .2, "f": .2})
    second = merge_run(table, pa.RecordBatchReader.from_batches(
        TABLE_SCHEMA, second_rows.to_batches(max_chunksize=1)), "run-2")
    assert (first.merged, first.rows, second.merged, second.rows) == (True, 4, True, 3)

    got = read_table(table, fingerprint=FP)
    assert got.schema.equals(TABLE_SCHEMA)  # boxes back to fixed_size_list<float32, 4>
    assert len(got) == 6 and by_image(got) == {
        "s3://in/a.jpg": "run-1", "s3://in/b.jpg": "run-1", "s3://in/c.jpg": "run-2",
        "s3://in/d.jpg": "run-1", "s3://in/e.jpg": "run-2", "s3://in/f.jpg": "run-2"}
    changed = got.filter(pa.compute.equal(got["image_uri"], "s3://in/c.jpg")).to_pylist()[0]
    assert changed["scores"] == [pytest.approx(.2)] and changed["boxes"][0][2] == pytest.approx(3.2)

    third = merge_run(table, rows("run-3", {"a": .3, "c": .3}, OTHER), "run-3")
    both = read_table(table)
    assert len(both) == 8 and len(read_table(table, fingerprint=OTHER)) == 2
    assert by_image(read_table(table, fingerprint=FP)) == by_image(got)

    assert run_ids(table) == {0: None, first.version: "run-1", second.version: "run-2",
                              third.version: "run-3"}
    after_first = read_table(table, version=first.version)
    assert sorted(after_first.to_pylist(), key=lambda r: r["image_uri"]) == rows(
        "run-1", {"a": .1, "b": .1, "c": .1, "d": .1}).to_pylist()


def test_a_run_id_merges_once(tmp_path):
    table = table_uri(str(tmp_path))
    assert merged_version(table, "run-1") is None  # no table yet
    first = merge_run(table, rows("run-1", {"a": .1, "b": .1}), "run-1")
    # A re-run after a crash between the manifest and the merge: same run id, rows again.
    again = merge_run(table, rows("run-1", {"a": .5, "b": .5}), "run-1")
    assert again == Merged(version=first.version, merged=False, rows=0, attempts=1)
    assert merged_version(table, "run-1") == 1 and merged_version(table, "run-2") is None
    assert DeltaTable(table).version() == first.version
    assert read_table(table)["scores"].to_pylist() == [[pytest.approx(.1)]] * 2
    assert merge_run(table, rows("run-2", {}), "run-2") == Merged(None, False, 0, 0)


CHILD = """
import json, sys
from detectflow import storage, table
path, run_id, endpoint, names = sys.argv[1:5]
storage.configure(endpoint or None)
rows = table.pa.Table.from_pylist(json.loads(names), schema=table.TABLE_SCHEMA)
print("ready", flush=True)
sys.stdin.readline()  # both start merging at the same moment
merged = table.merge_run(path, rows, run_id)
print(json.dumps({"version": merged.version, "merged": merged.merged,
                  "attempts": merged.attempts}), flush=True)
"""


def merge_together(table: str, endpoint: str = "") -> dict[str, dict]:
    """Two processes, each merging a run into ``table`` (not yet created) at the same moment.
    Each run has two images of its own and one both have (``shared``)."""
    runs = {run: rows(run, {f"{run}-x": .4, f"{run}-y": .4, "shared": .4}) for run in ("r1", "r2")}
    procs = {run: subprocess.Popen(
        [sys.executable, "-c", CHILD, table, run, endpoint, json.dumps(part.to_pylist())],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for run, part in runs.items()}
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs.values():
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out = {run: proc.communicate(timeout=120)[0] for run, proc in procs.items()}
    assert all(proc.returncode == 0 for proc in procs.values()), out
    return {run: json.loads(text.splitlines()[-1]) for run, text in out.items()}


def check_both_landed(table: str, results: dict[str, dict]) -> None:
    assert all(r["merged"] for r in results.values())
    assert results["r1"]["version"] != results["r2"]["version"]
    got = by_image(read_table(table))
    last = max(results, key=lambda run: results[run]["version"])  # the later merge wins "shared"
    assert got == {"s3://in/r1-x.jpg": "r1", "s3://in/r1-y.jpg": "r1", "s3://in/r2-x.jpg": "r2",
                   "s3://in/r2-y.jpg": "r2", "s3://in/shared.jpg": last}
    assert sorted(filter(None, run_ids(table).values())) == ["r1", "r2"]


def test_concurrent_runs_both_land_locally(tmp_path):
    table = table_uri(str(tmp_path / "out"))
    check_both_landed(table, merge_together(table))


def test_concurrent_runs_both_land_on_s3(on_s3):
    table = table_uri(f"s3://{BUCKET}/concurrent")
    check_both_landed(table, merge_together(table, on_s3))


def test_compaction_and_checkpoint_on_schedule_keep_reads_right(tmp_path):
    table = table_uri(str(tmp_path))
    merge_run(table, rows("run-1", {"a": .1, "b": .1}), "run-1", maintain_every=2)
    assert len(DeltaTable(table).file_uris()) == 1
    # Insert only: a second file beside the first, then version 2 is due for maintenance.
    merge_run(table, rows("run-2", {"c": .2}), "run-2", maintain_every=2)
    dt = DeltaTable(table)
    assert [c["operation"] for c in dt.history(limit=2)] == ["OPTIMIZE", "MERGE"]
    assert dt.history(limit=1)[0]["operationMetrics"]["numFilesRemoved"] == 2
    assert len(dt.file_uris()) == 1
    assert (Path(table) / "_delta_log" / f"{dt.version():020d}.checkpoint.parquet").exists()

    # Log cleanup may drop the commits the checkpoint covers: the rows and every run's txn stay.
    for version in range(dt.version()):
        (Path(table) / "_delta_log" / f"{version:020d}.json").unlink()
    merge_run(table, rows("run-3", {"a": .3, "d": .3}), "run-3", maintain_every=2)
    assert by_image(read_table(table)) == {"s3://in/a.jpg": "run-3", "s3://in/b.jpg": "run-1",
                                           "s3://in/c.jpg": "run-2", "s3://in/d.jpg": "run-3"}
    assert merged_version(table, "run-1") == merged_version(table, "run-2") == 1
    # Its commit info is gone with the log entry, so the version it merged at is unknown.
    assert merge_run(table, rows("run-1", {"a": .9}), "run-1").version is None


@pytest.fixture(scope="module")
def two_runs(s3_url):
    table = table_uri(f"s3://{BUCKET}/readers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(storage._ENDPOINT, "url", s3_url)
        merge_run(table, rows("run-1", {"a": .1, "b": .1}), "run-1")
        merge_run(table, rows("run-2", {"b": .2}, OTHER), "run-2")
        ours = read_table(table)
    return table, ours.sort_by([("fingerprint", "ascending"), ("image_uri", "ascending")])


def test_deltalake_reads_what_we_wrote(two_runs, on_s3):
    table, ours = two_runs
    theirs = DeltaTable(table, storage_options=delta_options(table)).to_pyarrow_table()
    assert theirs.num_rows == 3
    assert theirs.sort_by([("fingerprint", "ascending"), ("image_uri", "ascending")]).select(
        TABLE_SCHEMA.names).cast(TABLE_SCHEMA).equals(ours)


def test_ray_data_reads_what_we_wrote(two_runs, on_s3, ray_local):
    table, ours = two_runs
    data = ray_local.data.read_delta(table, storage_options=delta_options(table)).take_all()
    key = lambda r: (r["fingerprint"], r["image_uri"], r["run_id"])  # noqa: E731
    assert sorted((key(r), [list(b) for b in r["boxes"]]) for r in data) == sorted(
        (key(r), r["boxes"]) for r in ours.to_pylist())


def test_delta_options_carry_the_endpoint_never_credentials(s3_url, monkeypatch):
    monkeypatch.setitem(storage._ENDPOINT, "url", None)
    monkeypatch.delenv("AWS_REGION", raising=False)
    assert delta_options("/data/out/table") == {} == delta_options("file:///data/out/table")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_url)
    options = delta_options("s3://b/table")
    assert options["AWS_ENDPOINT_URL"] == s3_url and options["AWS_ALLOW_HTTP"] == "true"
    assert options["AWS_REGION"] == "us-east-1"  # conftest's AWS_DEFAULT_REGION
    assert S3_SECRET not in json.dumps(options) and "SECRET" not in json.dumps(options)


@pytest.mark.parametrize("where", ["closed port", "missing bucket"])
def test_storage_errors_are_one_line_without_the_secret(s3_url, monkeypatch, where):
    endpoint = f"http://127.0.0.1:{free_port()}" if where == "closed port" else s3_url
    monkeypatch.setitem(storage._ENDPOINT, "url", endpoint)
    with pytest.raises(OutputError) as caught:
        merge_run("s3://no-such-bucket/out/table", rows("run-1", {"a": .1}), "run-1")
    text = str(caught.value)
    assert S3_SECRET not in text and "\n" not in text and text.startswith("detections table")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
