"""Probe: giant images decoded reduced, samples drawn bounded. The code before and after, each
measured in a fresh process.

``python -m benchmarks.probes.giant_images [--before REV]`` checks REV (by default the commit
before giant images were decoded reduced) out in a temporary ``git worktree`` and, for it and
for this tree, runs in new processes:

- ``predictor.decode_one`` of a generated ``--side`` x ``--side`` JPEG at the default
  ``max_image_side``: seconds and peak RSS (``ru_maxrss``, the process's high-water mark), and
  the RSS of the same process before decoding (interpreter and imports);
- ``decode_one`` over ordinary photos (the bundled ones and ``--photos`` 1920x1080 JPEGs cut from
  them), repeated ``--rounds`` times alternating before/after: images/s, median and best (the
  least disturbed run on a shared machine);
- a sample drawn as ``validate_sample`` draws it (``sample.draw`` + ``imaging.encode_png``) of the
  giant JPEG and of a ``--png-side`` PNG: seconds, peak RSS, drawn size and PNG bytes.

Prints a markdown table. The images are written to a temporary folder and deleted after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.images import ROOT

BEFORE = "623fc86"  # the commit before giant images were decoded reduced

# Run with the tree to measure first on sys.path, from a folder outside any tree.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from detectflow import imaging, predictor, sample
from detectflow.config import RunConfig

what, paths = sys.argv[2], sys.argv[3:]
max_side = RunConfig.model_fields["max_image_side"].default
out = {"code": predictor.__file__, "base_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
start = time.perf_counter()
if what == "decode":
    row = predictor.decode_one(paths[0], max_side)
    assert row["error"] is None, row["error"]
    out["size"] = f"{row['width']}x{row['height']} of {row['orig_width']}x{row['orig_height']}"
elif what == "photos":
    n = 0
    while time.perf_counter() - start < 3.0:
        for path in paths:
            assert predictor.decode_one(path, max_side)["error"] is None
            n += 1
    out["images_per_s"] = n / (time.perf_counter() - start)
elif what == "draw":
    from PIL import Image
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # a header read, as the code sets it
    with Image.open(paths[0]) as img:
        w, h = img.size
    Image.MAX_IMAGE_PIXELS = limit
    row = {"image_uri": paths[0], "boxes": [[w / 4, h / 4, w * 3 / 4, h * 3 / 4]],
           "scores": [0.9], "label_names": ["kite"]}
    picture = sample.draw(row)
    png = imaging.encode_png(picture)
    out["size"] = f"{picture.width}x{picture.height}"
    out["png_mib"] = len(png) / 2**20
out["seconds"] = time.perf_counter() - start
out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""

# A smooth picture (two gradients and low-frequency noise) encodes fast and like a photo.
GENERATE = r"""
import sys
from PIL import Image
path, side = sys.argv[1], int(sys.argv[2])
ramp = Image.linear_gradient("L").resize((side, side), Image.Resampling.BILINEAR)
noise = Image.effect_noise((side // 64, side // 64), 40).resize((side, side))
picture = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), noise))
if path.endswith(".png"):
    picture.save(path, compress_level=1)
else:
    picture.save(path, quality=90)
"""


def child(code_root: Path, what: str, paths: list[Path], cwd: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(code_root), what, *map(str, paths)],
        cwd=cwd, capture_output=True, text=True,
    )
    if out.returncode:
        raise RuntimeError(f"{what} on {code_root} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"].startswith(str(code_root)), result["code"]  # the tree we meant
    return result


def photos(folder: Path, n: int) -> list[Path]:
    import random

    from PIL import Image

    from benchmarks.images import SAMPLES, variant

    paths = sorted(SAMPLES.glob("*.jpg"))
    sources = [Image.open(p).convert("RGB") for p in paths]
    rng = random.Random(0)
    for i in range(n):
        path = folder / f"hd-{i:02d}.jpg"
        variant(sources[i % len(sources)], rng, (1920, 1080)).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE)
    ap.add_argument("--side", type=int, default=20000)
    ap.add_argument("--png-side", type=int, default=12000)
    ap.add_argument("--photos", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="giant-") as tmp:
        tmp = Path(tmp)
        old = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old),
                        args.before], check=True, capture_output=True)
        try:
            giant, giant_png = tmp / "giant.jpg", tmp / "giant.png"
            for path, side in ((giant, args.side), (giant_png, args.png_side)):
                subprocess.run([sys.executable, "-c", GENERATE, str(path), str(side)], check=True)
            normal = photos(tmp, args.photos)
            trees = {"before": old, "after": ROOT}
            rows = []
            for label, what, path in (
                (f"decode_one, {args.side}^2 JPEG", "decode", giant),
                (f"sample drawn, {args.side}^2 JPEG", "draw", giant),
                (f"sample drawn, {args.png_side}^2 PNG", "draw", giant_png),
            ):
                for tree, code_root in trees.items():
                    r = child(code_root, what, [path], tmp)
                    rows.append((label, tree, r))
            rates: dict[str, list[float]] = {tree: [] for tree in trees}
            for _ in range(args.rounds):
                for tree, code_root in trees.items():
                    rates[tree].append(child(code_root, "photos", normal, tmp)["images_per_s"])
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)],
                           check=False, capture_output=True)

    print(f"giant JPEG {giant.name} {args.side}x{args.side}, "
          f"{len(normal)} photos ({args.photos} of 1920x1080), before = {args.before}")
    print("| measure | code | seconds | peak RSS MiB (imports alone) | output |")
    print("|---|---|---|---|---|")
    for label, tree, r in rows:
        output = r["size"] + (f", PNG {r['png_mib']:.2f} MiB" if "png_mib" in r else "")
        print(f"| {label} | {tree} | {r['seconds']:.2f} | {r['peak_mib']:.0f} "
              f"({r['base_mib']:.0f}) | {output} |")
    for tree, values in rates.items():
        print(f"| decode_one, photos | {tree} | - | - | {statistics.median(values):.1f} images/s "
              f"median, {max(values):.1f} best of {len(values)} |")


if __name__ == "__main__":
    main()
