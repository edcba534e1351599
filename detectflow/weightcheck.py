"""Weights checked before any image is read: the file loads safely and fits the architecture.

Loading torch and building the model take seconds, so the check runs in a subprocess, started
as soon as the weights file is known: in ``detectflow run`` it overlaps Ray's start, and its
memory is gone once it has answered. The state dict is memory-mapped and only its keys and
shapes are compared, so no weights are read and no activations are built.

The check also reads what the run's classes depend on: the class count of the checkpoint's head
and the class names it may carry (``classes.resolve``).

A file that fitted is remembered (a stamp named by the model, the file's sha256 and the
torchvision version, in ``~/.cache/detectflow``, holding what the check read): the next runs with
the same weights, a nightly deployment's, skip the check. A factory's code can change under the
same weights, so its stamp is named by its package's code too (and by the class count given, which
its head may not tell); a factory installed in site-packages is checked every time.

``python -m detectflow.weightcheck MODEL PATH SOURCE [STAMP [NUM_CLASSES]]`` prints what it read
as JSON, or the one-line reason and exits 2 when the weights do not fit.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from detectflow.classes import label_table
from detectflow.errors import ConfigError, WeightsError
from detectflow.models import ResolvedWeights, is_factory

_checks: dict[tuple[str, str], WeightsCheck] = {}  # one check per model and file in a process
_lock = threading.Lock()


def stamp_path(model: str, sha256: str, num_classes: int = 0) -> Path | None:
    """Where a passed check of this model and file is remembered (None without a checksum, or
    for a factory whose code cannot be hashed)."""
    if not sha256:
        return None
    name = model
    if is_factory(model):
        if (code := code_digest(model)) is None:
            return None
        name = f"{model.replace(':', '.')}-{code}-{num_classes}"
    from detectflow.publish import installed_version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detectflow"
    return cache / "weights-checked" / f"{name}-{sha256}-torchvision{installed_version('torchvision')}"


def code_digest(model: str) -> str | None:
    """sha256 (16 hex digits) of the Python files of a factory's package (the folder Ray ships
    to a cluster); None for one installed in site-packages, or not found (the check says why)."""
    import hashlib

    from detectflow.models import factory_folder

    try:
        folder = factory_folder(model)
    except ConfigError:
        return None
    if folder is None:
        return None
    root = Path(folder)
    files = [root] if root.is_file() else sorted(
        f for f in root.rglob("*.py") if "__pycache__" not in f.parts)
    digest = hashlib.sha256()
    try:
        for f in files:
            digest.update(str(f.relative_to(root.parent)).encode() + b"\0" + f.read_bytes())
    except OSError:  # an unreadable file: no stamp, the check runs
        return None
    return digest.hexdigest()[:16]


class WeightsCheck:
    def __init__(self, model: str, weights: ResolvedWeights, num_classes: int = 0) -> None:
        self.model = model
        self.error: str | None = None
        self.found: dict | None = None  # what the check read: num_classes, categories
        stamp = stamp_path(model, weights.sha256, num_classes)
        with contextlib.suppress(OSError, ValueError):
            self.found = json.loads(stamp.read_text()) if stamp else None
        if self.found is None:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "detectflow.weightcheck", model, weights.path,
                 weights.source, str(stamp or ""), str(num_classes)], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def wait(self) -> dict:
        """What the check read (``num_classes``, and the ``categories`` the checkpoint carries
        or None); raise :class:`WeightsError` unless the weights fit."""
        if self.found is None and self.error is None:
            out, err = self.process.communicate()
            lines = out.strip().splitlines()
            if self.process.returncode == 0 and lines:
                self.found = json.loads(lines[-1])
            elif self.process.returncode == 2 and lines:
                self.error = lines[-1]
            else:
                tail = (err.strip().splitlines() or ["no output"])[-1][:300]
                self.error = (f"weights for {self.model}: the check of the weights failed "
                              f"(exit {self.process.returncode}): {tail}")
        if self.error:
            raise WeightsError(self.error)
        return self.found


def start(model: str, weights: ResolvedWeights, num_classes: int = 0) -> WeightsCheck:
    """The check of ``weights`` for ``model``, started now unless this process already has.
    ``num_classes`` is used only when the head's layout does not tell (a factory's own)."""
    key = (model, weights.sha256 or weights.path)
    with _lock:
        if key not in _checks:
            _checks[key] = WeightsCheck(model, weights, num_classes)
        return _checks[key]


def check(model: str, path: str, source: str, num_classes: int = 0) -> dict:
    """In this process: what ``path`` holds (``num_classes``, ``categories``); raise
    :class:`WeightsError` unless it fits ``model``."""
    from detectflow.models import (
        build_model,
        check_fit,
        num_classes_in,
        read_checkpoint,
        weights_left_unfilled,
    )

    weights = ResolvedWeights(source, path, "", "")
    state, names = read_checkpoint(model, weights, mmap=True)
    # A torchvision model whose head is not in the file: built as for COCO, and the check
    # names the keys that are missing.
    count = (num_classes_in(model, state) or num_classes
             or (len(label_table(names)) if names else 0)
             or (0 if is_factory(model) else 91))
    if not count:
        raise WeightsError(f"weights for {model}: cannot tell their class count from the "
                           "model's head; give the class names with --classes")
    with weights_left_unfilled():  # the parameters' memory is never written, so never touched
        net = build_model(model, num_classes=count)
    check_fit(model, weights, net, state)
    return {"num_classes": count, "categories": names}


def main(argv: list[str]) -> int:
    model, path, source, stamp, hint = (argv + ["", "", "0"])[:5]
    from detectflow import workarounds

    if workarounds.applies("torchvision_import"):  # the check compiles nothing either
        from detectflow.workarounds.torchvision_import import import_torchvision

        import_torchvision()
    try:
        found = check(model, path, source, int(hint or 0))
    except (WeightsError, ConfigError) as exc:
        print(exc, flush=True)
        return 2
    if stamp:
        try:
            Path(stamp).parent.mkdir(parents=True, exist_ok=True)
            Path(stamp).write_text(json.dumps(found))
        except OSError:  # a read-only home: the check runs again next time
            pass
    print(json.dumps(found), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
