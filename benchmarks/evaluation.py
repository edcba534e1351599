"""The evaluate stage's cost: seconds and peak memory per labelled image.

``python -m benchmarks.evaluation [--labelled 1000,10000,100000] [--unlabelled 0]`` writes staged
shards of synthetic detections (1000 rows each, about 6 boxes per image over 4 classes, jittered
around ground-truth boxes, with false positives) and their COCO ground truth, then times
``evaluation.evaluate`` on them in a fresh process per size, and prints a table: seconds, seconds
per 1000 labelled images, and the process's peak RSS growth over its start.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from detectflow import storage
from detectflow.schema import STAGED_SCHEMA

CLASSES = ("__background__", "circle", "square", "triangle", "star")
ROWS_PER_SHARD = 1000


def write_case(root: Path, labelled: int, unlabelled: int, seed: int = 0) -> list[str]:
    """Staged shards for ``labelled + unlabelled`` images and ``root/gt.json`` for the first."""
    rng = np.random.default_rng(seed)
    images, annotations, uris = [], [], []
    total = labelled + unlabelled
    for shard, start in enumerate(range(0, total, ROWS_PER_SHARD)):
        rows = []
        for index in range(start, min(start + ROWS_PER_SHARD, total)):
            name = f"d{index // 1000:04d}/img{index:08d}.jpg"
            objects = rng.integers(1, 5)
            gt = np.column_stack([rng.uniform(0, 500, (objects, 2)),
                                  rng.uniform(20, 120, (objects, 2))])  # x, y, w, h
            classes = rng.integers(1, len(CLASSES), objects)
            if index < labelled:
                images.append({"id": index + 1, "file_name": name, "width": 640,
                               "height": 640})
                annotations += [{"id": len(annotations) + 1, "image_id": index + 1,
                                 "category_id": int(c), "bbox": [float(v) for v in b],
                                 "area": float(b[2] * b[3]), "iscrowd": 0}
                                for b, c in zip(gt, classes)]
            found = gt + rng.normal(0, 4, gt.shape)
            extra = rng.integers(0, 4)
            found = np.vstack([found, np.column_stack([rng.uniform(0, 500, (extra, 2)),
                                                       rng.uniform(20, 120, (extra, 2))])])
            labels = np.concatenate([classes, rng.integers(1, len(CLASSES), extra)])
            boxes = np.column_stack([found[:, :2], found[:, :2] + found[:, 2:]])
            rows.append({"index": index, "shard": shard, "image_uri": f"/in/{name}",
                         "width": 640, "height": 640,
                         "boxes": boxes.astype(np.float32).tolist(),
                         "scores": rng.uniform(0.05, 1, len(labels)).astype(np.float32).tolist(),
                         "labels": labels.tolist(),
                         "label_names": [CLASSES[k] for k in labels], "model": "m",
                         "run_id": "bench", "error": None})
        uri = str(root / f"shard-{shard:05d}.parquet")
        storage.write_parquet(uri, pa.Table.from_pylist(rows, schema=STAGED_SCHEMA))
        uris.append(uri)
    categories = [{"id": i, "name": n} for i, n in enumerate(CLASSES) if i]
    (root / "gt.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                              "categories": categories}))
    return uris


def measure(root: str) -> dict:
    """In this process: evaluate the case under ``root``; seconds and peak RSS growth."""
    from detectflow.evaluation import evaluate, load_ground_truth

    uris = sorted(str(p) for p in Path(root).glob("shard-*.parquet"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = evaluate(load_ground_truth(f"{root}/gt.json"), uris, "/in", CLASSES)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "rss_growth_mib": (peak - before) / 1024,
            "matched": result.matched_images, "ap50": result.ap50}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", default="1000,10000,100000")
    parser.add_argument("--unlabelled", type=int, default=0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    print("| labelled images | unlabelled | seconds | s per 1000 labelled | peak RSS growth |")
    print("|---:|---:|---:|---:|---:|")
    for labelled in (int(n) for n in args.labelled.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            write_case(Path(tmp), labelled, args.unlabelled)
            out = subprocess.run([sys.executable, "-m", "benchmarks.evaluation", "--measure",
                                  tmp], capture_output=True, text=True, check=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
        assert got["matched"] == labelled, got
        print(f"| {labelled} | {args.unlabelled} | {got['seconds']:.2f} | "
              f"{1000 * got['seconds'] / labelled:.3f} | {got['rss_growth_mib']:.0f} MiB |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
