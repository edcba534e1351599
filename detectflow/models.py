"""Detector registry, weights resolution (enum / local path / s3://) and model loading.

Weights are always loaded from a file with ``torch.load(..., weights_only=True)``: a pickle that
carries code is refused by torch itself. The weights identity (file name + sha256) goes into the
manifest so a consumer knows exactly which model produced the dataset.

torch and torchvision are imported by the functions that need them (the weights enum, loading):
the flow process and its task workers, which only resolve local or s3:// weights and name
categories, skip seconds of imports (benchmarks/RESULTS.md, Start-up).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from detectflow import storage
from detectflow.errors import ConfigError, WeightsError

if TYPE_CHECKING:
    import torch

# The label table of every model we support (torchvision's COCO table, index = label id;
# tests/test_models.py holds it equal to each model's weights metadata).
COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train",
    "truck", "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter",
    "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A",
    "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# Keyword each builder uses for its own score cut-off, so low-scoring boxes are dropped inside
# the model (cheaper) rather than only afterwards.
_SCORE_KWARG = {
    "fasterrcnn": "box_score_thresh",
    "retinanet": "score_thresh",
    "fcos": "score_thresh",
    "ssd": "score_thresh",
    "ssdlite": "score_thresh",
}


@dataclass(frozen=True)
class ResolvedWeights:
    """Where the weights file for this run is, and what it is."""

    source: str  # what the user asked for: "torchvision:<Enum>", a path or an s3:// URI
    path: str  # a local file on this node
    file_name: str
    sha256: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "file": self.file_name, "sha256": self.sha256}


def default_weights(model: str):
    """The torchvision weights enum entry the reference recipe uses (``.DEFAULT``)."""
    from torchvision.models import get_model_weights

    return get_model_weights(model).DEFAULT


def categories(model: str) -> list[str]:
    """Label id → name of torchvision's pretrained weights (every supported model: COCO)."""
    return list(COCO_CATEGORIES)


def is_factory(model: str) -> bool:
    """``package.module:factory``: the user's own architecture, not a torchvision builder."""
    return ":" in model


def import_factory(model: str):
    """The callable ``package.module:factory`` names. As uvicorn does for ``module:app``, the
    working directory is searched too, so a model module next to the user's files works."""
    import importlib
    import sys

    module_name, _, attr = model.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if os.getcwd() in sys.path or not module_name.startswith(exc.name or "\0"):
            raise ConfigError(f"model {model}: cannot import {module_name}: {exc}") from None
        sys.path.append(os.getcwd())
        return import_factory(model)
    except Exception as exc:  # the user's module failed while importing
        raise ConfigError(f"model {model}: importing {module_name} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"model {model}: {module_name} has no callable {attr!r}")
    return factory


def factory_folder(model: str) -> str | None:
    """The folder of a factory's top-level package (or its single-file module), for Ray's
    ``py_modules``; None for torchvision models and for code installed in site-packages,
    which every node already has."""
    import importlib.util
    import sys
    import sysconfig

    if not is_factory(model):
        return None
    top = model.partition(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
        spec = importlib.util.find_spec(top)
    if spec is None:
        raise ConfigError(f"model {model}: cannot find the module {top}")
    folder = (list(spec.submodule_search_locations)[0] if spec.submodule_search_locations
              else spec.origin)
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if not folder or any(folder.startswith(p + os.sep) for p in installed):
        return None
    return folder


# The tensor of a checkpoint whose first dimension is the class count (times the anchors per
# location for single-stage heads), per family; tests hold it equal to torchvision's builders.
_CLASS_TENSOR = {
    "fasterrcnn": ("roi_heads.box_predictor.cls_score.weight", 1),
    "retinanet": ("head.classification_head.cls_logits.weight", 9),
    "fcos": ("head.classification_head.cls_logits.weight", 1),
    "ssd300": ("head.classification_head.module_list.0.weight", 4),
    "ssdlite320": ("head.classification_head.module_list.0.1.weight", 6),
}


def num_classes_in(model: str, state: dict) -> int | None:
    """The class count (background included) of the head ``state`` holds; None when its
    layout is unknown (a factory's own head)."""
    if is_factory(model):
        key, anchors = _CLASS_TENSOR["fasterrcnn"]  # the fine-tuning tutorial's predictor
    else:
        key, anchors = _CLASS_TENSOR[model.split("_", 1)[0]]
    tensor = state.get(key)
    if tensor is None or not hasattr(tensor, "shape") or tensor.shape[0] % anchors:
        return None
    return int(tensor.shape[0]) // anchors


def input_transform(model: str):
    """What turns a uint8 CHW image into the model's input: the weights' own preset for a
    torchvision model, else a float in [0, 1] (torchvision's detection convention)."""
    if not is_factory(model):
        return default_weights(model).transforms()
    import torch
    from torchvision.transforms.functional import convert_image_dtype

    return lambda image: convert_image_dtype(image, torch.float)


def hub_checkpoint_path(model: str) -> Path:
    """Where torch's hub cache keeps the pretrained file for ``model``."""
    import torch

    file_name = os.path.basename(default_weights(model).url)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


@lru_cache(maxsize=16)
def _sha256_local(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_local(path, stat.st_mtime_ns, stat.st_size)


def _weights_cache_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "detectflow"


def resolve_weights(model: str, weights: str | None, checksum: bool = True) -> ResolvedWeights:
    """Find (or fetch) the weights file and hash it. Fails with one line when impossible.

    Actors skip the checksum (``checksum=False``): the flow already recorded it once.
    """
    digest = _sha256 if checksum else (lambda path: "")
    if not weights and is_factory(model):
        raise WeightsError(f"model {model} has no pretrained weights: give them with --weights")
    if not weights:
        enum = default_weights(model)
        target = hub_checkpoint_path(model)
        if not target.exists():
            try:
                enum.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:  # offline, proxy, HTTP error: all mean "not available here"
                raise WeightsError(
                    f"weights for {model} are not available: need {target.name} "
                    f"({type(exc).__name__} downloading {enum.url}); supply them with "
                    f"--weights PATH_OR_S3_URI, or place the file at {target} (torch hub cache)"
                ) from None
        return ResolvedWeights(
            f"torchvision:{type(enum).__name__}.{enum.name}", str(target), target.name,
            digest(str(target)),
        )
    if storage.is_local(weights):
        path = weights.removeprefix("file://")
        if os.path.isdir(path):
            raise WeightsError(f"weights for {model}: {path} is a folder; give the .pth file in it")
        if not os.path.isfile(path):
            raise WeightsError(f"weights for {model}: file not found: {path}")
        return ResolvedWeights(weights, path, os.path.basename(path), digest(path))
    # Remote (s3://...): copied into the local cache once per version of the object (its ETag,
    # else its size and time), so weights replaced under the same URI are fetched again.
    name = os.path.basename(weights.rstrip("/")) or "weights.pth"
    try:
        fs, path = storage.get_fs(weights)
        info = fs.info(path)
    except Exception as exc:
        raise _unreadable(model, weights, exc) from None
    version = str(info.get("ETag") or (info.get("size"), info.get("LastModified")))
    folder = _weights_cache_dir() / hashlib.sha256(weights.encode()).hexdigest()[:16]
    local = folder / hashlib.sha256(version.encode()).hexdigest()[:16] / name
    if not local.exists():
        try:
            data = storage.read_bytes(weights)
        except Exception as exc:
            raise _unreadable(model, weights, exc) from None
        storage.atomic_write_bytes(str(local), data)
        for older in folder.iterdir():  # earlier versions of this URI
            if older != local.parent:
                shutil.rmtree(older, ignore_errors=True)
    return ResolvedWeights(weights, str(local), name, digest(str(local)))


def _unreadable(model: str, weights: str, exc: BaseException) -> WeightsError:
    return WeightsError(f"weights for {model}: cannot read {weights}: {storage.explain(exc)}")


def build_model(model: str, score_threshold: float = 0.05,
                num_classes: int = len(COCO_CATEGORIES)) -> torch.nn.Module:
    """The architecture with no weights (nothing is downloaded here): a torchvision builder,
    or the user's ``package.module:factory`` called with ``num_classes``."""
    import torch

    if is_factory(model):
        net = import_factory(model)(num_classes=num_classes)
        if not isinstance(net, torch.nn.Module):
            raise ConfigError(f"model {model}: the factory returned {type(net).__name__}, "
                              "not a torch.nn.Module")
        return net
    from torchvision.models import get_model_builder

    family = model.split("_", 1)[0]
    kwargs = {_SCORE_KWARG[family]: score_threshold} if family in _SCORE_KWARG else {}
    builder = get_model_builder(model)
    return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


@contextlib.contextmanager
def weights_left_unfilled():
    """Make ``torch.nn.init``'s fill functions no-ops while a model is built.

    torchvision's builders fill every weight at random only for ``load_model`` to overwrite each
    one, a share of an actor's start (benchmarks/RESULTS.md, lever log). The pattern of
    transformers' ``no_init_weights``; safe because
    ``load_model`` refuses weights that leave any parameter or buffer out. Building on the meta
    device would do the same, but entering it loads TorchDynamo (seconds, see RESULTS.md).
    The patch is process-wide for the build's duration: an actor builds before it takes work.
    """
    import torch.nn.init as init

    fills = {name: getattr(init, name) for name in dir(init)
             if name.endswith("_") and not name.startswith("_")}
    for name in fills:
        setattr(init, name, _leave)
    try:
        yield
    finally:
        for name, fill in fills.items():
            setattr(init, name, fill)


def _leave(tensor, *args, **kwargs):
    return tensor


def load_model(
    model: str, weights: ResolvedWeights, score_threshold: float, device: str = "cpu",
    num_classes: int | None = None,
) -> torch.nn.Module:
    """Build ``model`` with the class count of ``weights`` (or ``num_classes``) and load them
    into it, strictly; eval mode on ``device``."""
    state = read_state_dict(model, weights)
    count = num_classes or num_classes_in(model, state) or len(COCO_CATEGORIES)
    with weights_left_unfilled():
        net = build_model(model, score_threshold, count)
    check_fit(model, weights, net, state)
    try:
        net.load_state_dict(state, strict=False)  # every key and shape checked above
    except (RuntimeError, TypeError) as exc:  # e.g. an entry that is not a tensor
        raise WeightsError(f"weights for {model}: {weights.source} does not match the model "
                           f"({str(exc).strip().splitlines()[-1][:200]})") from None
    return net.eval().to(device)


def read_state_dict(model: str, weights: ResolvedWeights, mmap: bool = False) -> dict:
    """The state dict in ``weights`` (a training checkpoint's ``model`` entry too)."""
    return read_checkpoint(model, weights, mmap)[0]


def read_checkpoint(model: str, weights: ResolvedWeights,
                    mmap: bool = False) -> tuple[dict, list[str] | None]:
    """The state dict in ``weights`` and the class names it carries, loaded with
    ``weights_only=True``; ``mmap`` leaves the tensors' bytes on disk until they are read."""
    import argparse
    import zipfile

    import torch

    # Only torch.save's zip format can be mapped (not the legacy one, nor a file that is neither).
    is_zip = zipfile.is_zipfile(weights.path)
    try:
        # references/detection's train.py saves its argparse.Namespace beside the weights: plain
        # data, so it is allowed as it is rather than turning weights_only off.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(weights.path, map_location="cpu", weights_only=True,
                               mmap=mmap and is_zip)
    except Exception as exc:
        raise _unloadable(model, weights, exc, is_zip) from None
    return unwrap_checkpoint(model, weights, state)


def unwrap_checkpoint(model: str, weights: ResolvedWeights,
                      saved: object) -> tuple[dict, list[str] | None]:
    """The state dict and the class names a checkpoint carries: a bare state dict, or a dict
    holding it under ``model`` (torchvision's references/detection) or ``state_dict``, with an
    optional ``categories`` list."""
    state, names = saved, None
    if isinstance(saved, dict):
        for key in ("model", "state_dict"):
            if isinstance(saved.get(key), dict):
                state = saved[key]
                names = saved.get("categories")
                break
    if not isinstance(state, dict):
        raise WeightsError(f"weights for {model}: {weights.source} does not hold a state dict")
    if names is not None and not (isinstance(names, list | tuple)
                                  and all(isinstance(n, str) for n in names)):
        raise WeightsError(f"weights for {model}: the categories in {weights.source} are not a "
                           "list of names")
    return state, (list(names) if names is not None else None)


def _unloadable(model: str, weights: ResolvedWeights, exc: BaseException,
                is_zip: bool) -> WeightsError:
    import pickle

    if not is_zip:  # torch.save writes a zip archive; the legacy format is long gone
        return WeightsError(f"weights for {model}: {weights.source} is not a complete file "
                            f"saved by torch.save ({type(exc).__name__})")
    if isinstance(exc, pickle.UnpicklingError):  # torch's own text is about its defaults
        return WeightsError(f"weights for {model}: {weights.source} holds objects that need "
                            "code to load (refused: weights_only=True)")
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return WeightsError(f"weights for {model}: cannot load {weights.source} safely "
                        f"(weights_only=True): {type(exc).__name__}: {first}")


def check_fit(model: str, weights: ResolvedWeights, net: torch.nn.Module, state: dict) -> None:
    """Every parameter and buffer of ``net`` is in ``state`` with its shape, and nothing else is
    (batch norms' ``num_batches_tracked`` counters aside: frozen and regular batch norm differ
    only by them)."""
    expected = net.state_dict()

    def counted(key: str) -> bool:
        return not key.endswith("num_batches_tracked")

    missing = [k for k in expected if k not in state and counted(k)]
    unexpected = [k for k in state if k not in expected and counted(k)]
    shapes = [f"{k} {tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
              for k in expected if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(expected[k].shape)]
    if shapes:
        raise WeightsError(f"weights for {model}: {weights.source} does not match the model "
                           f"({len(shapes)} tensors of another shape, e.g. {shapes[0]})")
    if missing or unexpected:
        raise WeightsError(
            f"weights for {model}: {weights.source} does not match the model "
            f"({len(missing)} missing keys e.g. {missing[:2]}, "
            f"{len(unexpected)} unexpected e.g. {unexpected[:2]})"
        )
