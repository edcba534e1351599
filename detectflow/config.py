"""The one typed run configuration.

Every knob the CLI, the flow's parameters (and so the Prefect UI form) and the library share is
declared here once, as an ``Annotated`` type with its constraints, so that a bad value is refused
with the field's name before any work starts.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from detectflow.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_IMAGES = REPO_ROOT / "data" / "sample_images"
DEFAULT_MODEL = "fasterrcnn_resnet50_fpn_v2"
DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

ModelName = Literal[
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "fcos_resnet50_fpn",
    "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
]
InputUri = Annotated[
    str, Field(min_length=1, description="Folder or s3://bucket/prefix holding the images.")
]
OutputUri = Annotated[
    str, Field(min_length=1, description="Folder or s3:// prefix; the run writes <output>/<run_id>/.")
]
WeightsUri = Annotated[
    str | None,
    Field(description="Local .pth path or s3:// URI; empty = torchvision's pretrained weights."),
]
ScoreThreshold = Annotated[
    float, Field(ge=0.0, le=1.0, description="Keep detections scoring at least this.")
]
BatchSize = Annotated[
    int | None,
    Field(ge=1, le=1024,
          description="Images per inference call; empty = 16 per GPU actor, 4 per CPU actor."),
]
Extensions = Annotated[
    list[str], Field(min_length=1, description="File extensions to include (case-insensitive).")
]
ImageLimit = Annotated[int | None, Field(ge=1, description="Process only the first N images.")]
RunId = Annotated[
    str | None,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Names the output folder; re-using one resumes or re-reads that run.",
    ),
]
RayAddress = Annotated[
    str | None, Field(description="Existing Ray cluster (ray://host:10001 or auto); empty = local.")
]
S3EndpointUrl = Annotated[
    str | None,
    Field(
        pattern=r"^https?://[^\s@]+$",
        description="S3-compatible endpoint (MinIO, Ceph, R2); empty = AWS_ENDPOINT_URL(_S3) or AWS.",
    ),
]
NumActors = Annotated[
    int | None, Field(ge=1, description="Inference actors; empty = one per GPU, or 1 on CPU.")
]
MaxActors = Annotated[
    int | None,
    Field(ge=1, description="Let the actor pool grow up to N (num_actors, or 1, is the minimum)."),
]
GpusPerActor = Annotated[float, Field(ge=0.0, le=8.0, description="GPUs each actor reserves.")]
CpusPerActor = Annotated[
    float | None,
    Field(gt=0.0, le=256.0,
          description="CPUs each CPU actor reserves; empty = one actor per core on one machine."),
]
SampleSize = Annotated[int, Field(ge=0, le=64, description="Images drawn for validation.")]
FailureFraction = Annotated[
    float,
    Field(ge=0.0, le=1.0, description="Mark the run Failed (after writing) above this share of bad images."),
]
ShardSize = Annotated[
    int,
    Field(ge=1, le=1_000_000,
          description="Images per shard: the unit of output files and of resuming a run."),
]
Device = Literal["auto", "cuda", "cpu"]
Precision = Annotated[
    Literal["fp32", "bf16", "fp16"],
    Field(description="Inference precision: fp32, or bf16/fp16 autocast (GPUs; boxes match fp32 "
                      "within the tolerance README states)."),
]
GpuDecode = Annotated[
    bool,
    Field(description="GPU actors decode plain JPEGs themselves with nvJPEG (CPU tasks only read "
                      "the bytes); other images are decoded on CPU as usual."),
]
ChannelsLast = Annotated[
    bool | None,
    Field(description="Run the model in the channels-last (NHWC) layout that tensor cores and "
                      "oneDNN's CPU kernels read natively: faster; boxes move by float rounding. "
                      "Empty (default): on for CPU actors, off for GPU actors."),
]
FoldBatchNorm = Annotated[
    bool | None,
    Field(description="Fold each batch norm into the convolution before it once the weights are "
                      "loaded: the same function without the norm's pass over the activations; "
                      "boxes move by float rounding. Empty (default): on for CPU actors, off for "
                      "GPU actors."),
]
KeepFreedMemory = Annotated[
    bool,
    Field(description="CPU actors and decode tasks keep freed memory in glibc's heap for the "
                      "next batch instead of returning every block to the kernel (mallopt; "
                      "detectflow/allocator.py): 1.15x on the small model's bare loop, 1.38x on "
                      "decoding, same results."),
]
GpuStreams = Annotated[
    int,
    Field(ge=1, le=8,
          description="Batches each GPU actor runs at once, each on its own CUDA stream: one "
                      "batch's serial steps (NMS) overlap another's convolutions (2: 1.26x on "
                      "an H200, same boxes)."),
]


def new_run_id() -> str:
    """Sortable by time, unique enough for concurrent runs into one prefix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


class RunConfig(BaseModel):
    """Everything one run needs; defaults run the bundled sample images out of the box."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    input_uri: InputUri = str(SAMPLE_IMAGES)
    output_uri: OutputUri = "output"
    model: ModelName = DEFAULT_MODEL
    weights: WeightsUri = None
    score_threshold: ScoreThreshold = 0.5
    batch_size: BatchSize = None
    limit: ImageLimit = None
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS
    run_id: RunId = None
    ray_address: RayAddress = None
    s3_endpoint_url: S3EndpointUrl = None
    device: Device = "auto"
    precision: Precision = "fp32"
    gpu_decode: GpuDecode = False
    channels_last: ChannelsLast = None  # None: on for CPU actors (predictor.model_tuning)
    fold_batchnorm: FoldBatchNorm = None
    gpu_streams: GpuStreams = 2
    keep_freed_memory: KeepFreedMemory = True
    num_actors: NumActors = None
    max_actors: MaxActors = None
    gpus_per_actor: GpusPerActor = 1.0
    cpus_per_actor: CpusPerActor = None
    decode_cpus: Annotated[float, Field(gt=0.0, le=64.0)] = 1.0
    max_image_side: Annotated[int, Field(ge=64, le=65536)] = 4096
    object_store_mib: Annotated[int | None, Field(ge=0)] = None  # None: sized from the pool
    shard_size: ShardSize = 1000
    sample_size: SampleSize = 4
    max_failure_fraction: FailureFraction = 0.1

    @field_validator("input_uri", "output_uri")
    @classmethod
    def _absolute_local_paths(cls, value: str) -> str:
        # Ray workers may run in another working directory: pin local paths now.
        if "://" in value:
            return value.rstrip("/")
        return str(Path(value).expanduser().resolve())

    @field_validator("weights")
    @classmethod
    def _weights_path(cls, value: str | None) -> str | None:
        if not value:
            return None
        if "://" in value:
            return value
        return str(Path(value).expanduser().resolve())

    @field_validator("extensions", mode="before")
    @classmethod
    def _normalise_extensions(cls, value: object) -> tuple[str, ...]:
        if value is None:  # "not given" from the flow's form or the CLI
            return DEFAULT_EXTENSIONS
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        exts = tuple(sorted({("." + str(v).lower().lstrip(".")) for v in value}))  # type: ignore[union-attr]
        if not exts:
            raise ValueError("at least one extension is needed")
        return exts

    def with_run_id(self) -> RunConfig:
        """A copy with a concrete run id, generated when none was given."""
        return self if self.run_id else self.model_copy(update={"run_id": new_run_id()})

    @property
    def run_uri(self) -> str:
        if not self.run_id:
            raise ConfigError("run_id is not set yet")
        return f"{self.output_uri}/{self.run_id}"


DEFAULTS = {name: field.default for name, field in RunConfig.model_fields.items()}


def parse_config(**params: object) -> RunConfig:
    """Build a RunConfig, turning pydantic's multi-line report into one readable line."""
    from pydantic import ValidationError

    try:
        return RunConfig(**params)  # type: ignore[arg-type]
    except ValidationError as exc:
        parts = [
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError("invalid parameter " + "; ".join(parts)) from None
