"""Accuracy against ground truth: a COCO-format annotation file matched to a run's staged
detections and scored with faster-coco-eval's COCO evaluator (bbox AP/AR).

Pure functions, no Prefect or Ray. The staged shards are streamed twice (image URIs only, then
the detections of the matched images only), so memory grows with the labelled images, never with
the run; no image is ever read.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detectflow import storage
from detectflow.errors import ConfigError

LISTED = 20  # names kept per reported list: enough to see the pattern, bounded for 10^5 misses
# Entries of a torchvision category table that name no class.
NOT_CLASSES = frozenset({"__background__", "N/A"})
_BATCH_ROWS = 65_536  # rows per Parquet batch: bounds memory even for a very large shard
_DETECTION_COLUMNS = ["image_uri", "boxes", "scores", "labels", "error"]
_DIGITS = 6


class GroundTruthError(ConfigError):
    """The ground-truth file is unreadable, not COCO, or matches nothing in the run."""


@dataclass(frozen=True)
class GroundTruth:
    """A validated COCO annotation file."""

    uri: str
    sha256: str
    dataset: dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class ClassResult:
    """One evaluated category: the GT category, the model labels that carry its name."""

    name: str
    category_id: int
    labels: tuple[int, ...]
    gt_boxes: int
    detections: int
    ap: float | None  # AP@[.50:.95]; None when the class has no GT box in the evaluated images
    ap50: float | None


@dataclass
class Evaluation:
    """COCO bbox metrics of a run against a ground truth, and what could not be evaluated."""

    ground_truth: GroundTruth
    ap: float | None
    ap50: float | None
    ap75: float | None
    ar100: float | None
    per_class: list[ClassResult]
    gt_images: int
    matched_images: int
    gt_boxes: int
    detections: int
    score_threshold: float
    unmatched_count: int
    unmatched_images: list[str]  # GT file names not in the run (first LISTED)
    ambiguous_count: int
    ambiguous_images: list[str]  # GT file names whose base name fits several run images
    failed_count: int
    failed_images: list[str]  # image URIs of labelled images that failed (counted as misses)
    categories_not_in_model: list[str]
    evaluator: str
    # Per class with GT boxes: (recall thresholds, precision) at IoU 0.5, area all, 100 dets.
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def as_manifest(self) -> dict[str, Any]:
        """The JSON-serialisable summary (no curves)."""
        return {
            "ground_truth": {"uri": self.ground_truth.uri, "sha256": self.ground_truth.sha256},
            "evaluator": self.evaluator,
            "iou_type": "bbox",
            "score_threshold": _round(self.score_threshold),
            "metrics": {"AP": _round(self.ap), "AP50": _round(self.ap50),
                        "AP75": _round(self.ap75), "AR100": _round(self.ar100)},
            "gt_images": self.gt_images,
            "matched_images": self.matched_images,
            "gt_boxes": self.gt_boxes,
            "detections": self.detections,
            "unmatched_count": self.unmatched_count,
            "unmatched_images": list(self.unmatched_images),
            "ambiguous_count": self.ambiguous_count,
            "ambiguous_images": list(self.ambiguous_images),
            "failed_count": self.failed_count,
            "failed_images": list(self.failed_images),
            "categories_not_in_model": list(self.categories_not_in_model),
            "per_class": [
                {"name": c.name, "category_id": c.category_id, "labels": list(c.labels),
                 "gt_boxes": c.gt_boxes, "detections": c.detections,
                 "AP": _round(c.ap), "AP50": _round(c.ap50)}
                for c in self.per_class
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), _DIGITS)


# ---------------------------------------------------------------------------------------------
# Loading and validating the ground truth


class _Invalid(Exception):
    """A validation failure; its message becomes the tail of a GroundTruthError line."""


def load_ground_truth(uri: str) -> GroundTruth:
    """Read and check a COCO annotation JSON (local path or ``s3://``); fills in the ``area`` and
    ``iscrowd`` the evaluators need. Any problem is one :class:`GroundTruthError` line."""
    try:
        data = storage.read_bytes(uri)
    except Exception as exc:
        why = "is a directory" if isinstance(exc, IsADirectoryError) else storage.explain(exc)
        raise GroundTruthError(f"ground truth {uri}: cannot read: {why}") from None
    try:
        dataset = json.loads(data)
    except UnicodeDecodeError:
        raise GroundTruthError(f"ground truth {uri}: not JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise GroundTruthError(
            f"ground truth {uri}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    try:
        _validate(dataset)
    except _Invalid as exc:
        raise GroundTruthError(f"ground truth {uri}: {exc}") from None
    return GroundTruth(uri=uri, sha256=storage.sha256_bytes(data), dataset=dataset)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _records(dataset: dict[str, Any], key: str) -> list[dict[str, Any]]:
    if key not in dataset:
        raise _Invalid(f"missing key {key!r} (COCO needs images, annotations and categories)")
    records = dataset[key]
    if not isinstance(records, list):
        raise _Invalid(f"{key!r} must be a list, got {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise _Invalid(f"{key}[{i}] must be an object, got {_short(record)}")
    return records


def _validate(dataset: Any) -> None:
    if not isinstance(dataset, dict):
        raise _Invalid(f"expected a JSON object at the top, got {type(dataset).__name__}")
    images = _records(dataset, "images")
    annotations = _records(dataset, "annotations")
    categories = _records(dataset, "categories")

    image_ids: set[int] = set()
    names: dict[str, int] = {}
    for i, image in enumerate(images):
        if not _is_int(image.get("id")):
            raise _Invalid(f"images[{i}]: 'id' must be an integer, got {_short(image.get('id'))}")
        name = image.get("file_name")
        if not isinstance(name, str) or not name.strip():
            raise _Invalid(f"images[{i}] (id {image['id']}): 'file_name' must be a non-empty "
                           f"string, got {_short(name)}")
        if image["id"] in image_ids:
            raise _Invalid(f"images[{i}]: duplicate image id {image['id']}")
        image_ids.add(image["id"])
        key = _normalise(name)
        if key in names:
            raise _Invalid(f"images {names[key]} and {image['id']} have the same file_name "
                           f"{_short(name)}")
        names[key] = image["id"]

    category_ids: set[int] = set()
    category_names: set[str] = set()
    for i, category in enumerate(categories):
        if not _is_int(category.get("id")):
            raise _Invalid(f"categories[{i}]: 'id' must be an integer, "
                           f"got {_short(category.get('id'))}")
        name = category.get("name")
        if not isinstance(name, str) or not name:
            raise _Invalid(f"categories[{i}] (id {category['id']}): 'name' must be a non-empty "
                           f"string, got {_short(name)}")
        if category["id"] in category_ids:
            raise _Invalid(f"categories[{i}]: duplicate category id {category['id']}")
        # Categories are matched to the model's by name, so a name must say which one it is.
        if name in category_names:
            raise _Invalid(f"categories[{i}]: duplicate category name {name!r}")
        category_ids.add(category["id"])
        category_names.add(name)

    ids = [a.get("id") for a in annotations]
    renumber = not all(_is_int(i) for i in ids) or len(set(ids)) != len(ids)
    for i, ann in enumerate(annotations):
        where = f"annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in image_ids:
            raise _Invalid(f"{where}: 'image_id' {_short(ann.get('image_id'))} is not the id "
                           f"of an image")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            raise _Invalid(f"{where}: 'category_id' {_short(ann.get('category_id'))} is not the "
                           f"id of a category")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox))):
            raise _Invalid(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], "
                           f"got {_short(bbox)}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise _Invalid(f"{where}: 'bbox' {_short(bbox)} has a negative width or height")
        if not _is_number(ann.get("area")):
            ann["area"] = float(bbox[2]) * float(bbox[3])
        ann.setdefault("iscrowd", 0)
        # The evaluators index annotations by id; ours are never shown, so any unique ids do.
        if renumber:
            ann["id"] = i + 1


# ---------------------------------------------------------------------------------------------
# Matching GT images to the run's images


def _normalise(name: str) -> str:
    """A GT file name as a relative POSIX path (``./``, ``a//b`` and backslashes tidied)."""
    return posixpath.normpath(name.replace("\\", "/"))


def _root_prefix(input_uri: str) -> tuple[str, bool]:
    """What precedes an image's relative path in its (decoded) URI, and whether it is local."""
    local = storage.is_local(input_uri)
    root = storage.image_path(input_uri) if local else input_uri
    return root.rstrip("/") + "/", local


def _shard_batches(uri: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The shard's ``columns``, a bounded batch at a time."""
    if storage.is_local(uri):
        handle = open(uri.removeprefix(storage.FILE_URI), "rb")  # noqa: SIM115 - closed below
    else:
        fs, path = storage.get_fs(uri)
        handle = fs.open(path, "rb")
    with handle:
        for batch in pq.ParquetFile(handle).iter_batches(batch_size=_BATCH_ROWS,
                                                          columns=columns):
            # The detections table's files (delta-rs) hold strings as string_view.
            views = [i for i, f in enumerate(batch.schema) if pa.types.is_string_view(f.type)]
            for i in views:
                batch = batch.set_column(i, batch.schema.field(i).name,
                                         batch.column(i).cast(pa.string()))
            yield batch


@dataclass
class _Matches:
    to_gt: dict[str, int]  # image URI -> GT image id
    shard_uris: dict[int, set[str]]  # position in staged_uris -> matched URIs it holds
    unmatched: list[str]
    ambiguous: list[str]


def _match(images: list[dict[str, Any]], staged_uris: Sequence[str], input_uri: str) -> _Matches:
    """Stream the shards' ``image_uri`` column and pair GT images with run images: exact relative
    path first, else a base name that exactly one run image has."""
    prefix, local = _root_prefix(input_uri)
    by_path: dict[str, int] = {}
    clashes: set[int] = set()  # a GT name given twice (relative and absolute): never guess
    for image in images:
        name = image["file_name"]
        name = name[len(prefix):] if name.startswith(prefix) else name
        key = _normalise(name)
        if key in by_path:
            clashes.add(image["id"])
        else:
            by_path[key] = image["id"]
    bases = {posixpath.basename(key) for key in by_path}

    exact: dict[int, tuple[str, int]] = {}
    # Base name -> [first run URI with it, its shard, whether another run URI has it too].
    seen: dict[str, list[Any]] = {}
    for shard, uri in enumerate(staged_uris):
        for batch in _shard_batches(uri, ["image_uri"]):
            for image_uri in batch.column(0).to_pylist():
                path = storage.image_path(image_uri) if local else image_uri
                rel = path[len(prefix):] if path.startswith(prefix) else None
                if rel is not None and rel in by_path:
                    exact.setdefault(by_path[rel], (image_uri, shard))
                base = path.rpartition("/")[2]
                if base in bases:
                    entry = seen.get(base)
                    if entry is None:
                        seen[base] = [image_uri, shard, False]
                    elif entry[0] != image_uri:
                        entry[2] = True

    found: dict[int, tuple[str, int]] = dict(exact)
    claimed = {uri for uri, _ in exact.values()}
    by_base: dict[str, tuple[int, list[int]]] = {}  # run URI -> (shard, GT ids naming it)
    ambiguous_ids = set(clashes)
    for key, gt_id in by_path.items():
        entry = seen.get(posixpath.basename(key))
        if gt_id in exact or entry is None:
            continue
        if entry[2]:
            ambiguous_ids.add(gt_id)
        elif entry[0] not in claimed:  # else its one candidate is another GT image's: unmatched
            by_base.setdefault(entry[0], (entry[1], []))[1].append(gt_id)
    for image_uri, (shard, gt_ids) in by_base.items():
        if len(gt_ids) > 1:  # several GT images would share one run image
            ambiguous_ids.update(gt_ids)
        else:
            found[gt_ids[0]] = (image_uri, shard)

    to_gt: dict[str, int] = {}
    shard_uris: dict[int, set[str]] = {}
    for gt_id, (image_uri, shard) in found.items():
        to_gt[image_uri] = gt_id
        shard_uris.setdefault(shard, set()).add(image_uri)
    unmatched = [im["file_name"] for im in images
                 if im["id"] not in found and im["id"] not in ambiguous_ids]
    ambiguous = [im["file_name"] for im in images if im["id"] in ambiguous_ids]
    return _Matches(to_gt, shard_uris, unmatched, ambiguous)


def _detections(
    matches: _Matches, staged_uris: Sequence[str], label_to_category: np.ndarray,
    score_threshold: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """COCO results (xywh) of the matched images in the evaluated categories, and the URIs of
    matched images that failed; only shards holding a matched image are read."""
    detections: list[dict[str, Any]] = []
    failed: list[str] = []
    done: set[str] = set()  # a row staged twice counts once
    for shard in sorted(matches.shard_uris):
        value_set = pa.array(sorted(matches.shard_uris[shard]), pa.string())
        for batch in _shard_batches(staged_uris[shard], _DETECTION_COLUMNS):
            part = batch.filter(pc.is_in(batch.column("image_uri"), value_set=value_set))
            if not part.num_rows:
                continue
            row_image = np.full(part.num_rows, -1, np.int64)
            for row, (uri, error) in enumerate(zip(part.column("image_uri").to_pylist(),
                                                   part.column("error").to_pylist())):
                if uri in done:
                    continue
                done.add(uri)
                if error:
                    failed.append(uri)  # stays in the evaluated images: a miss, not a skip
                else:
                    row_image[row] = matches.to_gt[uri]
            labels_column = part.column("labels")
            labels = labels_column.flatten().to_numpy(zero_copy_only=False)
            scores = part.column("scores").flatten().to_numpy(zero_copy_only=False)
            boxes = part.column("boxes").flatten().flatten().to_numpy(zero_copy_only=False)
            if not (len(labels) == len(scores) == len(boxes) // 4):
                raise ValueError(f"{staged_uris[shard]}: boxes, scores and labels differ in length")
            if not len(labels):
                continue
            rows = pc.list_parent_indices(labels_column).to_numpy(zero_copy_only=False)
            known = (labels >= 0) & (labels < len(label_to_category))
            category = np.where(known, label_to_category[np.where(known, labels, 0)], -1)
            image = row_image[rows]
            # Compared in float32, as stored: rounding is monotonic, so no kept score is lost.
            keep = (image >= 0) & (category >= 0) & (scores >= np.float32(score_threshold))
            x1, y1, x2, y2 = boxes.reshape(-1, 4)[keep].astype(np.float64).T
            detections.extend(
                {"image_id": i, "category_id": c, "bbox": [a, b, w, h], "score": s}
                for i, c, a, b, w, h, s in zip(
                    image[keep].tolist(), category[keep].tolist(), x1.tolist(), y1.tolist(),
                    (x2 - x1).tolist(), (y2 - y1).tolist(),
                    scores[keep].astype(np.float64).tolist()))
    return detections, failed


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """The evaluator's progress messages: not for the run's log."""


def _evaluator_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faster-coco-eval")
    except PackageNotFoundError:
        import faster_coco_eval

        return str(getattr(faster_coco_eval, "__version__", "unknown"))


def _metric(value: float) -> float | None:
    """The evaluator's -1 (nothing to measure) as None."""
    return None if value is None or value < 0 else float(value)


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else None


def evaluate(
    gt: GroundTruth,
    staged_uris: Sequence[str],
    input_uri: str,
    categories: Sequence[str],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
) -> Evaluation:
    """COCO bbox metrics of the staged detections against ``gt``.

    ``categories`` is the run's label table (``categories[label]``); GT categories are matched to
    it by name, restricted to ``class_names`` when given. ``score_threshold`` is the one the
    detections were written at (detections below it are ignored). Raises GroundTruthError when no
    GT category is a model category or no GT image is in the run.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    dataset = gt.dataset
    wanted = None if class_names is None else set(class_names)
    model_labels: dict[str, list[int]] = {}
    for label, name in enumerate(categories):
        if label > 0 and name not in NOT_CLASSES:
            model_labels.setdefault(name, []).append(label)
    evaluated: list[tuple[dict[str, Any], tuple[int, ...]]] = []
    not_in_model: list[str] = []
    for category in dataset["categories"]:
        if wanted is not None and category["name"] not in wanted:
            continue
        labels = model_labels.get(category["name"])
        if labels:
            evaluated.append((category, tuple(labels)))
        else:
            not_in_model.append(category["name"])
    if not evaluated:
        names = [c["name"] for c in dataset["categories"]]
        among = "" if wanted is None else f" selected by {sorted(wanted)}"
        raise GroundTruthError(f"ground truth {gt.uri}: none of its categories "
                               f"{_short(names[:LISTED], 200)} is a model category{among}")

    matches = _match(dataset["images"], staged_uris, input_uri)
    if not matches.to_gt:
        raise GroundTruthError(
            f"ground truth {gt.uri}: none of its {len(dataset['images'])} images is in the run "
            f"under {input_uri} (first file names: {_short(matches.unmatched[:3], 200)}"
            + (f"; {len(matches.ambiguous)} ambiguous by base name)" if matches.ambiguous else ")"))

    label_to_category = np.full(max(len(categories), 1), -1, np.int64)
    for category, labels in evaluated:
        label_to_category[list(labels)] = category["id"]
    detections, failed = _detections(matches, staged_uris, label_to_category, score_threshold)

    image_ids = set(matches.to_gt.values())
    category_ids = {category["id"] for category, _ in evaluated}
    # Copies: the evaluator writes flags into the annotations it is given.
    images = [dict(im) for im in dataset["images"] if im["id"] in image_ids]
    annotations = [dict(a) for a in dataset["annotations"]
                   if a["image_id"] in image_ids and a["category_id"] in category_ids]
    coco_categories = [dict(category) for category, _ in evaluated]
    coco_gt = COCO({"images": images, "annotations": annotations,
                    "categories": coco_categories}, print_function=_quiet)
    if detections:
        coco_dt = coco_gt.loadRes(detections)
    else:  # loadRes rejects an empty list in some versions; an empty result set is valid
        coco_dt = COCO({"images": images, "annotations": [], "categories": coco_categories},
                       print_function=_quiet)
    coco_eval = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_quiet)
    coco_eval.params.imgIds = sorted(image_ids)
    coco_eval.params.catIds = sorted(category_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()

    params = coco_eval.params
    precision = np.asarray(coco_eval.eval["precision"])  # [IoU, recall, class, area, maxDets]
    iou50 = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    area_all = list(params.areaRngLbl).index("all")
    recall_points = np.asarray(params.recThrs, np.float64)
    gt_boxes = Counter(a["category_id"] for a in annotations)
    det_counts = Counter(d["category_id"] for d in detections)
    by_id = {category["id"]: (category, labels) for category, labels in evaluated}
    per_class: list[ClassResult] = []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, category_id in enumerate(params.catIds):
        category, labels = by_id[int(category_id)]
        at50 = precision[iou50, :, k, area_all, -1]
        per_class.append(ClassResult(
            name=category["name"], category_id=int(category_id), labels=labels,
            gt_boxes=gt_boxes[category["id"]], detections=det_counts[category["id"]],
            ap=_mean_valid(precision[:, :, k, area_all, -1]), ap50=_mean_valid(at50)))
        if (at50 > -1).any():
            curves[category["name"]] = (recall_points.copy(), at50.astype(np.float64))

    stats = coco_eval.stats
    return Evaluation(
        ground_truth=gt,
        ap=_metric(stats[0]), ap50=_metric(stats[1]), ap75=_metric(stats[2]),
        ar100=_metric(stats[8]),
        per_class=per_class,
        gt_images=len(dataset["images"]),
        matched_images=len(image_ids),
        gt_boxes=len(annotations),
        detections=len(detections),
        score_threshold=float(score_threshold),
        unmatched_count=len(matches.unmatched),
        unmatched_images=matches.unmatched[:LISTED],
        ambiguous_count=len(matches.ambiguous),
        ambiguous_images=matches.ambiguous[:LISTED],
        failed_count=len(failed),
        failed_images=failed[:LISTED],
        categories_not_in_model=not_in_model,
        evaluator=f"faster-coco-eval {_evaluator_version()}",
        curves=curves,
    )


def pr_curves(evaluation: Evaluation) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per class with GT boxes: (recall, precision) at IoU 0.5 (area all, 100 detections)."""
    return dict(evaluation.curves)


# ---------------------------------------------------------------------------------------------
# Drawing a precision-recall curve (Pillow only: matplotlib is not a dependency)

PNG_SIZE = (480, 360)


def _place(pen: Any, xy: tuple[float, float], text: str, font: Any, how: str,
           fill: str = "black") -> None:
    """Draw ``text`` with ``xy`` at its top centre ("top"), right middle ("right") or centre;
    measured by hand because a bitmap fallback font supports no anchors."""
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    x, y = xy
    if how == "top":
        x -= width / 2
    elif how == "right":
        x, y = x - width, y - height / 2
    else:
        x, y = x - width / 2, y - height / 2
    pen.text((x - left, y - top), text, font=font, fill=fill)


def pr_curve_png(name: str, recall: np.ndarray, precision: np.ndarray,
                 ap50: float | None) -> bytes:
    """A small PNG of one class's precision-recall curve, titled ``"<name>: AP50 0.912"``."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = PNG_SIZE
    x0, y0, x1, y1 = 56, 36, width - 18, height - 46  # the plot area
    image = Image.new("RGB", PNG_SIZE, "white")
    pen = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=12)

    def at(r: float, p: float) -> tuple[float, float]:
        return x0 + r * (x1 - x0), y1 - p * (y1 - y0)

    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        gx, gy = at(tick, tick)
        pen.line([(gx, y0), (gx, y1)], fill=(228, 228, 228))
        pen.line([(x0, gy), (x1, gy)], fill=(228, 228, 228))
        _place(pen, (gx, y1 + 5), f"{tick:g}", font, "top")
        _place(pen, (x0 - 6, gy), f"{tick:g}", font, "right")
    pen.rectangle([x0, y0, x1, y1], outline="black")
    _place(pen, ((x0 + x1) / 2, height - 20), "recall", font, "top")
    label = Image.new("RGB", (70, 16), "white")
    _place(ImageDraw.Draw(label), (35, 8), "precision", font, "centre")
    image.paste(label.rotate(90, expand=True), (4, (y0 + y1) // 2 - 35))

    r = np.clip(np.asarray(recall, np.float64), 0.0, 1.0)
    p = np.asarray(precision, np.float64)
    valid = p > -1  # the evaluator's -1: recall levels with nothing to measure
    points = [at(a, b) for a, b in zip(r[valid].tolist(), np.clip(p[valid], 0, 1).tolist())]
    if len(points) > 1:
        pen.line(points, fill=(31, 119, 180), width=2)
    elif points:
        (px, py), = points
        pen.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(31, 119, 180))

    title = f"{name}: AP50 " + ("n/a" if ap50 is None else f"{ap50:.3f}")
    _place(pen, (width / 2, 10), title, ImageFont.load_default(size=14), "top")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
