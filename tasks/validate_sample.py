"""Stage 3: check a sample of results, draw their boxes, publish them as Prefect artifacts."""

import base64
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from detectflow import imaging, storage
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import ValidationFailed, output_errors
from detectflow.orchestration import retry_unless_user_error
from detectflow.pipeline import DetectStats
from detectflow.publish import run_paths
from detectflow.sample import check_row, draw, pick_sample
from detectflow.stages import Sample


@task(name="validate_sample", retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_user_error)
@output_errors("validate_sample")
def validate_sample(cfg: RunConfig, detected: DetectStats, spec: ModelSpec) -> Sample:
    start = time.perf_counter()
    logger = get_run_logger()
    rows = pick_sample([s["uri"] for s in detected.staged], cfg.sample_size)
    problems = [p for row in rows for p in check_row(row, spec.categories)]

    samples_uri = run_paths(cfg.run_uri)["samples"]
    saved, cards = [], []
    for row in rows:
        picture = draw(row)
        name = f"{row['index']:06d}-{storage.safe_name(row['image_uri'].rsplit('/', 1)[-1])}.png"
        storage.atomic_write_bytes(storage.join(samples_uri, name), imaging.encode_png(picture))
        saved.append(f"samples/{name}")
        thumb = base64.b64encode(imaging.thumbnail_jpeg(picture)).decode()
        found = ", ".join(sorted(set(row["label_names"]))) or "nothing"
        cards.append(f"**{row['image_uri'].rsplit('/', 1)[-1]}** — {len(row['boxes'])} boxes "
                     f"({found})\n\n![{name}](data:image/jpeg;base64,{thumb})\n")

    create_markdown_artifact(
        key="detection-samples",
        markdown=f"# Sample detections — run `{cfg.run_id}`\n\n" + "\n".join(cards),
        description=f"{len(rows)} sampled images with their boxes drawn",
    )
    create_table_artifact(
        key="detections-per-category",
        table=[{"category": k, "detections": v} for k, v in detected.class_counts().items()],
        description=f"Detections per category, run {cfg.run_id}",
    )
    if problems:
        raise ValidationFailed(
            f"{len(problems)} invalid result(s) in the sample, first: {problems[0]}"
        )
    logger.info("sample of %d image(s) is valid; drawn to %s", len(rows), samples_uri)
    return Sample(saved, len(rows), time.perf_counter() - start)
