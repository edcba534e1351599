"""The cost of exporting a run: seconds and peak memory per format and run size.

``python -m benchmarks.exports [--rows 100000,1000000] [--formats coco,yolo,voc,labelstudio]``
writes Parquet files of synthetic detections (1000 rows each, about 5 boxes per image over 4
classes) into a temporary folder, then runs ``exports.export`` on them in a fresh process per size
and format, and prints a table: seconds, rows per second, the process's peak RSS growth over its
start (imports included in the start) and its peak RSS, and the files and bytes written.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from detectflow.exports import FORMATS
from detectflow.schema import DETECTION_SCHEMA

CLASSES = ("__background__", "circle", "square", "triangle", "star")
ROWS_PER_FILE = 1000


def write_file(path: Path, start: int, rows: int, rng: np.random.Generator,
               per_image: tuple[int, int] = (1, 10)) -> None:
    """``rows`` detection rows (boxes each: ``per_image`` = [low, high)), built as Arrow arrays:
    Python rows would make writing a million of them slower than exporting them."""
    counts = rng.integers(*per_image, rows)
    n = int(counts.sum())
    xy = rng.uniform(0, 500, (n, 2))
    boxes = np.column_stack([xy, xy + rng.uniform(20, 120, (n, 2))]).astype(np.float32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    labels = rng.integers(1, len(CLASSES), n)

    def lists(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, values)

    table = pa.table({
        "image_uri": pa.array([f"/in/d{i // 1000:04d}/img{i:08d}.jpg"
                               for i in range(start, start + rows)]),
        "width": pa.array(np.full(rows, 640, np.int32)),
        "height": pa.array(np.full(rows, 640, np.int32)),
        "boxes": lists(pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4)),
        "scores": lists(pa.array(rng.uniform(0.05, 1, n).astype(np.float32))),
        "labels": lists(pa.array(labels)),
        "label_names": lists(pa.array(np.array(CLASSES)[labels])),
        "model": pa.array(["m"] * rows),
        "run_id": pa.array(["bench"] * rows),
        "error": pa.nulls(rows, pa.string()),
        "image_version": pa.array([f"1000:{i}" for i in range(start, start + rows)]),
    }).cast(DETECTION_SCHEMA)
    pq.write_table(table, path)


def write_case(root: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        write_file(root / f"part-{i:05d}.parquet", start,
                   min(ROWS_PER_FILE, rows - start), rng)


def measure(root: str, fmt: str, out: str) -> dict:
    """In this process: export the case under ``root``; seconds and peak RSS growth."""
    from detectflow.exports import export

    uris = sorted(str(p) for p in Path(root).glob("part-*.parquet"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = export(uris, out, fmt, categories=CLASSES, input_uri="/in", model_version="bench")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "rss_growth_mib": (peak - before) / 1024, "rss_mib": peak / 1024,
            "images": result.images, "boxes": result.boxes,
            "bytes": sum(f["bytes"] for f in result.files), "files": len(result.files)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return 0
    print("| rows | format | seconds | rows/s | peak RSS growth | peak RSS | files | written |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for rows in (int(n) for n in args.rows.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            write_case(Path(tmp), rows)
            for fmt in args.formats.split(","):
                out = f"{tmp}/out-{fmt}"
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.exports", "--measure", tmp, fmt, out],
                    capture_output=True, text=True, check=True).stdout
                got = json.loads(done.strip().splitlines()[-1])
                shutil.rmtree(out)  # a million label files: free the disk before the next
                assert got["images"] == rows, got
                print(f"| {rows} | {fmt} | {got['seconds']:.1f} | "
                      f"{rows / got['seconds']:,.0f} | {got['rss_growth_mib']:.0f} MiB | "
                      f"{got['rss_mib']:.0f} MiB | "
                      f"{got['files']} | {got['bytes'] / 2**20:,.0f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
