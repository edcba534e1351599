"""A run's per-shard storage work at scale (a run of 10^7 images has 10^4 shards).

``python -m benchmarks.shards [--shards 200] [--workers 1,8]``, on a local folder and on a real S3
server on loopback (moto's standalone mode, as the tests use), prints two tables:

- **publish** (the write_parquet stage): ``--shards`` staged shards of ``--rows`` detection rows
  published by ``publish.publish_shards`` with each worker count, alternating;
- **staged check** (before the detect stage's first image, on a fresh run): asking for every
  shard's sidecar, as the stage did, against one listing of the staging folder
  (``resume.staged_shards``), as it does now.

Loopback S3 answers in about a millisecond where S3 itself takes tens: the gains measured here are
the least a real bucket would see.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import pyarrow as pa

from detectflow import storage
from detectflow.publish import publish_shards
from detectflow.schema import STAGED_SCHEMA


def staged_table(shard: int, rows: int, boxes: int, rng: np.random.Generator) -> pa.Table:
    """``rows`` staged rows with ``boxes`` random detections each, as the actors produce them."""
    xy = rng.uniform(0, 600, size=(rows, boxes, 2)).astype(np.float32)
    wh = rng.uniform(1, 200, size=(rows, boxes, 2)).astype(np.float32)
    labels = rng.integers(1, 91, size=(rows, boxes))
    return pa.Table.from_pylist([{
        "index": shard * rows + i, "shard": shard,
        "image_uri": f"s3://photos/2026/{shard:05d}/{i:04d}.jpg", "width": 640, "height": 480,
        "boxes": np.concatenate([xy[i], xy[i] + wh[i]], axis=1).tolist(),
        "scores": rng.uniform(0.5, 1, size=boxes).astype(np.float32).tolist(),
        "labels": labels[i].tolist(), "label_names": [f"class{k}" for k in labels[i]],
        "model": "fasterrcnn_resnet50_fpn_v2", "run_id": "bench", "error": None,
    } for i in range(rows)], schema=STAGED_SCHEMA)


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 60
    while True:
        try:
            opener.open(url + "/moto-api/data.json", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shards", description=__doc__)
    p.add_argument("--shards", type=int, default=200)
    p.add_argument("--rows", type=int, default=1000, help="rows per shard (the default shard size)")
    p.add_argument("--boxes", type=int, default=10, help="detections per row")
    p.add_argument("--workers", default="1,8", help="comma-separated worker counts")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-s3", action="store_true", help="local folder only")
    args = p.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]

    rng = np.random.default_rng(0)
    tables = [staged_table(k, args.rows, args.boxes, rng) for k in range(min(args.shards, 8))]
    proc = None
    roots = {"local": tempfile.mkdtemp(prefix="bench-publish-")}
    if not args.no_s3:
        proc, url = start_moto()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        storage.configure(url)
        storage.get_fs("s3://bench-publish")[0].mkdir("bench-publish")
        roots["s3 (loopback)"] = "s3://bench-publish/run"
    rows, checks = [], []
    try:
        for where, root in roots.items():
            staged = []
            for k in range(args.shards):  # a few distinct tables, written under every name
                uri = storage.join(root, "_staging", f"shard-{k:05d}.parquet")
                table = tables[k % len(tables)]
                info = storage.write_parquet(uri, table.set_column(
                    1, "shard", pa.array([k] * table.num_rows, pa.int32())))
                staged.append({"shard": k, "uri": uri, **info})
            size = sum(s["bytes"] for s in staged)
            seconds: dict[int, list[float]] = {w: [] for w in counts}
            for _ in range(args.repeats):
                for w in counts:
                    start = time.perf_counter()
                    files = publish_shards(staged, storage.join(root, "detections"),
                                           {"detectflow.run_id": "bench"}, workers=w)
                    seconds[w].append(time.perf_counter() - start)
                    assert [f["rows"] for f in files] == [args.rows] * args.shards
            base = min(seconds[counts[0]])
            for w in counts:
                best = min(seconds[w])
                rows.append((where, w, args.shards, size >> 20, best, args.shards / best,
                             base / best, seconds[w]))
            checks.append((where, *staged_check(root, args.shards)))
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=10)

    print(f"{args.shards} shards x {args.rows} rows x {args.boxes} boxes, "
          f"{os.cpu_count()} CPUs; best of {args.repeats}")
    head = ("storage", "workers", "shards", "staged MiB", "seconds", "shards/s", "x 1 worker",
            "all runs s")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for where, w, n, mib, best, rate, ratio, runs in rows:
        print(f"{where} | {w} | {n} | {mib} | {best:.2f} | {rate:.1f} | {ratio:.2f}x | "
              + ", ".join(f"{s:.2f}" for s in runs))
    print(f"\nstaged check of a fresh run ({args.shards} shards, nothing staged); best of 2")
    print("storage | a read per shard s | one listing s | x")
    print("--- | --- | --- | ---")
    for where, per_shard, listing in checks:
        print(f"{where} | {per_shard:.3f} | {listing:.3f} | {per_shard / listing:.0f}x")
    return 0


def staged_check(root: str, shards: int) -> tuple[float, float]:
    """Seconds to find that none of ``shards`` is staged: a read per shard, then one listing."""
    from detectflow import resume

    staging = storage.join(root, "_fresh", "_staging", "detections")
    per_shard, listing = [], []
    for _ in range(2):
        start = time.perf_counter()
        assert all(resume.load_staged(staging, k, 1000, "", "") is None for k in range(shards))
        per_shard.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert resume.staged_shards(staging) == set()
        listing.append(time.perf_counter() - start)
    return min(per_shard), min(listing)


if __name__ == "__main__":
    raise SystemExit(main())
