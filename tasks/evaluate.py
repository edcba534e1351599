"""Stage 3, with ground truth: score every labelled image's detections with a COCO evaluator."""

import base64
import json
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from detectflow import storage
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import output_errors
from detectflow.evaluation import evaluate as score
from detectflow.evaluation import load_ground_truth, pr_curve_png
from detectflow.orchestration import retry_unless_user_error
from detectflow.pipeline import DetectStats
from detectflow.publish import run_paths
from detectflow.stages import Listing, Scored
from detectflow.table import partition_files, table_uri


@task(name="evaluate", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("evaluate")
def evaluate(cfg: RunConfig, detected: DetectStats, spec: ModelSpec, listing: Listing) -> Scored:
    start = time.perf_counter()
    logger = get_run_logger()
    sources = [s["uri"] for s in detected.staged]
    planned = listing.incremental or {}
    if planned.get("skipped") and planned.get("table_version") is not None:
        # An incremental run's skipped images were detected by this model before: their rows
        # are in the table version the run was planned against (this run's own rows come first,
        # so an image detected again is scored by its new row).
        sources += partition_files(table_uri(cfg.output_uri), spec.fingerprint(cfg),
                                   planned["table_version"])
    result = score(load_ground_truth(cfg.ground_truth), sources,
                   cfg.input_uri, spec.categories,
                   [spec.categories[i] for i in spec.keep] or None, cfg.score_threshold)
    summary = result.as_manifest()
    folder = run_paths(cfg.run_uri)["evaluation"]
    plots, cards = [], []
    for c in result.per_class:
        if c.name not in result.curves:
            continue
        recall, precision = result.curves[c.name]
        png = pr_curve_png(c.name, recall, precision, c.ap50)
        name = f"pr-{c.category_id:03d}-{storage.safe_name(c.name)}.png"
        storage.atomic_write_bytes(storage.join(folder, name), png)
        plots.append(f"evaluation/{name}")
        cards.append(f"![{c.name}](data:image/png;base64,{base64.b64encode(png).decode()})")
    storage.atomic_write_bytes(storage.join(folder, "evaluation.json"),
                               json.dumps(summary, indent=2).encode())

    metrics = summary["metrics"]
    create_table_artifact(
        key="evaluation",
        table=[{"class": "all", **metrics, "gt_boxes": result.gt_boxes,
                "detections": result.detections}]
        + [{"class": c["name"], "AP": c["AP"], "AP50": c["AP50"], "gt_boxes": c["gt_boxes"],
            "detections": c["detections"]} for c in summary["per_class"]],
        description=f"COCO AP of run {cfg.run_id} on {result.matched_images} labelled images "
                    f"(detections kept at score >= {cfg.score_threshold:g})",
    )
    if cards:
        create_markdown_artifact(
            key="precision-recall",
            markdown=f"# Precision-recall at IoU 0.5 — run `{cfg.run_id}`\n\n"
                     + "\n\n".join(cards),
            description="Precision against recall per class, IoU 0.5",
        )
    logger.info("AP@[.50:.95] %s, AP50 %s, AP75 %s, AR@100 %s on %d labelled image(s)",
                metrics["AP"], metrics["AP50"], metrics["AP75"], metrics["AR100"],
                result.matched_images)
    if result.unmatched_count:
        logger.warning("%d ground-truth image(s) are not in the run, e.g. %s",
                       result.unmatched_count, ", ".join(result.unmatched_images[:3]))
    if result.failed_count:
        logger.warning("%d labelled image(s) failed and count as misses, e.g. %s",
                       result.failed_count, ", ".join(result.failed_images[:3]))
    return Scored(summary, plots, time.perf_counter() - start)
