"""A run's detections as COCO, YOLO, Pascal VOC or Label Studio files for labelling and analysis
tools.

Pure functions, no Prefect or Ray. The run's Parquet files are read one at a time, a record batch
at a time, and every output file is written as the batches go by: memory grows with a batch, not
with the run (only ``Exported.files``, one entry per written file, grows with it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any
from urllib.parse import quote, unquote_to_bytes
from xml.sax.saxutils import escape

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detectflow import storage
from detectflow.errors import ConfigError

FORMATS = ("coco", "yolo", "voc", "labelstudio")
# Entries of a torchvision category table that name no class.
NOT_CLASSES = frozenset({"__background__", "N/A"})
_FLAT = ("yolo", "voc")
_BATCH_ROWS = 4096  # rows per Parquet batch: bounds memory whatever the shard size
_COLUMNS = ["image_uri", "width", "height", "boxes", "scores", "labels", "error"]
_CHUNK = 1 << 18  # characters of text gathered before a streamed file is written to
_FILES_SCHEMA = pa.schema([("path", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string())])


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote."""

    format: str
    out_uri: str
    files: list[dict]  # {"path": relative to out_uri, "bytes", "sha256"}, sorted by path
    images: int  # images exported (rows without error)
    boxes: int  # boxes exported
    skipped_errors: int  # rows with an error (or no size): skipped
    renamed: int  # images whose flat name was made unique
    unnamed_boxes: int = 0  # boxes of a label the table names no class ("N/A"): left out


def export(
    parquet_uris: Sequence[str], out_uri: str, fmt: str, *, categories: Sequence[str],
    input_uri: str, model_version: str, min_score: float = 0.0, only: Sequence[str] = (),
    image_root: str | None = None, yolo_scores: bool = False,
) -> Exported:
    """Write the detections of ``parquet_uris`` (``DETECTION_SCHEMA`` files) under ``out_uri``
    in format ``fmt`` (one of :data:`FORMATS`).

    ``categories`` is the run's label table (``categories[label]`` names label id ``label``);
    ``input_uri`` the folder or prefix the images were listed under (names are relative to it).
    Boxes scoring below ``min_score`` or whose class is not in ``only`` (when given) are left
    out; images left with no box are still exported. ``image_root`` is the URL Label Studio
    serves the input folder at; ``yolo_scores`` adds a score column to YOLO labels.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if not np.isfinite(min_score):
        raise ConfigError(f"min_score must be a number, got {min_score!r}")
    classes = _classes(categories, only)
    job = _Job(categories=list(categories), classes=classes, model_version=model_version,
               names=_Names(input_uri), image_root=image_root, yolo_scores=yolo_scores,
               colliding=_colliding(parquet_uris) if fmt in _FLAT else frozenset())
    out = _Out(out_uri)
    writer = _WRITERS[fmt](out, job)
    counts = _Counts()
    try:
        for batch in _batches(parquet_uris, categories, classes, min_score, counts):
            writer.add(batch)
            out.flush()
        writer.finish()
        out.flush()
    except BaseException:
        writer.abort()
        raise
    return Exported(format=fmt, out_uri=out_uri, files=out.files(), images=counts.images,
                    boxes=counts.boxes, skipped_errors=counts.skipped, renamed=job.renamed,
                    unnamed_boxes=counts.unnamed)


# ---------------------------------------------------------------------------------------------
# Classes and names


def _classes(categories: Sequence[str], only: Sequence[str]) -> list[tuple[int, str]]:
    """(label id, name) of the exported classes, in label order."""
    real = [(i, name) for i, name in enumerate(categories) if name not in NOT_CLASSES]
    if not real:
        raise ConfigError("the label table names no class (only background and N/A entries)")
    if isinstance(only, str):
        only = (only,)
    if only:
        unknown = sorted(set(only) - {name for _, name in real})
        if unknown:
            raise ConfigError(f"unknown class name(s) {', '.join(map(repr, unknown))} in only: "
                              f"valid names are {', '.join(name for _, name in real)}")
        real = [(i, name) for i, name in real if name in set(only)]
    return real


def _escaped(path: str) -> str:
    """``path`` as it appears after ``file://`` in a local image URI (see
    ``storage.local_image_uri``): bytes that are not UTF-8 as ``%XX``, ``%`` as ``%25``."""
    uri = storage.local_image_uri(path)
    return uri[len(storage.FILE_URI):] if uri.startswith(storage.FILE_URI) else \
        path.replace("%", "%25")


class _Names:
    """Image paths relative to the input. A name that is not UTF-8 keeps its ``%XX`` escapes:
    JSON, XML and S3 keys all need text."""

    def __init__(self, input_uri: str) -> None:
        self.local = storage.is_local(input_uri)
        if self.local:
            root = os.path.abspath(storage.image_path(input_uri)).rstrip("/")
            self.plain, self.escaped = root + "/", _escaped(root) + "/"
        else:
            self.plain = self.escaped = input_uri.rstrip("/") + "/"

    def relative(self, image_uri: str) -> str | None:
        """The image's path under the input (forward slashes), None when it is not under it."""
        if self.local and image_uri.startswith(storage.FILE_URI):
            body = image_uri[len(storage.FILE_URI):]
            return body[len(self.escaped):] if body.startswith(self.escaped) else None
        return image_uri[len(self.plain):] if image_uri.startswith(self.plain) else None

    def name(self, image_uri: str) -> str:
        """The relative path, or the URI itself for an image listed elsewhere."""
        return self.relative(image_uri) or image_uri


def _base(image_uri: str) -> str:
    return image_uri.rpartition("/")[2]


def _flat_key(base: str) -> str:
    # YOLO and VOC pair an image with its label file by stem, and a case-insensitive disk
    # (macOS, Windows) merges names that differ by case: both make a clash.
    return posixpath.splitext(base)[0].casefold()


def _flat_name(image_uri: str, colliding: bool) -> str:
    """The image's name in a flat folder: its base name, or, when another exported image would
    take the same label file, ``stem__<8 hex of sha256(image_uri)>.ext`` (the same whatever
    else the run holds)."""
    base = _base(image_uri)
    if not colliding:
        return base
    stem, ext = posixpath.splitext(base)
    return f"{stem}__{hashlib.sha256(image_uri.encode()).hexdigest()[:8]}{ext}"


def _colliding(parquet_uris: Sequence[str]) -> frozenset[int]:
    """Hashes of the flat keys that more than one exported image has: a pass over the image
    URIs that keeps 8 bytes per image. Two keys sharing a 64-bit hash would only both be
    renamed, which stays unique and stable."""
    chunks = []
    for uri in parquet_uris:
        for batch in _record_batches(uri, ["image_uri", "width", "height", "error"]):
            uris = batch.column("image_uri").filter(pa.array(~_failed(batch))).to_pylist()
            chunks.append(np.fromiter((_key_hash(u) for u in uris), np.uint64, len(uris)))
    if not chunks:
        return frozenset()
    values, counts = np.unique(np.concatenate(chunks), return_counts=True)
    return frozenset(values[counts > 1].tolist())


def _key_hash(image_uri: str) -> int:
    key = _flat_key(_base(image_uri)).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


# ---------------------------------------------------------------------------------------------
# Reading


def _record_batches(uri: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if storage.is_local(uri):
        handle = open(storage.image_path(uri), "rb")  # noqa: SIM115 - closed below
    else:
        fs, path = storage.get_fs(uri)
        handle = fs.open(path, "rb")
    with handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=_BATCH_ROWS, columns=columns)


def _failed(batch: pa.RecordBatch) -> np.ndarray:
    """Rows to skip: an error, or no image size to place boxes in."""
    return (batch.column("error").is_valid().to_numpy(zero_copy_only=False)
            | batch.column("width").is_null().to_numpy(zero_copy_only=False)
            | batch.column("height").is_null().to_numpy(zero_copy_only=False))


def _flat(column: pa.Array) -> np.ndarray:
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


@dataclass
class _Counts:
    images: int = 0
    boxes: int = 0
    skipped: int = 0
    unnamed: int = 0


@dataclass
class _Batch:
    """The exported images of one record batch and their kept boxes (flat, image by image)."""

    uris: list[str]
    widths: list[int]
    heights: list[int]
    starts: list[int]  # image i's boxes are [starts[i], starts[i + 1])
    boxes: np.ndarray  # (n, 4) float64 xyxy pixels, inside the image
    box_w: np.ndarray  # (n,) the width and height of each box's image
    box_h: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    ordinal: np.ndarray  # each box's position in its row before filtering: stable ids


def _batches(parquet_uris: Sequence[str], categories: Sequence[str],
             classes: list[tuple[int, str]], min_score: float,
             counts: _Counts) -> Iterator[_Batch]:
    is_class = np.zeros(len(categories), bool)
    is_class[[i for i, name in enumerate(categories) if name not in NOT_CLASSES]] = True
    wanted = np.zeros(len(categories), bool)
    wanted[[i for i, _ in classes]] = True
    for uri in parquet_uris:
        for batch in _record_batches(uri, _COLUMNS):
            failed = _failed(batch)
            lengths = pc.list_value_length(batch.column("boxes")).to_numpy(zero_copy_only=False)
            boxes = pc.list_flatten(batch.column("boxes")).flatten().to_numpy(
                zero_copy_only=False).reshape(-1, 4).astype(np.float64)
            scores = _flat(batch.column("scores")).astype(np.float64)
            labels = _flat(batch.column("labels")).astype(np.int64)
            if not len(boxes) == len(scores) == len(labels):
                raise ValueError(f"{uri}: boxes, scores and labels differ in length")
            row = np.repeat(np.arange(batch.num_rows), lengths)
            live = ~failed[row]
            in_table = (labels >= 0) & (labels < len(categories))
            safe = np.where(in_table, labels, 0)
            bad = live & ~in_table
            if bad.any():
                label = int(labels[bad][0])
                raise ConfigError(
                    f"label id {label} of {uri} is not in the label table given "
                    f"({len(categories)} entries): export with the run's own categories")
            # A COCO model can predict an unused id ("N/A"): no tool has a class for it.
            counts.unnamed += int((live & ~is_class[safe]).sum())
            # A non-finite box has no place in any format (and would make JSON invalid).
            keep = live & (scores >= min_score) & wanted[safe] & np.isfinite(boxes).all(1)
            ordinal = np.arange(len(labels)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            ok = np.flatnonzero(~failed)
            widths = batch.column("width").fill_null(0).to_numpy().astype(np.int64)
            heights = batch.column("height").fill_null(0).to_numpy().astype(np.int64)
            kept_row = row[keep]
            box_w, box_h = widths[kept_row].astype(np.float64), heights[kept_row].astype(np.float64)
            xyxy = boxes[keep]
            # Tools reject (YOLO: the whole image's labels) a box reaching out of its image.
            np.clip(xyxy[:, 0::2], 0, box_w[:, None], out=xyxy[:, 0::2])
            np.clip(xyxy[:, 1::2], 0, box_h[:, None], out=xyxy[:, 1::2])
            per_image = np.bincount(kept_row, minlength=batch.num_rows)[ok]
            uris = batch.column("image_uri").to_pylist()
            counts.skipped += int(failed.sum())
            counts.images += len(ok)
            counts.boxes += int(keep.sum())
            yield _Batch(uris=[uris[i] for i in ok], widths=widths[ok].tolist(),
                         heights=heights[ok].tolist(),
                         starts=np.concatenate([[0], np.cumsum(per_image)]).tolist(),
                         boxes=xyxy, box_w=box_w, box_h=box_h, scores=scores[keep],
                         labels=labels[keep], ordinal=ordinal[keep])


# ---------------------------------------------------------------------------------------------
# Writing


class _Out:
    """The export folder: small files written directly (S3: a batch's files in one concurrent
    ``pipe``), large ones streamed; every file recorded with its size and sha256."""

    def __init__(self, out_uri: str) -> None:
        self.local = storage.is_local(out_uri)
        self.fs, root = storage.get_fs(out_uri)
        self.root = os.path.abspath(storage.image_path(out_uri)) if self.local else root
        self.pending: dict[str, bytes] = {}
        self.made: set[str] = set()
        self.listed: list[list[Any]] = [[], [], []]
        self.chunks: list[pa.RecordBatch] = []  # file records as Arrow, not Python objects

    def path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if self.local else f"{self.root}/{rel}"

    def folder(self, path: str) -> None:
        folder = os.path.dirname(path)
        if folder not in self.made:
            os.makedirs(folder, exist_ok=True)
            self.made.add(folder)

    def put(self, rel: str, data: bytes, sums: _Stream | None = None) -> None:
        """Write ``rel``; list it in ``sums`` (a per-image file: ``files()`` then holds one
        record per export, not per image) or else in ``files()``."""
        path = self.path(rel)
        if self.local:
            self.folder(path)
            with open(path, "wb") as handle:
                handle.write(data)
        else:
            self.pending[path] = data
        digest = hashlib.sha256(data).hexdigest()
        if sums is None:
            self.record(rel, len(data), digest)
        else:
            sums.write(f"{digest}  {rel}\n")

    def record(self, rel: str, size: int, digest: str) -> None:
        for column, value in zip(self.listed, (rel, size, digest)):
            column.append(value)

    def stream(self, rel: str) -> _Stream:
        return _Stream(self, rel)

    def flush(self) -> None:
        if self.pending:
            self.fs.pipe(self.pending)
            self.pending = {}
        if self.listed[0]:
            self.chunks.append(pa.record_batch(self.listed, schema=_FILES_SCHEMA))
            self.listed = [[], [], []]

    def files(self) -> list[dict]:
        self.flush()
        table = pa.Table.from_batches(self.chunks, _FILES_SCHEMA)
        return table.sort_by("path").to_pylist()


class _Stream:
    """One large output file written piece by piece; it appears complete or not at all (locally
    a temporary sibling renamed on close, on S3 a multipart upload completed on close)."""

    def __init__(self, out: _Out, rel: str) -> None:
        self.out, self.rel, self.final = out, rel, out.path(rel)
        if out.local:
            out.folder(self.final)
            self.tmp = f"{self.final}.tmp-{uuid.uuid4().hex}"
            self.handle = open(self.tmp, "wb")  # noqa: SIM115 - closed by close/abort
        else:
            self.handle = out.fs.open(self.final, "wb")
        self.digest = hashlib.sha256()
        self.size = 0
        self.parts: list[str] = []
        self.held = 0

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.held += len(text)
        if self.held >= _CHUNK:
            self._drain()

    def write_bytes(self, data: bytes) -> None:
        self._drain()
        self._emit(data)

    def _drain(self) -> None:
        if self.parts:
            self._emit("".join(self.parts).encode())
            self.parts, self.held = [], 0

    def _emit(self, data: bytes) -> None:
        self.digest.update(data)
        self.size += len(data)
        self.handle.write(data)

    def close(self) -> None:
        self._drain()
        self.handle.close()
        if self.out.local:
            os.replace(self.tmp, self.final)
        self.out.record(self.rel, self.size, self.digest.hexdigest())

    def abort(self) -> None:
        if self.out.local:
            self.handle.close()
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        elif not self.handle.closed:
            self.handle.discard()  # abandons the multipart upload: no partial object appears
            self.handle.closed = True


@dataclass
class _Job:
    categories: list[str]
    classes: list[tuple[int, str]]
    model_version: str
    names: _Names
    image_root: str | None
    yolo_scores: bool
    colliding: frozenset[int]
    renamed: int = 0

    def flat(self, image_uri: str) -> str:
        colliding = _key_hash(image_uri) in self.colliding
        self.renamed += colliding
        return _flat_name(image_uri, colliding)


class _Writer:
    def __init__(self, out: _Out, job: _Job) -> None:
        self.out, self.job = out, job
        self.streams: list[_Stream] = []

    def stream(self, rel: str) -> _Stream:
        self.streams.append(self.out.stream(rel))
        return self.streams[-1]

    def add(self, batch: _Batch) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        for stream in self.streams:
            stream.close()
        self.streams = []

    def abort(self) -> None:
        for stream in self.streams:
            stream.abort()


def _json(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Coco(_Writer):
    """``annotations.json`` (a COCO dataset; its images go through a temporary file so that
    both arrays stream) and ``results.json`` (what ``COCO.loadRes`` takes)."""

    def __init__(self, out: _Out, job: _Job) -> None:
        super().__init__(out, job)
        self.dataset, self.results = self.stream("annotations.json"), self.stream("results.json")
        self.images = tempfile.TemporaryFile()  # noqa: SIM115 - closed in finish/abort
        head = {"info": {"description": "detectflow detections",
                         "version": job.model_version},
                "licenses": [],
                "categories": [{"id": i, "name": name} for i, name in job.classes]}
        self.dataset.write(json.dumps(head, ensure_ascii=False)[:-1] + ',"annotations":[\n')
        self.results.write("[\n")
        self.image_id = self.ann_id = 0

    def add(self, batch: _Batch) -> None:
        ids = range(self.image_id + 1, self.image_id + 1 + len(batch.uris))
        images = [f'{{"id":{i},"file_name":{_json(self.job.names.name(uri))},'
                  f'"width":{w},"height":{h}}}'
                  for i, uri, w, h in zip(ids, batch.uris, batch.widths, batch.heights)]
        if images:
            self.images.write(((",\n" if self.image_id else "") + ",\n".join(images)).encode())
        counts = np.diff(batch.starts)
        image_ids = np.repeat(np.arange(self.image_id + 1, self.image_id + 1 + len(counts)),
                              counts).tolist()
        self.image_id += len(batch.uris)
        x1, y1, x2, y2 = batch.boxes.T
        w, h = x2 - x1, y2 - y1
        dets, results = [], []
        for image, label, x, y, bw, bh, score in zip(
                image_ids, batch.labels.tolist(), x1.tolist(), y1.tolist(), w.tolist(),
                h.tolist(), batch.scores.tolist()):
            self.ann_id += 1
            common = (f'"image_id":{image},"category_id":{label},'
                      f'"bbox":[{x:.3f},{y:.3f},{bw:.3f},{bh:.3f}]')
            dets.append(f'{{"id":{self.ann_id},{common},"area":{bw * bh:.3f},"iscrowd":0,'
                        f'"score":{score:.5f}}}')
            results.append(f'{{{common},"score":{score:.5f}}}')
        if dets:
            sep = ",\n" if self.ann_id > len(dets) else ""
            self.dataset.write(sep + ",\n".join(dets))
            self.results.write(sep + ",\n".join(results))

    def finish(self) -> None:
        self.dataset.write('\n],"images":[\n')
        self.images.seek(0)
        while block := self.images.read(_CHUNK):
            self.dataset.write_bytes(block)
        self.images.close()
        self.dataset.write("\n]}\n")
        self.results.write("\n]\n")
        super().finish()

    def abort(self) -> None:
        self.images.close()
        super().abort()


class _Flat(_Writer):
    """Shared by YOLO and VOC: one file per image, ``names.csv`` (export name, image URI) and
    ``SHA256SUMS`` (``sha256sum -c`` checks the per-image files; its own sha256 is listed)."""

    def __init__(self, out: _Out, job: _Job) -> None:
        super().__init__(out, job)
        self.names = self.stream("names.csv")
        self.names.write("name,image_uri\n")
        self.sums = self.stream("SHA256SUMS")

    def add(self, batch: _Batch) -> None:
        text = io.StringIO()
        rows = csv.writer(text, lineterminator="\n")
        for i, uri in enumerate(batch.uris):
            name = self.job.flat(uri)
            rows.writerow((name, uri))
            self.image(batch, i, name)
        self.names.write(text.getvalue())

    def image(self, batch: _Batch, i: int, name: str) -> None:
        raise NotImplementedError


class _Yolo(_Flat):
    """``labels/<stem>.txt`` per image (Ultralytics: ``class cx cy w h`` normalised, classes
    numbered 0.. over the exported ones) and ``data.yaml``."""

    def __init__(self, out: _Out, job: _Job) -> None:
        super().__init__(out, job)
        self.index = np.full(len(job.categories), -1, np.int64)
        self.index[[i for i, _ in job.classes]] = np.arange(len(job.classes))

    def add(self, batch: _Batch) -> None:
        x1, y1, x2, y2 = batch.boxes.T
        columns = [self.index[batch.labels].tolist(), ((x1 + x2) / 2 / batch.box_w).tolist(),
                   ((y1 + y2) / 2 / batch.box_h).tolist(), ((x2 - x1) / batch.box_w).tolist(),
                   ((y2 - y1) / batch.box_h).tolist()]
        if self.job.yolo_scores:
            self.lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f} {s:.6f}\n"
                          for c, cx, cy, w, h, s in zip(*columns, batch.scores.tolist())]
        else:
            self.lines = [f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n"
                          for c, cx, cy, w, h in zip(*columns)]
        super().add(batch)

    def image(self, batch: _Batch, i: int, name: str) -> None:
        text = "".join(self.lines[batch.starts[i]:batch.starts[i + 1]])
        self.out.put(f"labels/{posixpath.splitext(name)[0]}.txt", text.encode(), self.sums)

    def finish(self) -> None:
        import yaml

        # Ultralytics reads a relative train/val next to data.yaml, and finds an image's labels
        # by swapping images/ for labels/: the images go to images/<name> (see names.csv).
        data = {"train": "images", "val": "images", "nc": len(self.job.classes),
                "names": {i: name for i, (_, name) in enumerate(self.job.classes)}}
        text = ("# Images: copy each to images/<name> (names.csv maps names to image URIs).\n"
                + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        self.out.put("data.yaml", text.encode())
        super().finish()


class _Voc(_Flat):
    """``annotations/<stem>.xml`` per image (Pascal VOC; corners as the devkit's 1-based
    integer pixels, which every VOC reader takes)."""

    def __init__(self, out: _Out, job: _Job) -> None:
        super().__init__(out, job)
        self.xml_names = {i: escape(name) for i, name in enumerate(job.categories)}

    def add(self, batch: _Batch) -> None:
        x1, y1, x2, y2 = np.rint(batch.boxes.T)
        xmin, ymin = x1 + 1, y1 + 1  # the devkit counts pixels from 1, inclusive
        xmax, ymax = np.maximum(x2, xmin), np.maximum(y2, ymin)
        self.objects = [
            f"  <object>\n    <name>{self.xml_names[label]}</name>\n    <pose>Unspecified</pose>\n"
            f"    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
            f"    <bndbox>\n      <xmin>{a}</xmin>\n      <ymin>{b}</ymin>\n"
            f"      <xmax>{c}</xmax>\n      <ymax>{d}</ymax>\n    </bndbox>\n  </object>\n"
            for label, a, b, c, d in zip(batch.labels.tolist(), xmin.astype(int).tolist(),
                                         ymin.astype(int).tolist(), xmax.astype(int).tolist(),
                                         ymax.astype(int).tolist())]
        super().add(batch)

    def image(self, batch: _Batch, i: int, name: str) -> None:
        text = (f"<annotation>\n  <folder>images</folder>\n  <filename>{escape(name)}</filename>\n"
                f"  <path>{escape(batch.uris[i])}</path>\n"
                f"  <source>\n    <database>detectflow</database>\n  </source>\n"
                f"  <size>\n    <width>{batch.widths[i]}</width>\n"
                f"    <height>{batch.heights[i]}</height>\n    <depth>3</depth>\n  </size>\n"
                f"  <segmented>0</segmented>\n"
                + "".join(self.objects[batch.starts[i]:batch.starts[i + 1]])
                + "</annotation>\n")
        self.out.put(f"annotations/{posixpath.splitext(name)[0]}.xml", text.encode(), self.sums)


class _LabelStudio(_Writer):
    """``tasks.json`` (one task per image, its boxes as a prediction) and ``config.xml``."""

    def __init__(self, out: _Out, job: _Job) -> None:
        super().__init__(out, job)
        self.tasks = self.stream("tasks.json")
        self.tasks.write("[\n")
        self.written = 0
        self.names = {i: _json(name) for i, name in enumerate(job.categories)}
        self.version = _json(job.model_version)

    def url(self, image_uri: str) -> str:
        """Where Label Studio loads the image from: S3 as it is (its S3 storage reads it),
        a local image under ``image_root`` when given, else its ``file://`` URI."""
        if not storage.is_local(image_uri):
            scheme, rest = image_uri.split("://", 1)
            return f"{scheme}://{rest.removeprefix(storage.ANONYMOUS)}"
        rel = self.job.names.relative(image_uri)
        if self.job.image_root is not None and rel is not None:
            raw = unquote_to_bytes(rel) if image_uri.startswith(storage.FILE_URI) else rel.encode()
            return self.job.image_root.rstrip("/") + "/" + quote(raw, safe="/")
        return storage.FILE_URI + quote(os.fsencode(storage.image_path(image_uri)), safe="/")

    def add(self, batch: _Batch) -> None:
        x1, y1, x2, y2 = batch.boxes.T
        values = zip(batch.labels.tolist(), (100 * x1 / batch.box_w).tolist(),
                     (100 * y1 / batch.box_h).tolist(), (100 * (x2 - x1) / batch.box_w).tolist(),
                     (100 * (y2 - y1) / batch.box_h).tolist(), batch.scores.tolist(),
                     batch.ordinal.tolist())
        tasks = []
        for i, uri in enumerate(batch.uris):
            w, h = batch.widths[i], batch.heights[i]
            results, total = [], 0.0
            for label, x, y, bw, bh, score, ordinal in islice(
                    values, batch.starts[i + 1] - batch.starts[i]):
                total += score
                rid = hashlib.sha256(f"{uri}#{ordinal}".encode()).hexdigest()[:10]
                results.append(
                    f'{{"id":"{rid}","type":"rectanglelabels","from_name":"label",'
                    f'"to_name":"image","original_width":{w},"original_height":{h},'
                    f'"image_rotation":0,"value":{{"x":{x:.4f},"y":{y:.4f},"width":{bw:.4f},'
                    f'"height":{bh:.4f},"rotation":0,"rectanglelabels":[{self.names[label]}]}},'
                    f'"score":{score:.5f}}}')
            mean = total / len(results) if results else 0.0
            tasks.append(f'{{"data":{{"image":{_json(self.url(uri))}}},"predictions":[{{'
                         f'"model_version":{self.version},"score":{mean:.5f},'
                         f'"result":[{",".join(results)}]}}]}}')
        if tasks:
            self.tasks.write((",\n" if self.written else "") + ",\n".join(tasks))
            self.written += len(tasks)

    def finish(self) -> None:
        self.tasks.write("\n]\n")
        labels = "".join(f'    <Label value="{escape(name, {chr(34): "&quot;"})}"/>\n'
                         for _, name in self.job.classes)
        config = ('<View>\n  <Image name="image" value="$image"/>\n'
                  f'  <RectangleLabels name="label" toName="image">\n{labels}'
                  '  </RectangleLabels>\n</View>\n')
        self.out.put("config.xml", config.encode())
        super().finish()


_WRITERS: dict[str, type[_Writer]] = {"coco": _Coco, "yolo": _Yolo, "voc": _Voc,
                                      "labelstudio": _LabelStudio}

