"""What one stage of the flow hands the next: small, typed and picklable (no pixels, no rows).

The detect stage's result is ``pipeline.DetectStats``; the weights' identity is
``models.ResolvedWeights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Listing:
    """list_images: where the listing shards are and how many images they hold."""

    listing_uri: str
    images: int
    shards: int
    reused: bool  # an earlier attempt of this run id had listed the same input
    skipped: dict[str, int]  # entries left out under the input, by reason (listing.SKIP_REASONS)
    seconds: float
    # Incremental runs: the listing of what to detect, and the manifest's ``incremental`` section.
    todo_uri: str | None = None
    incremental: dict[str, Any] | None = None

    @property
    def detect_uri(self) -> str:
        return self.todo_uri or self.listing_uri

    @property
    def to_detect(self) -> int:
        return self.incremental["inferred"] if self.incremental else self.images


@dataclass(frozen=True)
class Sample:
    """validate_sample: the drawn pictures (paths relative to the run folder)."""

    samples: list[str]
    checked: int
    seconds: float


@dataclass(frozen=True)
class Written:
    """write_parquet: the published Parquet files (path, rows, bytes, sha256 each)."""

    files: list[dict[str, Any]]
    rows: int
    seconds: float


@dataclass(frozen=True)
class Scored:
    """evaluate: the manifest's ``evaluation`` section and the plots written for it."""

    evaluation: dict[str, Any]
    plots: list[str]  # paths relative to the run folder
    seconds: float


@dataclass(frozen=True)
class Tabled:
    """merge_table: the table, the version that holds the run's rows, and whether this attempt
    committed them (False: an earlier attempt of the run id had, or there were none)."""

    table: str
    version: int | None
    merged: bool
    rows: int


@dataclass(frozen=True)
class Exports:
    """export: per format, its counts and files (paths relative to the run folder)."""

    formats: list[dict[str, Any]]
    seconds: float
