"""Weights checked before any image is read: the file loads safely and fits the architecture.

Loading torch and building the model take seconds, so the check runs in a subprocess, started
as soon as the weights file is known: in ``detectflow run`` it overlaps Ray's start, and its
memory is gone once it has answered. The state dict is memory-mapped and only its keys and
shapes are compared, so no weights are read and no activations are built.

A file that fitted is remembered (a stamp named by the model, the file's sha256 and the
torchvision version, in ``~/.cache/detectflow``): the next runs with the same weights, a nightly
deployment's, skip the check.

``python -m detectflow.weightcheck MODEL PATH SOURCE [STAMP]`` prints the one-line reason and
exits 2 when the weights do not fit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from detectflow.errors import WeightsError
from detectflow.models import ResolvedWeights

_checks: dict[tuple[str, str], WeightsCheck] = {}  # one check per model and file in a process
_lock = threading.Lock()


def stamp_path(model: str, sha256: str) -> Path | None:
    """Where a passed check of this model and file is remembered (None without a checksum)."""
    if not sha256:
        return None
    from detectflow.publish import installed_version

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "detectflow"
    return cache / "weights-checked" / f"{model}-{sha256}-torchvision{installed_version('torchvision')}"


class WeightsCheck:
    def __init__(self, model: str, weights: ResolvedWeights) -> None:
        self.model = model
        self.error: str | None = None
        stamp = stamp_path(model, weights.sha256)
        self.done = bool(stamp and stamp.exists())
        if not self.done:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "detectflow.weightcheck", model, weights.path,
                 weights.source, str(stamp or "")], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)

    def wait(self) -> None:
        """Raise :class:`WeightsError` unless the weights fit."""
        if not self.done:
            out, err = self.process.communicate()
            self.done = True
            if self.process.returncode == 2 and out.strip():
                self.error = out.strip().splitlines()[-1]
            elif self.process.returncode != 0:
                tail = (err.strip().splitlines() or ["no output"])[-1][:300]
                self.error = (f"weights for {self.model}: the check of the weights failed "
                              f"(exit {self.process.returncode}): {tail}")
        if self.error:
            raise WeightsError(self.error)


def start(model: str, weights: ResolvedWeights) -> WeightsCheck:
    """The check of ``weights`` for ``model``, started now unless this process already has."""
    key = (model, weights.sha256 or weights.path)
    with _lock:
        if key not in _checks:
            _checks[key] = WeightsCheck(model, weights)
        return _checks[key]


def check(model: str, path: str, source: str) -> None:
    """In this process: raise :class:`WeightsError` unless ``path`` fits ``model``."""
    from detectflow.models import build_model, check_fit, read_state_dict, weights_left_unfilled

    weights = ResolvedWeights(source, path, "", "")
    state = read_state_dict(model, weights, mmap=True)
    with weights_left_unfilled():  # the parameters' memory is never written, so never touched
        net = build_model(model)
    check_fit(model, weights, net, state)


def main(argv: list[str]) -> int:
    model, path, source, stamp = (argv + [""])[:4]
    try:
        check(model, path, source)
    except WeightsError as exc:
        print(exc, flush=True)
        return 2
    if stamp:
        try:
            Path(stamp).parent.mkdir(parents=True, exist_ok=True)
            Path(stamp).touch()
        except OSError:  # a read-only home: the check runs again next time
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
