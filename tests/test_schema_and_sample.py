"""Row building, the published schema, and the sample checks."""

import numpy as np
import pyarrow as pa
import pytest

from detectflow import models
from detectflow.sample import check_row
from detectflow.schema import (
    DETECTION_SCHEMA,
    STAGED_SCHEMA,
    detection_row,
    published,
    rows_to_table,
)

CATS = models.categories("fasterrcnn_mobilenet_v3_large_320_fpn")


def _row(index=0, n=2, **kw):
    base = dict(image_uri=f"/x/{index}.jpg", index=index, shard=0, width=100, height=80,
                boxes=np.array([[1, 2, 30, 40]] * n, np.float32), scores=np.full(n, 0.9),
                labels=np.full(n, 17), categories=CATS, model="m", run_id="r")
    base.update(kw)
    return detection_row(**base)


def test_row_names_labels_from_the_category_table():
    row = _row()
    assert row["label_names"] == [CATS[17]] * 2 == ["cat", "cat"]
    assert row["boxes"] == [[1.0, 2.0, 30.0, 40.0]] * 2 and row["error"] is None


def test_failed_row_has_empty_lists_and_reason():
    row = detection_row(image_uri="/x/bad.jpg", index=3, shard=0, width=None, height=None,
                        model="m", run_id="r", error="empty file")
    assert row["boxes"] == row["scores"] == row["labels"] == row["label_names"] == []
    assert row["error"] == "empty file"


@pytest.mark.parametrize("counts", [[0], [3], [2, 2, 2], [0, 5, 1]])
def test_tables_have_one_type_whatever_the_box_counts(counts):
    # Batch of one, all-equal counts and zero detections: the cases that break ragged numpy.
    table = rows_to_table([_row(i, n) for i, n in enumerate(counts)])
    assert table.schema == STAGED_SCHEMA
    assert table.column("boxes").type == pa.list_(pa.list_(pa.float32(), 4))
    assert [len(b) for b in table.column("boxes").to_pylist()] == counts


def test_published_drops_position_columns_and_sorts_by_listing_order():
    table = rows_to_table([_row(2), _row(0), _row(1)])
    out = published(table)
    assert out.schema.names == DETECTION_SCHEMA.names
    assert out.column("image_uri").to_pylist() == ["/x/0.jpg", "/x/1.jpg", "/x/2.jpg"]


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        _row(scores=np.array([0.5]))


def test_check_row_accepts_valid_and_failed_rows():
    assert check_row(_row(), CATS) == []
    assert check_row(detection_row(image_uri="u", index=0, shard=0, width=None, height=None,
                                   model="m", run_id="r", error="empty file"), CATS) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(boxes=np.array([[1, 2, 130, 40]] * 2, np.float32)), "outside 100x80"),
        (dict(boxes=np.array([[50, 2, 30, 40]] * 2, np.float32)), "outside"),
        (dict(scores=np.array([0.5, 1.5])), "score 1.5"),
        (dict(labels=np.array([17, 500])), "not in the model's categories"),
        (dict(labels=np.array([0, 17])), "not in the model's categories"),
    ],
)
def test_check_row_reports_violations(change, expected):
    problems = check_row(_row(**change), CATS)
    assert problems and expected in problems[0]


def test_check_row_catches_wrong_label_names():
    row = _row()
    row["label_names"] = ["dog", "dog"]
    assert check_row(row, CATS)


@pytest.mark.parametrize("workers", [1, 4])
def test_shards_publish_in_order_with_the_same_bytes_however_many_at_once(tmp_path, workers):
    """``publish_shards`` (write_parquet's work): each staged shard becomes its part file,
    rows in listing order, and the manifest entries come back in the staged order."""
    import pyarrow.parquet as pq

    from benchmarks.shards import staged_table
    from detectflow import storage
    from detectflow.publish import publish_shards

    rng = np.random.default_rng(1)
    staged = []
    for shard in (3, 0, 7, 1, 2):  # any order: the entries follow it
        table = staged_table(shard, 20, 3, rng)
        table = table.take(rng.permutation(table.num_rows))  # rows arrive out of order
        uri = str(tmp_path / "staged" / f"shard-{shard:05d}.parquet")
        staged.append({"shard": shard, "uri": uri, **storage.write_parquet(uri, table)})
    files = publish_shards(staged, str(tmp_path / "detections"), {"detectflow.run_id": "r"},
                           workers=workers)
    assert [f["path"] for f in files] == [f"detections/part-{s['shard']:05d}.parquet"
                                          for s in staged]
    for entry in files:
        data = (tmp_path / entry["path"]).read_bytes()
        assert entry["sha256"] == storage.sha256_bytes(data) and entry["rows"] == 20
        table = pq.read_table(tmp_path / entry["path"])
        assert table.schema.equals(DETECTION_SCHEMA, check_metadata=False)
        assert table.schema.metadata[b"detectflow.run_id"] == b"r"
        shard = int(entry["path"][-13:-8])
        assert table.column("image_uri").to_pylist() == [
            f"s3://photos/2026/{shard:05d}/{i:04d}.jpg" for i in range(20)]
    if workers > 1:  # the same bytes as one at a time
        again = publish_shards(staged, str(tmp_path / "serial"), {"detectflow.run_id": "r"},
                               workers=1)
        assert [f["sha256"] for f in again] == [f["sha256"] for f in files]
