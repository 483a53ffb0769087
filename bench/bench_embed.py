"""Image embedding throughput: the full pipeline against the bare model forward, same run.

Model: the real CLIP ViT-B/32 architecture with random weights (config from
/work/shared/models/clip-vit-base-patch32-notweights; weights do not change the cost). Images:
COCO-like 640x480 JPEGs made from the real COCO images in /work/shared/realdata by random crops,
flips and colour jitter, written to a temporary directory.

- pipeline: ``Embedder.embed_images`` on the file paths (decode + preprocess in DataLoader workers,
  forward, normalise), with the embedder's default thread budget;
- bare: ``get_image_features`` on the same images decoded and preprocessed beforehand, same batches,
  same torch threads.

    python bench/bench_embed.py [--images 256] [--batch-size 64] [--repeats 2]

``--processes 2`` instead measures the split across ranks (``nemo_hf.mining.ranks``): the tiny demo
CLIP embeds the same JPEGs into a fresh cache once as 1 rank and once as 2 ranks (local processes
launched as torchrun does, gloo), each rank timed between the barrier after listing the cache and
the barrier after embedding (start-up excluded); it reports images/s and how many each rank embedded.

    python bench/bench_embed.py --processes 2 [--images 256]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from nemo_hf.mining.embed import Embedder, available_cores
from nemo_hf.mining.identity import ModelIdentity

SHARED = Path("/work/shared")
CLIP = SHARED / "models/clip-vit-base-patch32-notweights"


def coco_like_jpegs(out_dir: Path, count: int, seed: int = 0) -> list[Path]:
    """640x480 JPEGs cut from the real COCO images: random crop, flip, brightness/contrast/colour jitter."""
    sources = sorted((SHARED / "realdata/images").rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"no source images under {SHARED / 'realdata/images'}")
    rng = random.Random(seed)
    originals = [Image.open(path).convert("RGB") for path in sources]
    paths = []
    for i in range(count):
        image = originals[i % len(originals)]
        w, h = image.size
        scale = rng.uniform(0.55, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        tile = image.crop((x, y, x + cw, y + ch)).resize((640, 480), Image.BICUBIC)
        if rng.random() < 0.5:
            tile = ImageOps.mirror(tile)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            tile = enhance(tile).enhance(rng.uniform(0.75, 1.25))
        path = out_dir / f"{i:06d}.jpg"
        tile.save(path, quality=90)
        paths.append(path)
    return paths


def _rank_worker(listing: Path, cache: Path, batch_size: int) -> None:
    """One rank: embed its share of the listed images, print its count and seconds as JSON (rank 0)."""
    from nemo_hf.mining.ranks import launched_ranks
    from nemo_hf.mining.embed import demo_embedder

    embedder = demo_embedder(batch_size=batch_size, progress=False)
    items = list(enumerate(json.loads(listing.read_text())))
    embedder.embed_images(items[:4])  # warm-up (outside the cache)
    with launched_ranks() as ranks:
        ranks.barrier("warm-up")
        start = time.perf_counter()
        counts = embedder.embed_share(items, [], cache, ranks)  # ends at the barrier after embedding
        seconds = time.perf_counter() - start
    print(json.dumps({"rank": ranks.rank, "images": counts["image"], "seconds": seconds}), flush=True)


def processes_main(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = coco_like_jpegs(Path(tmp), args.images)
        listing = Path(tmp) / "images.json"
        listing.write_text(json.dumps([str(p) for p in paths]))
        results = {}
        for world in (1, args.processes):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cache = Path(tmp) / f"cache-{world}"
            env = {**os.environ, "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore"}
            procs = [
                subprocess.Popen([sys.executable, __file__, "--rank-worker", str(listing), str(cache), str(args.batch_size)],
                                 env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
                for r in range(world)
            ]
            reports = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            if any(p.returncode for p in procs):
                raise SystemExit(f"a rank failed with {world} processes")
            results[world] = reports
    n = args.images
    base = max(r["seconds"] for r in results[1])
    for world, reports in results.items():
        seconds = max(r["seconds"] for r in reports)
        shares = ", ".join(f"rank {r['rank']}: {r['images']}" for r in sorted(reports, key=lambda r: r["rank"]))
        print(f"{world} process(es): {n / seconds:.1f} images/s = {base / seconds:.2f}x one process | embedded {shares}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--rank-worker":
        return _rank_worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, choices=(1, 2))
    parser.add_argument("--processes", type=int, help="compare this many ranks against one (tiny model)")
    args = parser.parse_args()
    if args.processes:
        return processes_main(args)

    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig.from_pretrained(CLIP))
    embedder = Embedder(
        model,
        CLIPImageProcessorPil.from_pretrained(CLIP),
        AutoTokenizer.from_pretrained(CLIP),
        ModelIdentity("clip-vit-base-patch32 architecture, random weights"),
        batch_size=args.batch_size,
        progress=False,
    )
    print(f"{embedder}; cores: {available_cores()}")

    with tempfile.TemporaryDirectory() as tmp:
        paths = coco_like_jpegs(Path(tmp), args.images)
        mean_kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"{len(paths)} JPEGs 640x480, {mean_kb:.0f} KB on average")
        items = list(enumerate(paths))

        def preprocess(path: Path) -> torch.Tensor:
            with Image.open(path) as image:
                pixels = embedder.image_processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"]
            return torch.from_numpy(pixels[0])

        start = time.perf_counter()
        pixels = torch.stack([preprocess(p) for p in paths])
        decode = time.perf_counter() - start

        def bare_forward() -> None:
            torch.set_num_threads(embedder.threads)
            with torch.inference_mode():
                for i in range(0, len(pixels), args.batch_size):
                    model.get_image_features(pixel_values=pixels[i : i + args.batch_size])

        def pipeline() -> None:
            assert embedder.embed_images(items).shape == (len(paths), embedder.dim)

        with torch.inference_mode():  # warm-up
            model.get_image_features(pixel_values=pixels[:8])
        embedder.embed_images(items[:8])
        # Interleaved repeats, best of each: the machine may be shared.
        seconds = {bare_forward: [], pipeline: []}
        for run in [bare_forward, pipeline, pipeline, bare_forward][: 2 * args.repeats]:
            start = time.perf_counter()
            run()
            seconds[run].append(time.perf_counter() - start)
        bare, full = min(seconds[bare_forward]), min(seconds[pipeline])

    n = len(paths)
    print(f"decode + preprocess alone (one process): {1000 * decode / n:.1f} ms/image")
    print(f"bare forward ({embedder.threads} torch threads): {1000 * bare / n:.1f} ms/image")
    print(
        f"full pipeline ({embedder.threads} torch threads + {embedder.num_workers} decode worker(s)): "
        f"{1000 * full / n:.1f} ms/image = {full / bare:.2f}x bare"
    )


if __name__ == "__main__":
    main()
