"""The limit: the bare model's forward loop over images already decoded in memory.

No Ray, no I/O, no decoding in the timed loop: the float input the model takes, batch after
batch. Two ways of using the cores are swept at a few batch sizes: one process with all torch
threads, and (on CPU) one single-threaded process per core, each looping over its share of the
images at the same time. (On a small model the second wins: torch's intra-op threads scale
poorly, so a pipeline with one single-threaded model copy per core could otherwise "beat the
limit".) On a GPU the largest batch is also run with several batches in flight, each thread on
its own CUDA stream, as our actors do with ``gpu_streams``: non-maximum suppression runs on one
of the GPU's multiprocessors, so one batch at a time leaves the rest idle and is no bound for a
pipeline that overlaps batches. The best of the sweep is then measured again. A pipeline cannot
beat this by much; it is the bound for that model on that device.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import MemorySampler


def load_inputs(images_dir: Path, device: str, count: int) -> list[torch.Tensor]:
    from detectflow.imaging import decode

    paths = sorted(images_dir.glob("*.jpg"))[:count]
    return [torch.from_numpy(decode(p.read_bytes())).to(device).float().div_(255)
            for p in paths]


def load_net(model: str, weights: str | None, score_threshold: float, device: str):
    from detectflow import models

    resolved = models.resolve_weights(model, weights, checksum=False)
    return models.load_model(model, resolved, score_threshold, device)


def loop(net: torch.nn.Module, inputs: list[torch.Tensor], batch: int, device: str,
         precision: str = "fp32", keep: list | None = None) -> float:
    """Seconds for one pass over ``inputs`` in batches of ``batch`` (after one warm-up batch);
    the model's outputs are appended to ``keep`` when one is given."""
    from detectflow.predictor import autocast

    with torch.inference_mode(), autocast(device, precision):
        net(inputs[:batch])
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(inputs), batch):
            outs = net(inputs[i : i + batch])
            if keep is not None:
                keep.extend(outs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def streams_loop(net: torch.nn.Module, inputs: list[torch.Tensor], batch: int, device: str,
                 streams: int, precision: str = "fp32", keep: list | None = None) -> float:
    """Seconds for one pass over ``inputs`` with ``streams`` threads taking batches in turn, each
    on its own CUDA stream on a GPU (after one warm-up batch per thread); the model's outputs
    are appended to ``keep`` in input order when one is given.

    This is how a ``gpu_streams`` actor runs (Ray Data's threaded actor, ``Detector._stream``),
    without Ray, I/O or decoding.
    """
    from detectflow.predictor import autocast

    starts = list(range(0, len(inputs), batch))
    outputs: dict[int, list] = {}
    claim = threading.Lock()
    ready = threading.Barrier(streams + 1)
    errors: list[BaseException] = []

    def run() -> None:
        stream = torch.cuda.Stream() if device == "cuda" else None
        try:
            with (torch.inference_mode(), autocast(device, precision),
                  torch.cuda.stream(stream) if stream else contextlib.nullcontext()):
                net(inputs[:batch])
                if stream:
                    stream.synchronize()
                ready.wait()
                while True:
                    with claim:
                        if not starts:
                            break
                        i = starts.pop(0)
                    outputs[i] = net(inputs[i : i + batch])
                if stream:
                    stream.synchronize()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the caller's thread
            errors.append(exc)
            ready.abort()

    if device == "cuda":
        torch.cuda.synchronize()  # the inputs were copied on the default stream
    threads = [threading.Thread(target=run, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise errors[0]
    if keep is not None:
        for i in sorted(outputs):
            keep.extend(outputs[i])
    return seconds


def _worker(args: tuple, barrier, results) -> None:
    (images_dir, model, weights, threshold, batch, share, rank, procs, threads, channels_last,
     fold, keep_memory) = args
    from detectflow.allocator import keep_freed_memory
    from detectflow.predictor import tune_for_device

    if keep_memory:  # as a CPU actor does
        keep_freed_memory()
    torch.set_num_threads(threads)
    net = tune_for_device(load_net(model, weights, threshold, "cpu"), "cpu", channels_last, fold)
    inputs = load_inputs(images_dir, "cpu", share * procs)[rank::procs]
    with torch.inference_mode():
        net(inputs[:batch])  # warm-up before everyone starts the clock
    barrier.wait()
    results.put(loop(net, inputs, batch, "cpu"))


def spawned_rate(images_dir: Path, model: str, weights: str | None, threshold: float,
                  batch: int, images: int, procs: int, channels_last: bool = False,
                  fold_batchnorm: bool = False, threads: int = 1,
                  keep_freed_memory: bool = False) -> float:
    """Images/s of ``procs`` new processes of ``threads`` torch threads looping at the same time
    (new processes, so that the allocator setting of one layout never leaks into the next;
    ``threads`` 1 and one process per core is the layout a small model's actors use)."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    share = images // procs
    workers = [ctx.Process(target=_worker, args=(
        (images_dir, model, weights, threshold, batch, share, rank, procs, threads,
         channels_last, fold_batchnorm, keep_freed_memory),
        barrier, results))
        for rank in range(procs)]
    for w in workers:
        w.start()
    seconds = [results.get(timeout=600) for _ in workers]
    for w in workers:
        w.join()
    return share * procs / max(seconds)


def run_limit(images_dir: Path, model: str, weights: str | None, score_threshold: float,
              device: str, batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
              sweep_images: int = 48, precision: str = "fp32",
              channels_last: bool = False, fold_batchnorm: bool = False, confirm: int = 2,
              streams: tuple[int, ...] = (2, 3), keep_freed_memory: bool = False,
              ) -> dict[str, Any]:
    """Images/s for each way of running the bare loop, then the best of them measured again.

    The sweep picks a layout; its rate is then measured ``confirm`` more times and averaged.
    Reporting the sweep's own maximum would overstate the bound: on a noisy machine the best of
    six measurements is mostly the luckiest (benchmarks/RESULTS.md). The model is tuned as in
    the actors (``predictor.tune_for_device``; on CPU, ``keep_freed_memory`` as a CPU actor's
    allocator, so every CPU layout runs in new processes); on a GPU the largest batch size is
    also run with ``streams`` batches in flight.
    """
    from detectflow.predictor import tune_for_device

    procs = os.cpu_count() or 1
    if device == "cuda":
        in_process = {f"GPU, batch {b}": (b, 1) for b in batch_sizes}
        in_process |= {f"GPU, batch {max(batch_sizes)}, {k} streams": (max(batch_sizes), k)
                       for k in streams}
        spawned = {}
    else:  # (processes, threads each, batch)
        threads = torch.get_num_threads()
        in_process = {}
        spawned = {f"1 proc x {threads} threads, batch {b}": (1, threads, b)
                   for b in batch_sizes}
        if procs > 1:
            spawned |= {f"{procs} procs x 1 thread, batch {b}": (procs, 1, b) for b in (1, 4)}
    net, inputs = None, []

    def rate_of(layout: str) -> float:
        nonlocal net, inputs
        if layout in spawned:
            count, threads, batch = spawned[layout]
            return spawned_rate(images_dir, model, weights, score_threshold, batch,
                                 sweep_images, count, channels_last, fold_batchnorm, threads,
                                 keep_freed_memory)
        if net is None:
            net = tune_for_device(load_net(model, weights, score_threshold, device), device,
                                  channels_last, fold_batchnorm)
            inputs = load_inputs(images_dir, device, sweep_images)
        batch, threads = in_process[layout]
        if threads > 1:
            return len(inputs) / streams_loop(net, inputs, batch, device, threads, precision)
        return len(inputs) / loop(net, inputs, batch, device, precision)

    with MemorySampler() as mem:
        rates = {layout: rate_of(layout) for layout in [*in_process, *spawned]}
        best = max(rates, key=rates.get)
        again = [rate_of(best) for _ in range(confirm)]
        net, inputs = None, []
    rate = sum(again) / len(again) if again else rates[best]

    def measure_again(times: int = max(confirm, 1)) -> list[float]:
        """The chosen layout measured again, later (``benchmarks.run`` brackets a round's
        pipelines with it); a GPU model is loaded for it and dropped after."""
        nonlocal net, inputs
        try:
            return [rate_of(best) for _ in range(times)]
        finally:
            net, inputs = None, []

    return {"rates": rates, "best": best, "rate": rate, "again": again,
            "images": sweep_images, "peaks": mem.peaks, "measure_again": measure_again}
