"""Weights checked before any image is read: the file loads safely and fits the architecture.

Loading torch and building the model take seconds, so the check runs in a subprocess, started
as soon as the weights file is known: in ``detectflow run`` it overlaps Ray's start, and its
memory is gone once it has answered. The state dict is memory-mapped and only its keys and
shapes are compared, so no weights are read and no activations are built.

``python -m detectflow.weightcheck MODEL PATH SOURCE`` prints the one-line reason and exits 2
when the weights do not fit.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from detectflow.errors import WeightsError
from detectflow.models import ResolvedWeights

_checks: dict[tuple[str, str], WeightsCheck] = {}  # one check per model and file in a process
_lock = threading.Lock()


class WeightsCheck:
    def __init__(self, model: str, weights: ResolvedWeights) -> None:
        self.model = model
        self.process = subprocess.Popen(
            [sys.executable, "-m", "detectflow.weightcheck", model, weights.path, weights.source],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.error: str | None = None
        self.done = False

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
    model, path, source = argv
    try:
        check(model, path, source)
    except WeightsError as exc:
        print(exc, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
