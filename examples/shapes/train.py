"""Train the shapes detector from scratch on CPU, save it, and measure it on held-out images.

    python -m examples.shapes.train --out examples/shapes/shapes_detector.pth --seed 0

The training set is generated into a temporary folder from ``--seed``; training runs
``--iterations`` steps, fewer if that would take longer than ``--minutes`` (data generation
included). The checkpoint is torchvision's references/detection layout plus the label names:
{"model": state_dict, "categories": [names of labels 1..K], "args": {...}}. The held-out set
comes from another seed and is scored with faster_coco_eval (COCO's AP), calling the model one
image at a time as the pipeline does.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import convert_image_dtype

from examples.shapes.data import CLASSES, make_dataset
from examples.shapes.model import tiny_fasterrcnn

SIZE = (160, 160)
EVAL_SEED_OFFSET = 1000  # the held-out set's seed: --seed + this
REPLAN_EVERY = 50  # steps between checks of the pace against --minutes


def load_dataset(annotation_file: Path) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                 list[torch.Tensor], list[dict]]:
    """Images (uint8 CHW), boxes (xyxy float) and labels per image, and the image records."""
    coco = json.loads(annotation_file.read_text())
    per_image: dict[int, list[dict]] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    images, boxes, labels = [], [], []
    for im in coco["images"]:
        path = annotation_file.parent / im["file_name"]
        images.append(decode_image(str(path), mode=ImageReadMode.RGB))
        anns = per_image[im["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes.append(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1))
        labels.append(torch.tensor([a["category_id"] for a in anns], dtype=torch.int64))
    return images, boxes, labels, coco["images"]


def augment(rng: np.random.Generator, image: torch.Tensor, boxes: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A random flip / transpose (the shapes keep their class in all eight orientations) and
    channel order (colours are random anyway): 48 views of each image for free."""
    _, h, w = image.shape
    boxes = boxes.clone()
    if rng.random() < 0.5:  # transpose: x and y swap
        image, boxes, (h, w) = image.transpose(1, 2), boxes[:, [1, 0, 3, 2]], (w, h)
    if rng.random() < 0.5:
        image, boxes[:, [0, 2]] = image.flip(2), w - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        image, boxes[:, [1, 3]] = image.flip(1), h - boxes[:, [3, 1]]
    return image[torch.from_numpy(rng.permutation(3))], boxes


def lr_at(progress: float, iteration: int, base: float, warmup: int) -> float:
    """Linear warm-up over the first ``warmup`` steps, then cosine to zero over ``progress``."""
    return base * min(1.0, (iteration + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace, workdir: Path, start: float) -> tuple[torch.nn.Module, dict]:
    """Generate the training set under ``workdir``, train, and return (model, run record)."""
    annotation_file = make_dataset(workdir / "train", args.images, args.seed, SIZE)
    images, boxes, labels, _ = load_dataset(annotation_file)
    generated = time.monotonic() - start
    print(f"generated and loaded {len(images)} training images in {generated:.1f} s", flush=True)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = tiny_fasterrcnn(len(CLASSES) + 1)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    deadline = start + args.minutes * 60
    # The schedule runs over ``planned`` steps: --iterations, unless the pace of the last steps
    # says the deadline comes first. On a fast enough machine the plan never changes, and the
    # run (so the checkpoint) is the same every time; on a busy one the schedule is compressed,
    # and stretched again (up to --iterations) if the machine frees up, the rate never rising.
    planned, iteration, order, smoothed = args.iterations, 0, np.empty(0, dtype=np.int64), None
    progress, lap = 0.0, time.monotonic()
    while time.monotonic() < deadline:
        if iteration % REPLAN_EVERY == 0 and iteration:
            now = time.monotonic()
            pace = (now - lap) / REPLAN_EVERY
            planned = min(args.iterations, iteration + int((deadline - now) / pace))
            lap = now
        progress = max(progress, iteration / max(planned, 1))
        if progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, iteration, args.lr, args.warmup)
        if len(order) < args.batch:  # epochs in a seeded random order
            order = np.concatenate([order, rng.permutation(len(images))])
        batch, order = order[:args.batch], order[args.batch:]
        inputs, targets = [], []
        for i in batch:
            image, box = augment(rng, images[i], boxes[i])
            inputs.append(convert_image_dtype(image, torch.float))
            targets.append({"boxes": box, "labels": labels[i]})
        losses = model(inputs, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        smoothed = value if smoothed is None else 0.95 * smoothed + 0.05 * value
        iteration += 1
        if iteration % 50 == 0:
            parts = " ".join(f"{k.removeprefix('loss_')}={float(v.detach()):.3f}"
                             for k, v in losses.items())
            print(f"it {iteration:5d}/{planned}  {time.monotonic() - start:6.1f} s"
                  f"  loss {smoothed:.3f}  ({parts})", flush=True)
    seconds = time.monotonic() - start
    print(f"trained {iteration} iterations of {args.batch} images; {seconds:.1f} s in all "
          "(data generation included)", flush=True)
    info = {"model": "examples.shapes.model:tiny_fasterrcnn", "seed": args.seed,
            "images": args.images, "iterations": iteration, "planned": args.iterations,
            "batch_size": args.batch, "lr": args.lr, "warmup": args.warmup,
            "image_size": list(SIZE), "minutes": args.minutes,
            "train_seconds": round(seconds, 1)}
    return model, info


def evaluate(model: torch.nn.Module, workdir: Path, seed: int, n_images: int) -> list[float]:
    """COCO bbox stats of ``model`` on ``n_images`` held-out images generated from ``seed``."""
    from faster_coco_eval import COCO, COCOeval_faster

    annotation_file = make_dataset(workdir / "eval", n_images, seed, SIZE)
    images, _, _, records = load_dataset(annotation_file)
    model.eval()
    results = []
    with torch.inference_mode():
        for image, record in zip(images, records, strict=True):
            out = model([convert_image_dtype(image, torch.float)])[0]
            xywh = out["boxes"].clone()
            xywh[:, 2:] -= xywh[:, :2]
            results += [{"image_id": record["id"], "category_id": int(label),
                         "bbox": [round(float(v), 2) for v in box], "score": float(score)}
                        for box, label, score in zip(xywh, out["labels"], out["scores"],
                                                     strict=True)]
    gt = COCO(str(annotation_file))
    evaluator = COCOeval_faster(gt, gt.loadRes(results), "bbox", print_function=print)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [float(s) for s in evaluator.stats]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="examples/shapes/shapes_detector.pth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=1200,
                        help="training steps (about 3 minutes on 2 idle cores)")
    parser.add_argument("--minutes", type=float, default=4.0,
                        help="wall-clock cap for data generation and training: fewer steps if "
                        "the machine is slower")
    parser.add_argument("--images", type=int, default=1500, help="training images")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=50, help="warm-up steps")
    parser.add_argument("--eval-images", type=int, default=100)
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shapes-") as tmp:
        model, info = train(args, Path(tmp), start)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "categories": list(CLASSES), "args": info}, out)
        print(f"saved {out} ({out.stat().st_size / 1e6:.2f} MB)", flush=True)
        stats = evaluate(model, Path(tmp), args.seed + EVAL_SEED_OFFSET, args.eval_images)
    print(f"held-out ({args.eval_images} images, seed {args.seed + EVAL_SEED_OFFSET}): "
          f"AP@[.50:.95] {stats[0]:.3f}  AP50 {stats[1]:.3f}  AP75 {stats[2]:.3f}  "
          f"AR@100 {stats[8]:.3f}; training {info['train_seconds']:.0f} s, "
          f"{info['iterations']} iterations")


if __name__ == "__main__":
    main()
