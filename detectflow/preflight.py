"""Checks that take seconds and save a doomed run from starting a cluster.

Each failure is one line that names the URI (or the weights file) and what to fix; none of them
writes anything to the output location.
"""

from __future__ import annotations

import os

from detectflow import classes, storage, weightcheck
from detectflow.classes import ModelSpec
from detectflow.config import RunConfig
from detectflow.errors import ConfigError, InputError, OutputError
from detectflow.listing import require_images
from detectflow.models import ResolvedWeights, resolve_weights


def check_output(output_uri: str) -> None:
    """The output location can be written to, checked without writing anything."""
    if storage.is_local(output_uri):
        path = output_uri.removeprefix("file://")
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing) or "/"
        if not (os.path.isdir(existing) and os.access(existing, os.W_OK | os.X_OK)):
            raise OutputError(f"cannot write to {output_uri}: {existing} is not a writable folder")
        return
    fs, path = storage.get_fs(output_uri)
    bucket = path.split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError:  # HEAD has no body: a 404 here can only mean the bucket
        raise OutputError(f"cannot write to {output_uri}: bucket does not exist") from None
    except Exception as exc:
        raise OutputError(f"cannot write to {output_uri}: {storage.explain(exc)}") from None


def require_shared_storage(cfg: RunConfig, nodes: int) -> None:
    """On a multi-node cluster every node reads the input and weights and writes the output, so
    a path on one machine's disk would be missing (or different) on the others: refuse it,
    unless it lies under a folder declared shared (``shared_paths``)."""
    if nodes <= 1:
        return
    shared = cfg.shared_paths

    def node_local(uri: str) -> bool:
        if not storage.is_local(uri):
            return False
        path = os.path.abspath(uri.removeprefix("file://"))
        return not any(path == p or path.startswith(p.rstrip("/") + "/") for p in shared)

    hint = (f"but the Ray cluster has {nodes} nodes; use shared storage or s3:// "
            "(or list a folder mounted on every node in shared_paths)")
    if node_local(cfg.input_uri):
        raise InputError(f"input {cfg.input_uri} is a local path {hint}")
    if node_local(cfg.output_uri):
        raise OutputError(f"output {cfg.output_uri} is a local path {hint}")
    if cfg.weights and node_local(cfg.weights):
        raise ConfigError(f"weights {cfg.weights} is a local path {hint}")


def preflight(cfg: RunConfig, wait: bool = True) -> ModelSpec | ResolvedWeights:
    """The model's spec once everything needed is known to be there: weights, class names,
    input, output and ground truth. The weights' check (``weightcheck``) runs meanwhile; without
    ``wait`` this returns the weights at once and the caller gets the spec later
    (``model_spec``), e.g. once it has started Ray."""
    weights = resolve_weights(cfg.model, cfg.weights)
    # A names file is read now to fail fast, and its count helps a factory's unknown head.
    hint = len(classes.read_names(cfg.classes)[0]) if cfg.classes else 0
    weightcheck.start(cfg.model, weights, hint)
    require_images(cfg.input_uri, cfg.extensions)
    check_output(cfg.output_uri)
    return model_spec(cfg, weights) if wait else weights


def model_spec(cfg: RunConfig, weights: ResolvedWeights) -> ModelSpec:
    """Wait for the weights' check; the run's classes from what it read (``classes.resolve``),
    and a ground truth that can score them."""
    found = weightcheck.start(cfg.model, weights).wait()
    spec = classes.resolve(cfg, weights, found["num_classes"], found["categories"])
    if cfg.ground_truth:
        check_ground_truth(cfg.ground_truth, spec)
    return spec


def check_ground_truth(uri: str, spec: ModelSpec) -> None:
    """The ground truth loads, and names at least one class the run keeps."""
    from detectflow.evaluation import GroundTruthError, load_ground_truth

    names = {str(c["name"]) for c in load_ground_truth(uri).dataset["categories"]}
    kept = {spec.categories[i] for i in spec.keep} or set(spec.categories[1:])
    if not names & kept:
        raise GroundTruthError(f"ground truth {uri}: none of its categories ("
                               f"{', '.join(sorted(names)[:5])}) is a class the run keeps")
