"""The skip decision of incremental runs, against real Delta tables and listing shards."""

from __future__ import annotations

import random
import threading
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake

from detectflow import incremental, storage
from detectflow.incremental import decide
from detectflow.schema import TABLE_SCHEMA

FP = "fp-a"
# Delta has no fixed-size list: the table stores boxes as plain lists (as detectflow.table does).
STORED_SCHEMA = TABLE_SCHEMA.set(TABLE_SCHEMA.get_field_index("boxes"),
                                 pa.field("boxes", pa.list_(pa.list_(pa.float32())), False))


def uri(i: int) -> str:
    return f"s3://photos/2026/{i // 1000:05d}/{i % 1000:04d}.jpg"


def write_listing(folder, shards: list[list[tuple[str, str]]]) -> list[str]:
    """Listing shards of (image_uri, version) rows, as the listing module writes them."""
    paths, index = [], 0
    for k, rows in enumerate(shards):
        n = len(rows)
        table = pa.table({
            "image_uri": pa.array([u for u, _ in rows], pa.string()),
            "size": pa.array([int(v.split(":")[0]) for _, v in rows], pa.int64()),
            "image_version": pa.array([v for _, v in rows], pa.string()),
            "index": pa.array(range(index, index + n), pa.int64()),
            "shard": pa.array([k] * n, pa.int32()),
        })
        index += n
        paths.append(str(folder / f"shard-{k:05d}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def table_rows(keys, fingerprint=FP, version="1:a", error=None) -> pa.Table:
    """Table rows for ``keys`` (arrays or lists); ``version`` and ``error``: one value or one
    per key."""
    keys = pa.array(keys, pa.string())
    n = len(keys)

    def column(value):
        return pa.array(value if isinstance(value, list | pa.Array) else [value] * n, pa.string())

    return pa.table({
        "image_uri": keys, "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
        "boxes": pa.array([[]] * n, STORED_SCHEMA.field("boxes").type),
        "scores": pa.array([[]] * n, pa.list_(pa.float32())),
        "labels": pa.array([[]] * n, pa.list_(pa.int64())),
        "label_names": pa.array([[]] * n, pa.list_(pa.string())),
        "model": column("m"), "run_id": column("run"), "error": column(error),
        "fingerprint": column(fingerprint), "image_version": column(version),
    }, schema=STORED_SCHEMA)


def write_table(path, *parts: pa.Table) -> str:
    """A Delta table partitioned by fingerprint, one commit (and so one file at least) per
    part, as successive runs add files."""
    for part in parts:
        write_deltalake(str(path), part, partition_by=["fingerprint"], mode="append")
    return str(path)


def infer_uris(decisions) -> list[str]:
    return [u for d in decisions for u in d.infer["image_uri"].to_pylist()]


def test_first_run_infers_everything(tmp_path):
    shards = [[(uri(i), f"{i}:e") for i in range(s, s + 3)] for s in (0, 3, 6)]
    paths = write_listing(tmp_path, shards)
    decisions = list(decide(paths, str(tmp_path / "table"), FP))
    assert [d.shard for d in decisions] == [0, 1, 2]
    assert [(d.skipped, d.vanished) for d in decisions] == [(0, 0)] * 3
    for d, path in zip(decisions, paths):
        assert d.infer.equals(pq.read_table(path))


def test_unchanged_skipped_the_rest_inferred(tmp_path):
    a, b, c, d, e, f, g = (uri(i) for i in range(7))
    listing = write_listing(tmp_path, [[(a, "1:a"), (b, "2:new"), (c, "3:c"), (d, "4:d"),
                                        (e, "5:e"), (g, "7:g")]])
    table = write_table(
        tmp_path / "table",
        table_rows([a, b, d], version=["1:a", "2:old", "4:d"], error=[None, None, "decode"]),
        table_rows([e], fingerprint="fp-b", version="5:e"),  # another model's row
        table_rows([f, g], version=["6:f", None]),  # f: no longer listed; g: version unknown
    )
    (decision,) = decide(listing, table, FP)
    # b changed, c is new, d failed before, e was only seen by another model, g can't be proven
    assert decision.infer["image_uri"].to_pylist() == [b, c, d, e, g]
    assert decision.infer.column_names == ["image_uri", "size", "image_version", "index", "shard"]
    assert (decision.skipped, decision.vanished, decision.runs) == (1, 1, {"run": 1})
    # Once the other model has its own rows, they count for it alone.
    (other,) = decide(listing, table, "fp-b")
    assert (other.skipped, other.vanished, other.infer.num_rows) == (1, 0, 5)


def test_table_without_this_fingerprint(tmp_path):
    listing = write_listing(tmp_path, [[(uri(0), "1:a"), (uri(1), "1:b")]])
    table = write_table(tmp_path / "table", table_rows([uri(0), uri(1)], fingerprint="fp-b"))
    (decision,) = decide(listing, table, FP)
    assert (decision.infer.num_rows, decision.skipped, decision.vanished) == (2, 0, 0)


def test_vanished_counted_once_in_the_range_that_holds_them(tmp_path):
    # Listed: 10..19 | 30..39 | 50..59; the table also has keys before, between and after them.
    shards = [[(uri(i), "1:a") for i in range(s, s + 10)] for s in (10, 30, 50)]
    listing = write_listing(tmp_path, shards)
    before, between, after = list(range(0, 10)), list(range(20, 30)) + [40], list(range(60, 75))
    listed = [i for s in (10, 30, 50) for i in range(s, s + 10)]
    table = write_table(tmp_path / "table",
                        table_rows([uri(i) for i in listed + after]),
                        table_rows([uri(i) for i in between + before]))
    decisions = list(decide(listing, table, FP))
    # A shard's range runs from its first key to the next shard's first key.
    assert [d.vanished for d in decisions] == [10 + 10, 1, 15]
    assert [d.skipped for d in decisions] == [10, 10, 10]
    assert infer_uris(decisions) == []


def test_empty_shards_own_empty_ranges(tmp_path):
    shards = [[], [(uri(5), "1:a")], [], [(uri(8), "1:a")], []]
    listing = write_listing(tmp_path, shards)
    table = write_table(tmp_path / "table", table_rows([uri(i) for i in (1, 5, 6, 8, 9)]))
    decisions = list(decide(listing, table, FP))
    assert [d.shard for d in decisions] == [0, 1, 2, 3, 4]
    # The first range opens at the lowest key even when its shard is empty.
    assert [d.vanished for d in decisions] == [1, 1, 0, 1, 0]
    assert [d.skipped for d in decisions] == [0, 1, 0, 1, 0]


def test_on_s3(moto_server, monkeypatch, tmp_path):
    """Listing shards and the table on a loopback S3, read as a run reads them."""
    url = moto_server()
    monkeypatch.setitem(storage._ENDPOINT, "url", url)
    fs, _ = storage.get_fs("s3://skips")
    fs.mkdir("skips")
    options = {"AWS_ENDPOINT_URL": url, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    table = "s3://skips/out/table"
    write_deltalake(table, table_rows([uri(i) for i in (0, 1, 2, 9)], version="1:a"),
                    partition_by=["fingerprint"], storage_options=options)
    local = write_listing(tmp_path, [[(uri(0), "1:a"), (uri(1), "1:b")], [(uri(2), "1:a")]])
    listing = []
    for path in local:
        listing.append(f"s3://skips/listing/{path.rsplit('/', 1)[1]}")
        fs.put_file(path, listing[-1])
    decisions = list(decide(listing, table, FP, storage_options=options))
    assert [(d.infer["image_uri"].to_pylist(), d.skipped, d.vanished) for d in decisions] == [
        ([uri(1)], 1, 0), ([], 1, 1)]


def test_listing_out_of_key_order_is_refused(tmp_path):
    table = write_table(tmp_path / "table", table_rows([uri(0)]))
    across = write_listing(tmp_path, [[(uri(5), "1:a")], [(uri(3), "1:a")]])
    with pytest.raises(ValueError, match="shard 1 is not in key order"):
        list(decide(across, table, FP))
    within = write_listing(tmp_path, [[(uri(5), "1:a"), (uri(3), "1:a")]])
    with pytest.raises(ValueError, match="shard 0 is not in key order"):
        list(decide(within, table, FP))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_shards_match_a_reference(tmp_path, monkeypatch, seed):
    """Random listings and tables (in several files, cut into many small runs) against a plain
    Python reference; shards start exactly at table keys."""
    monkeypatch.setattr(incremental, "RUN_ROWS", 97)
    monkeypatch.setattr(incremental, "SPILL_BATCH_ROWS", 7)
    monkeypatch.setattr(incremental, "CHECK_ROWS", 13)
    rng = random.Random(seed)
    universe = sorted(rng.sample(range(100_000), 3000))
    listed = sorted(rng.sample(universe, 2000))
    version = {i: f"{i}:{rng.choice('xy')}" for i in listed}
    cuts = sorted(rng.sample(range(1, len(listed)), 80)) + [len(listed)] * rng.randint(0, 2)
    shards, start = [], 0
    for cut in cuts + [len(listed)]:
        shards.append([(uri(i), version[i]) for i in listed[start:cut]])
        start = cut
    shards.insert(rng.randrange(len(shards)), [])
    paths = write_listing(tmp_path, shards)

    in_table = rng.sample(universe, 2400) + [listed[cut] for cut in cuts[:-1] if cut < len(listed)]
    in_table = list(dict.fromkeys(in_table))
    # Shuffled, every file and run spans the whole key range; sorted, they follow each other.
    if seed == 2:
        in_table.sort()
    else:
        rng.shuffle(in_table)
    rows = {i: (f"{i}:{rng.choice('xyz')}", rng.choice([None, None, None, "boom"]))
            for i in in_table}
    parts = [in_table[s:s + 600] for s in range(0, len(in_table), 600)]
    table = write_table(tmp_path / "table", *[
        table_rows([uri(i) for i in part], version=[rows[i][0] for i in part],
                   error=[rows[i][1] for i in part]) for part in parts],
        table_rows([uri(i) for i in listed[:500]], fingerprint="fp-b",
                   version=[version[i] for i in listed[:500]]))

    decisions = list(decide(paths, table, FP))
    done = {uri(i) for i in in_table if rows[i][1] is None and i in version
            and rows[i][0] == version[i]}
    expected_infer = [uri(i) for i in listed if uri(i) not in done]
    assert infer_uris(decisions) == expected_infer
    assert sum(d.skipped for d in decisions) == len(done)
    assert sum(d.vanished for d in decisions) == len(set(in_table) - set(listed))
    starts = [s[0][0] for s in shards if s]
    for d, shard in zip(decisions, shards):
        if not shard:
            continue
        k = starts.index(shard[0][0])
        lo = "" if k == 0 else starts[k]
        hi = starts[k + 1] if k + 1 < len(starts) else "\U0010ffff"
        in_range = {uri(i) for i in in_table if lo <= uri(i) < hi}
        assert d.vanished == len(in_range - {u for u, _ in shard})
        assert d.skipped == len({u for u, _ in shard} & done)


def decision_peaks(folder, n: int, per_shard: int = 1000) -> tuple[int, int, int]:
    """Run the decision over ``n`` listed keys against a table of about ``n`` rows (a tenth
    changed, a twentieth vanished, shuffled over files of a fixed size): its peak Arrow and Python
    allocations, and the bytes the whole listing would take in Arrow."""
    ids = np.arange(n)
    keys = pc.binary_join_element_wise(
        "s3://a-bucket/camera-traps/2026/site-",
        pc.utf8_lpad(pc.cast(pa.array(ids // 1000), pa.string()), 5, "0"), "/IMG_",
        pc.utf8_lpad(pc.cast(pa.array(ids % 1000), pa.string()), 6, "0"), ".jpg", "")
    versions = pc.binary_join_element_wise(
        "2048123:", pc.cast(pa.array(ids * 7919 % 1_000_003), pa.string()), "")
    listing_bytes, paths = 0, []
    for k in range(n // per_shard):
        s = slice(k * per_shard, (k + 1) * per_shard)
        shard = pa.table({"image_uri": keys[s], "size": pa.array(ids[s]),
                          "image_version": versions[s], "index": pa.array(ids[s]),
                          "shard": pa.array(np.full(per_shard, k, np.int32))})
        listing_bytes += shard.nbytes
        paths.append(str(folder / f"shard-{k:05d}.parquet"))
        pq.write_table(shard, paths[-1])
    order = np.random.default_rng(0).permutation(n)
    changed = pc.if_else(pa.array(order % 10 == 0), "0:changed", versions)
    table_keys = pc.if_else(pa.array(order % 20 == 1),
                            pc.binary_join_element_wise(keys, "~gone", ""), keys)
    table = write_table(folder / "table", *[
        table_rows(table_keys.take(part), version=changed.take(part))
        for part in np.array_split(order, n // 25_000)])
    del keys, versions, changed, table_keys, shard

    peak = {"arrow": 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.0005):
            peak["arrow"] = max(peak["arrow"], pa.total_allocated_bytes())

    base_arrow = pa.total_allocated_bytes()
    sampler = threading.Thread(target=sample, daemon=True)
    tracemalloc.start()
    sampler.start()
    totals = np.zeros(3, np.int64)
    try:
        for d in decide(paths, table, FP):
            peak["arrow"] = max(peak["arrow"], pa.total_allocated_bytes())
            totals += (d.infer.num_rows, d.skipped, d.vanished)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        stop.set()
        sampler.join()
        tracemalloc.stop()
    assert totals.tolist() == [n // 10 + n // 20, n - n // 10 - n // 20, n // 20]
    return peak["arrow"] - base_arrow, python_peak, listing_bytes


def test_memory_stays_flat(tmp_path, monkeypatch):
    """Four times the keys (200k listed in 200 shards, against a table of as many rows): the
    peak the decision holds, in Arrow buffers and Python objects, stays the same and a small
    part of what the whole listing takes."""
    # The rows sorted and merged at once scaled down with the table, as they are to 10^7 keys.
    monkeypatch.setattr(incremental, "RUN_ROWS", 1 << 13)
    monkeypatch.setattr(incremental, "MERGE_ROWS", 1 << 13)
    monkeypatch.setattr(incremental, "SPILL_BATCH_ROWS", 1 << 6)
    (tmp_path / "small").mkdir()
    (tmp_path / "large").mkdir()
    small = decision_peaks(tmp_path / "small", 50_000)
    arrow, python, listing = decision_peaks(tmp_path / "large", 200_000)
    assert listing > 15e6
    assert arrow < 1.5 * small[0] and python < 1.5 * small[1], (small, arrow, python)
    assert arrow < listing / 2 and python < listing / 20, (arrow, python, listing)
