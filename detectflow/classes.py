"""The run's classes: how many the weights have, what they are called, which ones are kept.

Resolved once in the flow process, after the weights' check has read the class count from the
checkpoint (``weightcheck``), and handed to every stage as a ``ModelSpec``: the actors build the
architecture with that count, rows name labels from its table, and the manifest records it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from detectflow import storage
from detectflow.config import RunConfig, model_fingerprint
from detectflow.errors import ConfigError
from detectflow.models import COCO_CATEGORIES, ResolvedWeights, is_factory

BACKGROUND = "__background__"
UNUSED = "N/A"  # a gap in a label table (COCO's ids run to 90 for 80 classes)


def label_table(names: list[str]) -> list[str]:
    """Names of labels 0, 1, ...: ``names`` for labels 1, 2, ..., after background (given or
    not)."""
    return names if names[:1] == [BACKGROUND] else [BACKGROUND, *names]


@dataclass(frozen=True)
class ModelSpec:
    """What the actors build and how their labels read."""

    name: str  # torchvision builder, or package.module:factory
    weights: ResolvedWeights
    categories: tuple[str, ...]  # label id → name; 0 is the background
    source: str  # where the names came from: torchvision, checkpoint, a file's URI, generated
    sha256: str = ""  # of the names file, when they came from one
    keep: tuple[int, ...] = ()  # label ids ``only`` keeps; empty keeps every label

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    def fingerprint(self, cfg: RunConfig) -> str:
        """The run's model fingerprint (``config.model_fingerprint``): what its detections
        depend on besides the image, weights and names by content."""
        return model_fingerprint(cfg, self.weights.sha256, self.categories)

    def unnamed_notice(self) -> str | None:
        """The one warning a run gives when its labels had to be numbered."""
        if self.source != "generated":
            return None
        return (f"the weights carry no class names: labels are named class_1 to "
                f"class_{self.num_classes - 1} (give them with --classes)")

    def as_dict(self) -> dict[str, Any]:
        """The manifest's record of the model's classes."""
        return {"num_classes": self.num_classes, "source": self.source,
                **({"sha256": self.sha256} if self.sha256 else {}),
                "names": list(self.categories[1:]),
                "only": sorted({self.categories[i] for i in self.keep})}


def read_names(uri: str) -> tuple[list[str], str]:
    """The label table in ``uri`` (background first) and the file's sha256: a text file with
    one name per line for labels 1, 2, ...; a JSON list of them; or COCO annotations, whose
    ``categories`` give id → name."""
    try:
        data = storage.read_bytes(uri)
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"classes {uri}: cannot read it: {storage.explain(exc)}") from None
    if text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"classes {uri}: not valid JSON ({exc})") from None
        names = _names_from_json(uri, doc)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    table = label_table(names)
    if len(table) < 2:
        raise ConfigError(f"classes {uri}: names no class")
    return table, storage.sha256_bytes(data)


def _names_from_json(uri: str, doc: object) -> list[str]:
    if isinstance(doc, list) and all(isinstance(n, str) for n in doc):
        return list(doc)
    if isinstance(doc, dict) and isinstance(doc.get("categories"), list):
        try:
            ids = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"classes {uri}: each COCO category needs an id and a name") \
                from None
        if not ids or min(ids) < 1:
            raise ConfigError(f"classes {uri}: COCO category ids start at 1 (0 is background)")
        return [ids.get(i, UNUSED) for i in range(1, max(ids) + 1)]
    raise ConfigError(f"classes {uri}: expected a JSON list of names or COCO annotations "
                      "with categories")


def resolve(cfg: RunConfig, weights: ResolvedWeights, num_classes: int,
            carried: list[str] | None) -> ModelSpec:
    """The run's classes from ``--classes``, else the names the checkpoint carries, else
    torchvision's COCO table for a 91-class torchvision model, else ``class_1``, ``class_2``...
    Fails in one line when the names and the weights disagree on the count."""
    sha256 = ""
    if cfg.classes:
        table, sha256 = read_names(cfg.classes)
        source, what = cfg.classes, f"classes {cfg.classes}"
    elif carried is not None:
        table = label_table(carried)
        source, what = "checkpoint", f"the categories in {weights.source}"
    elif num_classes == len(COCO_CATEGORIES) and not is_factory(cfg.model):
        table, source, what = list(COCO_CATEGORIES), "torchvision", ""
    else:
        table = [BACKGROUND] + [f"class_{i}" for i in range(1, num_classes)]
        source, what = "generated", ""
    if len(table) != num_classes:
        raise ConfigError(f"{what} names {len(table) - 1} classes but the weights of "
                          f"{cfg.model} have {num_classes - 1} (plus background)")
    return ModelSpec(cfg.model, weights, tuple(table), source, sha256, kept(cfg.only, table))


def kept(only: tuple[str, ...], table: list[str]) -> tuple[int, ...]:
    """The label ids ``only`` names; an unknown name fails, listing the valid ones."""
    valid = [n for n in table[1:] if n != UNUSED]
    unknown = [n for n in only if n not in valid]
    if unknown:
        raise ConfigError(f"only: unknown class {unknown[0]!r}; the model's classes are "
                          + ", ".join(dict.fromkeys(valid)))
    return tuple(i for i, name in enumerate(table) if i and name in only)
