"""`detectflow run` as a user runs it: a fresh process, its own local Ray and Prefect API."""

import contextlib
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import torch
from parity import assert_same_detections

from detectflow.cli import options_table

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "detectflow"]
SMALL = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"),  # its own ephemeral API database
        TORCH_HOME=str(tmp_path / "torch-home"),  # an empty hub cache
        https_proxy="http://127.0.0.1:9",  # downloads fail at once, online or not
        HTTPS_PROXY="http://127.0.0.1:9",
    )
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)  # conftest's; a user's shell has none
    return env


def _stored_events(prefect_home: Path) -> dict[str, int]:
    """Events the run's temporary API server stored, by name (its database outlives it)."""
    with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
        return dict(db.execute("SELECT event, count(*) FROM events GROUP BY event").fetchall())


def _task_logs(prefect_home: Path) -> dict[str, list[str]]:
    """Log messages the run's temporary API server stored, by task run id."""
    by_task: dict[str, list[str]] = {}
    with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
        for task_run_id, message in db.execute(
                "SELECT task_run_id, message FROM log WHERE task_run_id IS NOT NULL"):
            by_task.setdefault(task_run_id, []).append(message)
    return by_task


def test_missing_pretrained_weights_fail_fast_with_one_line(tmp_path):
    proc = subprocess.run(CLI + ["run", "--output", str(tmp_path / "out")], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "fasterrcnn_resnet50_fpn_v2_coco-dd69338a.pth" in lines[0]
    assert "--weights" in lines[0] and "torch hub cache" in lines[0]
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_fit_fail_before_ray_in_one_line(tmp_path, small_weights):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(small_weights.read_bytes()[:100_000])
    proc = subprocess.run(
        CLI + ["run", "--input", str(ROOT / "data" / "sample_images"), "--output",
               str(tmp_path / "out"), "--model", SMALL, "--weights", str(truncated)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"detectflow: error: weights for {SMALL}: {truncated} is not a complete file saved by "
        "torch.save (RuntimeError)"]
    assert not (tmp_path / "out").exists()  # Ray never started, nothing was written


def test_bad_parameter_is_refused_with_the_field_name(tmp_path):
    proc = subprocess.run(CLI + ["run", "--score-threshold", "3"], env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "score_threshold" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _run(tmp_path: Path, out: Path, weights: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        CLI + ["run", "--input", str(ROOT / "data" / "sample_images"), "--output", str(out),
               "--model", SMALL, "--weights", str(weights), "--limit", "2",
               "--score-threshold", "0.3", "--run-id", "cli-run"],
        env=_env(tmp_path) | env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_run_completes_prints_summary_and_run_folder_last(tmp_path, small_weights):
    out = tmp_path / "out"
    proc = _run(tmp_path, out, small_weights)
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(out / "cli-run")
    summary = "\n".join(lines[-25:])
    assert "run cli-run: 2 images, 2 ok, 0 failed" in summary and "images/s" in summary
    assert "detect: 2/2 images (100%)" in proc.stdout + proc.stderr  # progress was reported
    assert "row/s" not in proc.stdout + proc.stderr  # by us: no terminal bars from a Ray worker
    table = pq.read_table(out / "cli-run" / "detections" / "part-00000.parquet")
    assert table.num_rows == 2
    assert (out / "cli-run" / "manifest.json").exists()
    assert len(list((out / "cli-run" / "samples").glob("*.png"))) == 2
    events = _stored_events(tmp_path / "prefect-home")
    assert events.get("prefect.flow-run.Running") == 1, events  # the run reported to its API...
    assert "prefect.flow-run.heartbeat" not in events, events  # ...which dies with it: no beats
    # Every task's logs reached that API although the run's local Ray killed its workers right
    # after the last task (Prefect sends logs in batches; workarounds.task_logs flushes them).
    by_task = _task_logs(tmp_path / "prefect-home")
    assert len(by_task) == 6, by_task  # list, detect, validate, write, manifest, latest
    for messages in by_task.values():  # each task's last log, as Prefect writes it
        assert any(m.startswith("Finished in state Completed") for m in messages), messages
    assert sum(m.startswith("wrote 2 rows") for ms in by_task.values() for m in ms) == 1

    # Every start-up shortcut off (detectflow.workarounds): Prefect's own temporary server, the
    # plain torchvision import, Ray's own shutdown; the same detections.
    (tmp_path / "plain").mkdir()
    plain = _run(tmp_path / "plain", tmp_path / "plain-out", small_weights,
                 DETECTFLOW_TEST_WORKAROUNDS="off")
    assert plain.stdout.strip().splitlines()[-1] == str(tmp_path / "plain-out" / "cli-run")
    rows = table.sort_by("image_uri").to_pylist()
    again = pq.read_table(tmp_path / "plain-out" / "cli-run" / "detections" / "part-00000.parquet")
    for row, other in zip(rows, again.sort_by("image_uri").to_pylist(), strict=True):
        assert row["image_uri"] == other["image_uri"] and len(row["boxes"]) > 0
        assert_same_detections(other, {"boxes": torch.tensor(row["boxes"]).reshape(-1, 4),
                                       "scores": torch.tensor(row["scores"]),
                                       "labels": torch.tensor(row["labels"])})


def test_readme_lists_every_option_that_help_prints():
    """README's option table is generated from RunConfig like `--help`; after a field changes,
    paste ``python -c 'from detectflow.cli import options_table; print(options_table())'``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- options: generated")
    table = readme[readme.index("\n", start) + 1:readme.index("<!-- end options -->")].strip()
    assert table == options_table()
    help_text = subprocess.run(CLI + ["run", "--help"], capture_output=True, text=True, cwd=ROOT,
                               env=os.environ | {"COLUMNS": "200"}, timeout=60).stdout
    flags = {part.split()[0] for line in help_text.splitlines() if line.startswith("  --")
             for part in line.strip().split("  ")[0].split(", ")} - {"--help"}
    listed = set()
    for flag in re.findall(r"`(--[^\s`]+)", table):
        listed |= {flag.replace("[no-]", ""), flag.replace("[no-]", "no-")}
    assert flags == listed
    assert len(flags) >= 31
