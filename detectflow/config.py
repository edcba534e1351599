"""The one typed run configuration.

Every knob is declared here once, as a field of ``RunConfig``: its type, constraints, default and
one-line description. The command line (``cli.add_config_options``), the flow's parameters and so
the Prefect UI form (``flow_signature``), the manifest's ``parameters`` (``model_dump``) and the
resume fingerprint (fields marked ``Knob(results=True)``) all follow from it, so adding a knob
is one edit here. A bad value is refused with the field's name before any work starts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo

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
ExportFormat = Literal["coco", "yolo", "voc", "labelstudio"]
# Your own architecture: ``package.module:factory``, called with ``num_classes``.
FactoryRef = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]


@dataclass(frozen=True)
class Knob:
    """What a field means beyond its value: its command-line flag (default ``--field-name``),
    whether it belongs to the advanced options, and whether it changes detections (then it is
    part of the resume fingerprint)."""

    flag: str | None = None
    advanced: bool = False
    results: bool = False


ADVANCED = Knob(advanced=True)
RESULTS = Knob(results=True)


def new_run_id() -> str:
    """Sortable by time, unique enough for concurrent runs into one prefix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


class RunConfig(BaseModel):
    """Everything one run needs; defaults run the bundled sample images out of the box."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True,
                              allow_inf_nan=False)

    input_uri: Annotated[str, Knob(flag="--input"), Field(
        min_length=1, description="Folder or s3://bucket/prefix holding the images.",
    )] = str(SAMPLE_IMAGES)
    output_uri: Annotated[str, Knob(flag="--output"), Field(
        min_length=1, description="Folder or s3:// prefix; the run writes <output>/<run_id>/.",
    )] = "output"
    model: Annotated[ModelName | FactoryRef, RESULTS, Field(
        description="torchvision detector architecture, or package.module:factory for your "
                    "own (called with num_classes).",
    )] = DEFAULT_MODEL
    weights: Annotated[str | None, RESULTS, Field(
        description="Local .pth path or s3:// URI; empty = torchvision's pretrained weights.",
    )] = None
    classes: Annotated[str | None, RESULTS, Field(
        description="Class names for labels 1, 2, ...: a text file (one per line), a JSON list "
                    "or COCO annotations; empty = those the weights carry.",
    )] = None
    only: Annotated[tuple[str, ...], RESULTS, Field(
        description="Keep only these classes (comma-separated on the command line); "
                    "empty = all.",
    )] = ()
    ground_truth: Annotated[str | None, Field(
        description="COCO annotations (file or s3:// URI) of some input images: the run's "
                    "detections are evaluated against them.",
    )] = None
    min_map: Annotated[float | None, Field(
        ge=0.0, le=1.0, description="Mark the run Failed (after writing) when its AP@[.50:.95] "
                                    "against the ground truth is below this.",
    )] = None
    exports: Annotated[tuple[ExportFormat, ...], Field(
        description="Also write the detections in these formats under <run>/exports/ "
                    "(comma-separated on the command line).",
    )] = ()
    incremental: Annotated[bool, Field(
        description="Detect only images that no earlier run under this output detected with "
                    "the same model, or that changed since; the rest are in <output>/table/.",
    )] = False
    score_threshold: Annotated[float, RESULTS, Field(
        ge=0.0, le=1.0, description="Keep detections scoring at least this.",
    )] = 0.5
    batch_size: Annotated[int | None, Field(
        ge=1, le=1024, description="Images per inference call; empty = 16 per GPU actor, 4 per "
                                   "CPU actor.",
    )] = None
    limit: Annotated[int | None, Field(
        ge=1, description="Process only the first N images.",
    )] = None
    extensions: Annotated[tuple[str, ...], Field(
        min_length=1, description="File extensions to include (case-insensitive; "
                                  "comma-separated on the command line).",
    )] = DEFAULT_EXTENSIONS
    run_id: Annotated[str | None, Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="Names the output folder; re-using one resumes or re-reads that run.",
    )] = None
    wait: Annotated[bool, Field(
        description="When another run holds the same run id, wait for it instead of failing.",
    )] = False
    ray_address: Annotated[str | None, Field(
        description="Existing Ray cluster (ray://host:10001 or auto); empty = RAY_ADDRESS, "
                    "else a local Ray.",
    )] = None
    s3_endpoint_url: Annotated[str | None, Field(
        pattern=r"^https?://[^\s@]+$",
        description="S3-compatible endpoint (MinIO, Ceph, R2); empty = AWS_ENDPOINT_URL(_S3) "
                    "or AWS.",
    )] = None
    device: Annotated[Literal["auto", "cuda", "cpu"], Field(
        description="Where the inference actors run; auto = GPUs when the cluster has them.",
    )] = "auto"
    precision: Annotated[Literal["fp32", "bf16", "fp16"], RESULTS, Field(
        description="Inference precision: fp32, or bf16/fp16 autocast on GPUs.",
    )] = "fp32"
    sample_size: Annotated[int, Field(
        ge=0, le=64, description="Images drawn with their boxes for validation.",
    )] = 4
    max_failure_fraction: Annotated[float, Field(
        ge=0.0, le=1.0, description="Mark the run Failed (after writing) above this share of "
                                    "unreadable images.",
    )] = 0.1
    shard_size: Annotated[int, Field(
        ge=1, le=1_000_000, description="Images per output file: the unit of resuming a run.",
    )] = 1000
    # Advanced: the pool, the model's layout and the cluster; the defaults suit most runs.
    num_actors: Annotated[int | None, ADVANCED, Field(
        ge=1, description="Inference actors; empty = one per GPU, or one per core on one "
                          "CPU-only machine, never more than the images can keep busy.",
    )] = None
    max_actors: Annotated[int | None, ADVANCED, Field(
        ge=1, description="Let the actor pool grow up to N (num_actors, or 1, is the minimum).",
    )] = None
    gpus_per_actor: Annotated[float, ADVANCED, Field(
        ge=0.0, le=8.0, description="GPUs each actor reserves (0.5 packs two on a GPU).",
    )] = 1.0
    cpus_per_actor: Annotated[float | None, ADVANCED, Field(
        gt=0.0, le=256.0, description="CPUs each CPU actor reserves; empty = the cores that "
                                      "decoding leaves, shared by the actors.",
    )] = None
    decode_cpus: Annotated[float, ADVANCED, Field(
        gt=0.0, le=64.0, description="CPUs each decode task reserves.",
    )] = 1.0
    max_image_side: Annotated[int, Knob(advanced=True, results=True), Field(
        ge=64, le=65536, description="Larger images are scaled down to this many pixels on "
                                     "their long side before inference; boxes stay in "
                                     "original pixels.",
    )] = 4096
    object_store_mib: Annotated[int | None, ADVANCED, Field(
        ge=0, description="Object store the detect stage may fill; empty = sized from the "
                          "actor pool, 0 = Ray's own default.",
    )] = None
    gpu_decode: Annotated[bool, Knob(advanced=True, results=True), Field(
        description="GPU actors decode plain JPEGs themselves (nvJPEG); other images are "
                    "decoded on CPUs.",
    )] = False
    channels_last: Annotated[bool | None, Knob(advanced=True, results=True), Field(
        description="Run the model in the channels-last (NHWC) layout; boxes move by float "
                    "rounding. Empty = on for CPU actors, off for GPU actors.",
    )] = None
    fold_batchnorm: Annotated[bool | None, Knob(advanced=True, results=True), Field(
        description="Fold batch norms into the convolutions before them; boxes move by float "
                    "rounding. Empty = on for CPU actors, off for GPU actors.",
    )] = None
    gpu_streams: Annotated[int, ADVANCED, Field(
        ge=1, le=8, description="Batches each GPU actor runs at once, each on its own CUDA "
                                "stream.",
    )] = 2
    keep_freed_memory: Annotated[bool, ADVANCED, Field(
        description="CPU actors and decode tasks keep freed memory for the next batch instead "
                    "of returning it to the system.",
    )] = True
    ray_dashboard: Annotated[bool, ADVANCED, Field(
        description="Start the run's own local Ray with its dashboard.",
    )] = False
    ship_code: Annotated[bool, ADVANCED, Field(
        description="Upload detectflow's code to an existing cluster's workers; off when the "
                    "cluster's image has it installed.",
    )] = True
    table: Annotated[bool, ADVANCED, Field(
        description="Merge the run's rows into <output>/table/, the Delta Lake table of every "
                    "detection across runs.",
    )] = True
    shared_paths: Annotated[tuple[str, ...], ADVANCED, Field(
        description="Folders mounted at the same path on every node of a cluster (NFS), so "
                    "local paths under them may be used there.",
    )] = ()

    @field_validator("input_uri", "output_uri")
    @classmethod
    def _absolute_local_paths(cls, value: str) -> str:
        # Ray workers may run in another working directory: pin local paths now.
        if "://" in value:
            return value.rstrip("/")
        return str(Path(value).expanduser().resolve())

    @field_validator("model", mode="before")
    @classmethod
    def _known_model(cls, value: object) -> object:
        # One readable line instead of the union's two errors.
        if isinstance(value, str) and value not in get_args(ModelName) and not re.fullmatch(
                r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            raise ValueError(f"unknown model {value!r}: use a torchvision name (see --help) or "
                             "package.module:factory")
        return value

    @field_validator("only", mode="before")
    @classmethod
    def _class_names(cls, value: object) -> tuple[str, ...]:
        # Commas only: class names may hold spaces ("traffic light").
        items = value.split(",") if isinstance(value, str) else (value or ())
        return tuple(dict.fromkeys(n.strip() for n in items if str(n).strip()))

    @field_validator("weights", "classes", "ground_truth")
    @classmethod
    def _file_uri(cls, value: str | None) -> str | None:
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
        exts = tuple(sorted({"." + v.lower().lstrip(".") for v in _items(value)}))
        if not exts:
            raise ValueError("at least one extension is needed")
        return exts

    @field_validator("exports", mode="before")
    @classmethod
    def _formats(cls, value: object) -> tuple[str, ...]:
        return tuple(dict.fromkeys(_items(value or ())))

    @field_validator("shared_paths", mode="before")
    @classmethod
    def _absolute_shared_paths(cls, value: object) -> tuple[str, ...]:
        return tuple(str(Path(p).expanduser().resolve()) for p in _items(value or ()))

    @model_validator(mode="after")
    def _gate_needs_ground_truth(self) -> RunConfig:
        if self.min_map is not None and not self.ground_truth:
            raise ValueError("min_map needs ground_truth: the AP is measured against it")
        if self.incremental and not self.table:
            raise ValueError("incremental needs table: earlier runs' detections are found there")
        return self

    def with_run_id(self) -> RunConfig:
        """A copy with a concrete run id, generated when none was given."""
        return self if self.run_id else self.model_copy(update={"run_id": new_run_id()})

    @property
    def run_uri(self) -> str:
        if not self.run_id:
            raise ConfigError("run_id is not set yet")
        return f"{self.output_uri}/{self.run_id}"


def _items(value: object) -> list[str]:
    """A list from the form, or ``a,b c`` from the command line."""
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    return [str(v) for v in value]  # type: ignore[union-attr]


DEFAULTS = {name: field.default for name, field in RunConfig.model_fields.items()}


def knob(field: FieldInfo) -> Knob:
    return next((m for m in field.metadata if isinstance(m, Knob)), Knob())


def model_fingerprint(cfg: RunConfig, weights_sha256: str = "",
                      categories: Sequence[str] = ()) -> str:
    """What a detection depends on besides its image: every field marked as changing results,
    and the weights and class names by content (so a file overwritten at the same path counts).
    The manifest records it; exports name their model version by it."""
    key = {name: getattr(cfg, name) for name, field in RunConfig.model_fields.items()
           if knob(field).results}
    key |= {"weights_sha256": weights_sha256, "categories": list(categories)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def fingerprint(cfg: RunConfig, weights_sha256: str = "", categories: Sequence[str] = ()) -> str:
    """What a staged shard of this run id must match to be reused (``resume``)."""
    model = model_fingerprint(cfg, weights_sha256, categories)
    return hashlib.sha256(f"{model}:{cfg.run_id}".encode()).hexdigest()


def flow_signature(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``fn(**params)`` one keyword parameter per field, typed and constrained as the field
    is, and an ``Args:`` docstring section with the fields' descriptions: Prefect builds the
    flow's parameters, its UI form (described fields) and their validation from the two."""
    params = []
    for name, field in RunConfig.model_fields.items():
        constraints = [m for m in field.metadata if not isinstance(m, Knob)]
        annotation = (Annotated[(field.annotation, *constraints)]  # type: ignore[valid-type]
                      if constraints else field.annotation)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        default=field.default, annotation=annotation))
    fn.__signature__ = inspect.Signature(params, return_annotation=dict)  # type: ignore[attr-defined]
    fn.__doc__ = (inspect.cleandoc(fn.__doc__ or "") + "\n\nArgs:\n" + "".join(
        f"    {name}: {field.description}\n" for name, field in RunConfig.model_fields.items()))
    return fn


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
