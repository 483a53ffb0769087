"""How fast is a NeMo mosaic? The transform against a naive render and against the JPEG-decoding floor.

On COCO-sized photos (640x480 JPEGs of 60-160 KB derived from ../shared/realdata by crops, flips
and colour jitter), output 480 (tiles 240), retrieval mode, in one process and one thread:

  (a) NeMoMosaic: DCT-scaled decode, resize, paste; the target mask sampled from its RLE at tile size
      (PIL output by default; with return_arrays=True, what a DataLoader is given)
  (b) naive: full-size decode of the four JPEGs, resize each to the tile, paste; full-size mask decode + resize
  (c) floor: decoding the four JPEGs at the smallest DCT scale still >= the tile, to RGB (the decoder
      call of (a) with arrays; for PIL output (a) decodes to RGBX, PIL's own layout, at the same cost)

Then the samples/s of a torch DataLoader with 2 workers against the same loader in the main process.
Per-sample times are the best of several interleaved rounds, in CPU time of this process (robust to
other load on the machine) and in wall time; the loader rates are the best of as many passes, and the
CPU time per sample of all its processes says what two free cores would give.

All of it runs in several fresh processes and the ratios are given as median [min-max] over them:
the same code measures differently from one process to the next (where its buffers land in memory,
whether malloc hands freed memory back to the kernel and faults it in again), by more than most
changes one would want to judge.
Goals: (a) >= 1.8x faster than (b), (a) <= 1.3x (c), 2 workers >= 1.7x one process.

    python bench/bench_mosaic.py [--processes 5] [--n 48] [--rounds 5] [--resample bilinear bicubic] [--loader-samples 384]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image, ImageEnhance, ImageOps

from nemo_hf.masks import decode_rle, encode_rle

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "images"  # ../shared beside the checkout
SIZE = (640, 480)
NAIVE, FLOOR = "(b) naive full decode", "(c) floor: 4 DCT-scaled decodes"
GOALS = {"(b)/(a)": ">= 1.8", "(a)/(c)": "<= 1.3", "2 workers / 1 process": ">= 1.7"}


def coco_like_jpegs(n: int, seed: int = 0) -> tuple[list[bytes], list[dict]]:
    """Photos that compress like COCO (60-160 KB), each with a real object mask following the same crop/flip."""
    rng = np.random.default_rng(seed)
    sources = sorted(REALDATA.glob("*.jpg")) + sorted((REALDATA / "boxdrawn").glob("*.jpg"))
    photos = [Image.open(p).convert("RGB") for p in sources]
    object_mask = Image.open(REALDATA / "mask_44266.png").point(lambda v: 255 if v else 0).convert("L")
    blobs, rles = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = photo.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.Resampling.BICUBIC)
        mw, mh = object_mask.size
        mx, my = int(rng.integers(0, mw // 4)), int(rng.integers(0, mh // 4))
        mask = object_mask.crop((mx, my, mx + 3 * mw // 4, my + 3 * mh // 4)).resize(SIZE, Image.Resampling.NEAREST)
        if rng.random() < 0.5:
            image, mask = ImageOps.mirror(image), ImageOps.mirror(mask)
        for enhance in (ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast):
            image = enhance(image).enhance(rng.uniform(0.75, 1.25))
        for quality in (90, 93, 95, 97, 85, 80, 75):
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            if 60_000 <= buffer.tell() <= 160_000:
                break
        blobs.append(buffer.getvalue())
        rles.append(encode_rle(np.asarray(mask)))
    return blobs, rles


def build(n: int):
    import datasets

    from nemo_hf import schema

    blobs, rles = coco_like_jpegs(n)
    images = datasets.Dataset.from_dict(
        {
            "image_id": list(range(n)),
            "file_name": [f"COCO_train2014_{i:012d}.jpg" for i in range(n)],
            "width": [SIZE[0]] * n,
            "height": [SIZE[1]] * n,
            "license": [1] * n,
            "image": [{"bytes": b, "path": None} for b in blobs],
            "negative_pool_of": [["refcoco_unc"]] * n,
            "objects": [[] for _ in range(n)],  # the mosaic does not read them unless return_objects
        },
        features=schema.IMAGES_FEATURES,
    )
    rows = []
    for i in range(n):
        negatives = [int(j) for j in np.random.default_rng(i).permutation([j for j in range(n) if j != i])[:20]]
        ys, xs = np.nonzero(decode_rle(rles[i]))
        rows.append({
            "ref_id": i, "ann_id": i, "image_id": i, "file_name": f"COCO_train2014_{i:012d}_{i}.jpg",
            "category_id": 62, "category": "chair", "split": "train",
            "sentences": [{"sent_id": i, "sent": "wooden chair", "raw": "wooden chair", "tokens": ["wooden", "chair"]}],
            "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)],
            "mask": rles[i], "negatives": [negatives], "negative_scores": [[0.3] * 20], "negative_fallback": [False],
        })  # fmt: skip
    refs = datasets.Dataset.from_list(rows, features=schema.REFS_FEATURES)
    return blobs, images, refs, rows


def naive_mosaic(blobs: list[bytes], tile_ids: list[int], quadrant: int, rle: dict, output_size: int):
    """Full decode, resize each image to its tile, paste; the target mask decoded at full size, then resized."""
    half = output_size // 2
    canvas = Image.new("RGB", (output_size, output_size))
    mask = np.zeros((output_size, output_size), np.uint8)
    for q, image_id in enumerate(tile_ids):
        x, y = (q % 2) * half, (q // 2) * half
        full_image = Image.open(io.BytesIO(blobs[image_id])).convert("RGB")
        canvas.paste(full_image.resize((half, half), Image.Resampling.BILINEAR), (x, y))
        if q == quadrant:
            full = decode_rle(rle)
            resized = Image.fromarray(full).resize((half, half), Image.Resampling.NEAREST)
            mask[y : y + half, x : x + half] = np.asarray(resized)
    return canvas, mask


def per_item(fn, items) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, page faults) per item for one pass."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu, wall = time.process_time(), time.perf_counter()
    for item in items:
        fn(item)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu / len(items), wall / len(items), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(items)


def collate(rows):
    """Images and masks as uint8 tensors; default_collate stacks straight into shared memory in a worker."""
    from torch.utils.data import default_collate

    return default_collate([{"pixel_values": r["image"], "labels": r["mask"]} for r in rows])


def loader_rate(dataset, workers: int, batch_size: int = 16) -> tuple[float, float]:
    """One pass: (samples/s after the first batch, CPU seconds per sample of this process and its workers).

    The CPU figure does not depend on other load: with 2 workers it says what 2 free cores would give.
    """
    import torch

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=workers, collate_fn=collate
    )
    cpu = time.process_time() + _children_cpu()
    batches = iter(loader)
    total = len(next(batches)["labels"])
    start, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch["labels"])
    rate = seen / (time.perf_counter() - start)
    del batches  # joins the workers, so their CPU time is counted
    return rate, (time.process_time() + _children_cpu() - cpu) / (total + seen)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(args) -> dict:
    """One process: CPU and wall ms per sample of each run, and the DataLoader figures."""
    import torch

    from nemo_hf.transforms.mosaic import NeMoMosaic

    torch.set_num_threads(1)
    blobs, images, refs, rows = build(args.n)
    sizes = [len(b) // 1000 for b in blobs]
    transforms = {
        r: NeMoMosaic(images, output_size=args.output_size, p={"retrieval": 1.0}, resample=r) for r in args.resample
    }
    # what a DataLoader is given: arrays, no PIL image to build
    first = args.resample[0]
    transforms[f"{first}, arrays"] = NeMoMosaic(
        images, output_size=args.output_size, p={"retrieval": 1.0}, resample=first, return_arrays=True
    )
    batches = [{key: [row[key]] for key in row} for row in rows]
    # Warms the image index and fixes the tiles that (b) and (c) render.
    drawn = [transforms[first](batch) for batch in batches]
    plans = [(out["tile_image_ids"][0], out["target_quadrant"][0], row["mask"]) for out, row in zip(drawn, rows)]
    tile = args.output_size // 2

    def floor(plan):
        for image_id in plan[0]:
            simplejpeg.decode_jpeg(blobs[image_id], colorspace="RGB", min_width=tile, min_height=tile)

    runs = {f"(a) NeMoMosaic, {r}": (transform, batches) for r, transform in transforms.items()}
    runs[NAIVE] = (lambda p: naive_mosaic(blobs, p[0], p[1], p[2], args.output_size), plans)
    runs[FLOOR] = (floor, plans)
    timings = {label: [] for label in runs}
    for _ in range(args.rounds):  # interleaved, so a burst of other load hits all alike
        for label, (fn, items) in runs.items():
            timings[label].append(per_item(fn, items))
    result = {
        "jpeg_kb": [min(sizes), int(np.median(sizes)), max(sizes)],
        "variants": list(transforms),
        "ms": {label: [min(p[0] for p in t) * 1e3, min(p[1] for p in t) * 1e3] for label, t in timings.items()},
        "faults": {label: float(np.median([p[2] for p in t])) for label, t in timings.items()},
    }
    if args.loader_samples:
        loader_transform = NeMoMosaic(
            images, output_size=args.output_size, p={"retrieval": 1.0}, return_arrays=True, resample=first
        )
        repeats = -(-(args.loader_samples + 16) // len(rows))  # refs over the same images, enough for one pass
        many = refs.from_list([{**row, "ref_id": k} for k, row in enumerate(rows * repeats)], features=refs.features)
        dataset = many.with_transform(loader_transform)
        passes = [(loader_rate(dataset, 0), loader_rate(dataset, 2)) for _ in range(args.rounds)]
        (one, cpu_one), (two, cpu_two) = [(max(r for r, _ in runs), min(c for _, c in runs)) for runs in zip(*passes)]
        result["loader"] = {"one": one, "two": two, "cpu_one_ms": cpu_one * 1e3, "cpu_two_ms": cpu_two * 1e3}
    return result


def ratios(result: dict) -> dict[str, float]:
    """One process's judged figures: (b)/(a) and (a)/(c) per variant in CPU time, the loaders' samples/s."""
    ms = result["ms"]
    b, c = ms[NAIVE][0], ms[FLOOR][0]
    out = {}
    for r in result["variants"]:
        a = ms[f"(a) NeMoMosaic, {r}"][0]
        out[f"{r}: (b)/(a)"], out[f"{r}: (a)/(c)"] = b / a, a / c
    if "loader" in result:
        loader = result["loader"]
        out["DataLoader 2 workers / 1 process"] = loader["two"] / loader["one"]
        out["DataLoader ceiling from CPU time"] = 2 * loader["cpu_one_ms"] / loader["cpu_two_ms"]
    return out


def print_process(result: dict) -> None:
    print(f"{'':34s} {'CPU ms':>8s} {'wall ms':>8s} {'faults':>7s}")
    for label, (cpu, wall) in result["ms"].items():
        print(f"{label:34s} {cpu:8.2f} {wall:8.2f} {result['faults'][label]:7.0f}")
    if "loader" in result:
        loader = result["loader"]
        print(
            f"DataLoader: main process {loader['one']:.0f} samples/s, 2 workers {loader['two']:.0f} samples/s; "
            f"CPU per sample: main process {loader['cpu_one_ms']:.2f} ms, with 2 workers {loader['cpu_two_ms']:.2f} ms "
            "(all processes)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=48, help="images (and refs)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", type=int, default=5, help="fresh processes, each measuring everything")
    parser.add_argument("--output-size", type=int, default=480)
    parser.add_argument(
        "--resample", nargs="+", default=["bilinear", "bicubic"], choices=["bilinear", "bicubic"], help="tile filters for (a); the first is the one judged",
    )  # fmt: skip
    parser.add_argument("--loader-samples", type=int, default=384, help="0 skips the DataLoader part")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's result, for the parent
    args = parser.parse_args()

    if args.json:
        print(json.dumps(measure(args)))
        return
    print(f"{args.n} JPEGs {SIZE[0]}x{SIZE[1]}, output {args.output_size}, {args.processes} processes; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    child = [sys.executable, __file__, "--json", *sys.argv[1:]]
    results = []
    for k in range(args.processes):
        stdout = subprocess.run(child, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr passes through
        result = json.loads(stdout.splitlines()[-1])
        results.append(result)
        print(f"-- process {k + 1}: JPEGs {'-'.join(map(str, result['jpeg_kb'][::2]))} KB (median {result['jpeg_kb'][1]})")
        print_process(result)
    per_process = [ratios(result) for result in results]
    print(f"\nRatios per process, median [min-max] over {len(results)}; load average {os.getloadavg()[0]:.2f}")
    for name in per_process[0]:
        values = [r[name] for r in per_process]
        goal = next((f" (goal {g})" for end, g in GOALS.items() if name.endswith(end)), "")
        print(f"  {name:40s} {np.median(values):.2f}x [{min(values):.2f}-{max(values):.2f}]{goal}")


if __name__ == "__main__":
    main()
