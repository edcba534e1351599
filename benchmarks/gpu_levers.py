"""GPU kernel levers on the bare model (no Ray, no I/O): images/s of each setting at one batch
size, and how many of the fp32 boxes each finds again.

``python -m benchmarks.gpu_levers --device cuda`` (what ``benchmarks.run`` cannot show: each
lever alone, TF32 matmuls, and where the GPU's time goes, from torch's profiler).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.limit import load_inputs, load_net, loop

ROOT = Path(__file__).resolve().parent.parent

# name → (precision, channels_last, cudnn_benchmark, tf32 matmuls, folded batch norms)
SETTINGS = {
    "fp32": ("fp32", False, False, False, False),
    "fp32, cudnn benchmark": ("fp32", False, True, False, False),
    "fp32, channels-last": ("fp32", True, False, False, False),
    "fp32, channels-last, cudnn benchmark": ("fp32", True, True, False, False),
    "fp32, tf32 matmul": ("fp32", False, False, True, False),
    "fp32, folded BN": ("fp32", False, False, False, True),
    "fp32, channels-last, folded BN": ("fp32", True, False, False, True),  # CPU actors' default
    "fp16": ("fp16", False, False, False, False),
    "fp16, cudnn benchmark": ("fp16", False, True, False, False),
    "fp16, channels-last": ("fp16", True, False, False, False),
    "fp16, channels-last, cudnn benchmark": ("fp16", True, True, False, False),
    "fp16, channels-last, folded BN": ("fp16", True, False, False, True),
    "bf16, channels-last, cudnn benchmark": ("bf16", True, True, False, False),
}


def run_setting(net, inputs: list, batch: int, device: str, precision: str,
                repeats: int = 2) -> tuple[float, list[dict]]:
    """Best images/s over ``repeats`` timed passes of the bare loop, and the last pass's
    detections on the CPU."""
    outs: list = []
    seconds = min(loop(net, inputs, batch, device, precision, keep=outs if r == repeats - 1
                       else None) for r in range(repeats))
    return len(inputs) / seconds, [
        {k: v.float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
         for k, v in o.items()} for o in outs]


def matched_share(reference: list[dict], other: list[dict],
                  min_iou: float = 0.9) -> tuple[float, int]:
    """Share of ``reference`` boxes that ``other`` also found (same label, IoU >= ``min_iou``),
    and how many boxes ``reference`` has; boxes as lists or arrays."""
    from torchvision.ops import box_iou

    found = total = 0
    for ref, oth in zip(reference, other):
        total += len(ref["boxes"])
        if len(ref["boxes"]) == 0 or len(oth["boxes"]) == 0:
            continue
        iou = box_iou(torch.tensor(ref["boxes"]), torch.tensor(oth["boxes"]))
        same = torch.tensor(ref["labels"])[:, None] == torch.tensor(oth["labels"])[None, :]
        found += int(((iou >= min_iou) & same).any(dim=1).sum())
    return found / max(total, 1), total


def profile(net, inputs: list, batch: int, device: str, precision: str, rows: int) -> str:
    """torch profiler over (up to) three batches: the ops that take the GPU's time, and how busy it is."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from detectflow.predictor import autocast

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.inference_mode(), autocast(device, precision):
        net(inputs[:batch])
        with torch_profile(activities=acts) as prof:
            start = time.perf_counter()
            for i in range(0, min(3 * batch, len(inputs)), batch):
                net(inputs[i : i + batch])
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    busy = sum(getattr(e, key, 0) for e in events) / 1e6
    table = events.table(sort_by=key, row_limit=rows)
    return f"wall {wall:.3f} s, device busy {busy:.3f} s ({busy / wall:.0%})\n{table}"


def main(argv: list[str] | None = None) -> int:
    from benchmarks.images import make_images
    from benchmarks.run import GPU_MODEL, SMALL_MODEL, pick_weights
    from detectflow.predictor import tune_for_device

    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_levers", description=__doc__)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--n", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--model", default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--only", default="", help="';'-separated setting names (default: all)")
    p.add_argument("--profile", default="fp32;fp16, channels-last, cudnn benchmark;"
                   "fp16, channels-last, folded BN",
                   help="';'-separated settings to profile ('' for none)")
    p.add_argument("--profile-rows", type=int, default=14)
    p.add_argument("--cache-dir", default=str(ROOT / "output" / "bench"))
    args = p.parse_args(argv)

    model = args.model or (GPU_MODEL if args.device == "cuda" else SMALL_MODEL)
    cache = Path(args.cache_dir)
    weights = pick_weights(model, args.weights, cache)
    images = make_images(args.n, cache / "images")
    inputs = load_inputs(images, args.device, args.n)
    only = [s for s in args.only.split(";") if s] or list(SETTINGS)
    to_profile = [s for s in args.profile.split(";") if s]
    print(f"{args.n} images {images.name}, model {model}, batch {args.batch}, device "
          f"{torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}", flush=True)
    base_outs, results = None, []
    for name in only:
        precision, channels_last, cudnn_benchmark, tf32, fold = SETTINGS[name]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = cudnn_benchmark  # measured, not used by the pipeline
        net = tune_for_device(load_net(model, weights, 0.5, args.device), args.device,
                              channels_last, fold)
        rate, outs = run_setting(net, inputs, args.batch, args.device, precision)
        base_outs = base_outs if base_outs is not None else outs
        boxes = sum(len(o["boxes"]) for o in outs)
        share, _ = matched_share(base_outs, outs)
        results.append((name, rate, boxes, share))
        print(f"levers: {name:<40} {rate:8.2f} img/s  {boxes:6d} boxes  "
              f"{share:6.1%} of {only[0]}'s at IoU>=0.9", flush=True)
        if name in to_profile:
            try:
                text = profile(net, inputs, args.batch, args.device, precision,
                               args.profile_rows)
            except Exception as exc:  # noqa: BLE001 - the speeds above still count
                text = f"failed: {type(exc).__name__}: {exc}"
            print(f"profile ({name}, batch {args.batch}): {text}", flush=True)
        del net
        if args.device == "cuda":
            torch.cuda.empty_cache()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
    base = results[0][1]
    print(f"\n| setting (batch {args.batch}) | img/s | x {only[0]} | boxes | "
          f"{only[0]}'s boxes found (IoU ≥ 0.9) |\n|---|---|---|---|---|")
    for name, rate, boxes, share in results:
        print(f"| {name} | {rate:.2f} | {rate / base:.2f} | {boxes} | {share:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
