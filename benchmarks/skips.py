"""The skip decision of incremental runs at scale (issue 33).

``python -m benchmarks.skips [--keys 1000000,10000000] [--shard-size 1000]``: for each size N,
N listed keys (about 90% unchanged since the table's run, 5% changed, 5% new) written as listing
shards, and a Delta table of about N rows for one model fingerprint (the unchanged and changed
keys, and 5% no longer listed) plus a quarter as many rows of another fingerprint, which the
decision must ignore. The table is measured in three layouts, one after the other:

- **appended**: ten commits of shuffled rows, as successive runs' merges add files;
- **compacted**: after ``DeltaTable.optimize.compact()`` (what ``detectflow.table`` runs every few
  versions);
- **z-ordered**: after ``DeltaTable.optimize.z_order(["image_uri"])``.

Each decision runs in a fresh process: its seconds, and its peak RSS growth (the peak after the
decision minus the peak before it) and the process's peak. The ``range read`` columns probe the
alternative of reading each shard's key range from the table with a filter: how many files
Delta's statistics keep for one shard's range, and the seconds such a read takes per shard
(sampled), which that design would pay once per shard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

FINGERPRINT = "bench-model"
OTHER = "other-model"
LAYOUTS = ("appended", "compacted", "z-ordered")
APPENDS = 10
# Key classes: listed and unchanged, listed with another version, listed only, table only.
UNCHANGED, CHANGED, NEW, VANISHED = range(4)
MIB = 1 << 20


def uris(ids: np.ndarray) -> pa.Array:
    """Keys in the order of their ids (zero-padded), about 60 characters as real ones are."""
    folder = pc.utf8_lpad(pc.cast(pa.array(ids // 10_000), pa.string()), 6, "0")
    name = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 9, "0")
    return pc.binary_join_element_wise("s3://bench-photos/camera-traps/2026/", folder, "/IMG_",
                                       name, ".jpg", "")


def versions(ids: np.ndarray, changed: bool = False) -> pa.Array:
    """``size:etag``, a function of the id (a changed image has another size)."""
    ids = ids.astype(np.uint64)
    size = (ids * np.uint64(2654435761)) % np.uint64(9_000_000) + np.uint64(100_000 + changed)
    etag = (ids * np.uint64(11400714819323198485)) % np.uint64(10**16)
    digits = pc.utf8_lpad(pc.cast(pa.array(etag), pa.string()), 16, "0")
    return pc.binary_join_element_wise(pc.cast(pa.array(size), pa.string()), ":", digits, digits,
                                       "")


def key_classes(n: int, seed: int = 0) -> np.ndarray:
    """One class per id, for about ``n`` listed keys and ``n`` table rows."""
    total = n + n // 20
    share = (n // 20) / total
    p = [1 - 3 * share, share, share, share]
    return np.random.default_rng(seed).choice(4, size=total, p=p).astype(np.int8)


def write_listing(folder: str, classes: np.ndarray, shard_size: int) -> int:
    """Listing shards of the listed ids in key order; returns how many."""
    listed = np.flatnonzero(classes != VANISHED)
    shards = 0
    for start in range(0, len(listed), shard_size):
        ids = listed[start:start + shard_size]
        table = pa.table({
            "image_uri": uris(ids), "size": pa.array(ids.astype(np.int64)),
            "image_version": versions(ids), "index": pa.array(np.arange(start, start + len(ids))),
            "shard": pa.array(np.full(len(ids), shards, np.int32)),
        })
        pq.write_table(table, os.path.join(folder, f"shard-{shards:06d}.parquet"))
        shards += 1
    return shards


def table_batch(ids: np.ndarray, classes: np.ndarray, fingerprint: str) -> pa.Table:
    """Table rows (detectflow.schema.TABLE_SCHEMA, boxes as Delta stores them) for ``ids``."""
    n = len(ids)
    version = pc.if_else(pa.array(classes[ids] == CHANGED), versions(ids, changed=True),
                         versions(ids))
    empty = pa.array(np.zeros(n + 1, np.int32))

    def lists(values: pa.Array) -> pa.Array:
        return pa.ListArray.from_arrays(empty, values)

    text = pa.array(np.full(n, "bench"))
    return pa.table({
        "image_uri": uris(ids), "width": pa.nulls(n, pa.int32()),
        "height": pa.nulls(n, pa.int32()),
        "boxes": lists(pa.array([], pa.list_(pa.float32()))),
        "scores": lists(pa.array([], pa.float32())), "labels": lists(pa.array([], pa.int64())),
        "label_names": lists(pa.array([], pa.string())), "model": text, "run_id": text,
        "error": pa.nulls(n, pa.string()), "fingerprint": pa.array(np.full(n, fingerprint)),
        "image_version": version,
    })


def write_table(path: str, classes: np.ndarray, seed: int = 0) -> None:
    """The fingerprint's rows in ``APPENDS`` commits of shuffled rows, then another model's."""
    from deltalake import write_deltalake

    rng = np.random.default_rng(seed)
    rows = rng.permutation(np.flatnonzero(classes != NEW))
    for part in np.array_split(rows, APPENDS):
        write_deltalake(path, table_batch(part, classes, FINGERPRINT), mode="append",
                        partition_by=["fingerprint"])
    others = np.sort(rng.choice(len(classes), len(classes) // 4, replace=False))
    write_deltalake(path, table_batch(others, classes, OTHER), mode="append",
                    partition_by=["fingerprint"])


def relayout(path: str, layout: str) -> None:
    from deltalake import DeltaTable

    dt = DeltaTable(path)
    if layout == "compacted":
        dt.optimize.compact()
    elif layout == "z-ordered":
        dt.optimize.z_order(["image_uri"])
    # Only the current files matter: the replaced ones would only fill the disk.
    DeltaTable(path).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)


def describe(path: str) -> dict:
    """The fingerprint's files, their row groups, and whether each file is in key order."""
    from deltalake import DeltaTable

    dt = DeltaTable(path)
    files = dt.file_uris(file_pruning_predicate=[("fingerprint", "=", FINGERPRINT)])
    groups, rows, ordered = 0, 0, 0
    for file in files:
        meta = pq.read_metadata(file)
        groups += meta.num_row_groups
        rows = max(rows, max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)))
        keys = pq.read_table(file, columns=["image_uri"]).column(0)
        ordered += bool(pc.all(pc.greater_equal(keys[1:], keys[:-1])).as_py())
    return {"files": len(files), "row_groups": groups, "max_group_rows": rows,
            "sorted_files": ordered}


def range_probe(path: str, listing: list[str], samples: int) -> dict:
    """A shard-range read for a few shards: files Delta keeps for the range, and seconds."""
    from deltalake import DeltaTable

    dt = DeltaTable(path)
    dataset = dt.to_pyarrow_dataset(file_pruning_predicate=[("fingerprint", "=", FINGERPRINT)])
    kept, seconds = [], []
    picks = np.linspace(0, len(listing) - 2, samples).astype(int)
    for k in picks:
        lo, hi = (pq.read_table(listing[i], columns=["image_uri"])["image_uri"][0].as_py()
                  for i in (k, k + 1))
        kept.append(len(dt.file_uris(file_pruning_predicate=(
            f"fingerprint = '{FINGERPRINT}' AND image_uri >= '{lo}' AND image_uri < '{hi}'"))))
        start = time.perf_counter()
        dataset.to_table(columns=["image_uri", "image_version", "error"],
                         filter=(ds.field("image_uri") >= lo) & (ds.field("image_uri") < hi))
        seconds.append(time.perf_counter() - start)
    return {"files_kept": float(np.mean(kept)), "range_s": float(np.median(seconds))}


def peak_rss() -> int:
    """This process's peak RSS in bytes. Linux carries ``ru_maxrss`` over from the parent across
    fork and exec, so a child started by this (large) process reads its own peak, ``VmHWM``."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(listing_dir: str, table: str) -> None:
    """The decision alone, in this fresh process: prints its numbers as JSON."""
    from detectflow.incremental import decide

    listing = sorted(os.path.join(listing_dir, f) for f in os.listdir(listing_dir))
    before = peak_rss()
    start = time.perf_counter()
    totals = np.zeros(3, np.int64)
    for d in decide(listing, table, FINGERPRINT):
        totals += (d.skipped, d.infer.num_rows, d.vanished)
    seconds = time.perf_counter() - start
    after = peak_rss()
    print(json.dumps({"seconds": seconds, "before": before, "after": after,
                      "skipped": int(totals[0]), "inferred": int(totals[1]),
                      "vanished": int(totals[2])}))


def measure(listing_dir: str, table: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.skips", "--child", listing_dir, table],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.skips", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", default="1000000,10000000", help="comma-separated key counts")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--range-samples", type=int, default=5,
                   help="shards whose key range is read from the table (0: none)")
    p.add_argument("--workdir", help="where to build the data (default: a temporary folder)")
    p.add_argument("--child", nargs=2, metavar=("LISTING", "TABLE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    layouts = args.layouts.split(",")
    root = tempfile.mkdtemp(prefix="bench-skips-", dir=args.workdir)
    rows = []
    try:
        for n in (int(k) for k in args.keys.split(",")):
            folder = os.path.join(root, str(n))
            listing_dir, table = os.path.join(folder, "listing"), os.path.join(folder, "table")
            os.makedirs(listing_dir)
            start = time.perf_counter()
            classes = key_classes(n)
            shards = write_listing(listing_dir, classes, args.shard_size)
            write_table(table, classes)
            listed = int((classes != VANISHED).sum())
            expected = {"skipped": int((classes == UNCHANGED).sum()),
                        "inferred": int(((classes == CHANGED) | (classes == NEW)).sum()),
                        "vanished": int((classes == VANISHED).sum())}
            del classes
            print(f"{n:,} keys: {shards} shards and the table written in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
            listing = sorted(os.path.join(listing_dir, f) for f in os.listdir(listing_dir))
            for layout in layouts:
                start = time.perf_counter()
                relayout(table, layout)
                shape = describe(table)
                print(f"  {layout}: {shape} ({time.perf_counter() - start:.0f} s)",
                      file=sys.stderr)
                got = measure(listing_dir, table)
                assert {k: got[k] for k in expected} == expected, (got, expected)
                probe = (range_probe(table, listing, args.range_samples)
                         if args.range_samples else {"files_kept": None, "range_s": None})
                rows.append({"keys": listed, "layout": layout, **shape, **got, **probe,
                             "shards": shards})
                print(f"  {layout}: {got} {probe}", file=sys.stderr)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(report(rows))
    return 0


def report(rows: list[dict]) -> str:
    head = ["keys", "layout", "files", "row groups", "sorted files", "seconds", "keys/s",
            "peak RSS growth MiB", "process peak MiB", "skipped", "inferred", "vanished",
            "range read: files kept", "range read s/shard", "range reads s (all shards)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        range_s = r["range_s"]
        cells = [f"{r['keys']:,}", r["layout"], str(r["files"]), str(r["row_groups"]),
                 str(r["sorted_files"]), f"{r['seconds']:.1f}",
                 f"{r['keys'] / r['seconds']:,.0f}", f"{(r['after'] - r['before']) / MIB:,.0f}",
                 f"{r['after'] / MIB:,.0f}", f"{r['skipped']:,}", f"{r['inferred']:,}",
                 f"{r['vanished']:,}",
                 "-" if r["files_kept"] is None else f"{r['files_kept']:.0f} of {r['files']}",
                 "-" if range_s is None else f"{range_s:.3f}",
                 "-" if range_s is None else f"{range_s * r['shards']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    growth = {}
    for r in rows:
        growth.setdefault(r["layout"], []).append((r["keys"], r["after"] - r["before"], r["after"]))
    for layout, points in growth.items():
        if len(points) > 1:
            (k0, g0, p0), (k1, g1, p1) = points[0], points[-1]
            lines.append(f"\n{layout}: from {k0:,} to {k1:,} keys, peak RSS growth x{g1 / g0:.2f}"
                         f", process peak x{p1 / p0:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
