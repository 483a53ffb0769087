"""MaskRIS costs, each as a ratio against a baseline measured in the same run (CPU, noisy shared machine).

1. Collation: 16 training rows at 480 px (cut from the real COCO photos in /work/shared/realdata) through
   ``RISCollator`` with a 480 px image processor and the real CLIP tokenizer, without and with
   ``MaskRIS()``; one torch thread, as in a DataLoader worker. Also shown: the masking alone, and what
   materialising a masked float copy of ``pixel_values`` in the collator (``mask_image_patches``) would
   add. Goal: masking <= 5% of the collator's own cost.
2. Training step (``RISTrainer.training_step`` + SGD step, one thread) with DCL against a plain step, for the tiny
   CLIPSeg (64 px, batch 16) and a ViT-B/16-sized CLIPSeg with random weights (352 px, batch 2), for both
   backward strategies. Goal: <= 2.1x (the second forward/backward pass makes 2x unavoidable).
3. Peak memory of one step (loss + backward), ViT-B/16-sized at batch 8, each strategy in a fresh process: how far
   the process's peak RSS rises above its RSS just before the step (gradients already allocated; glibc told
   to map every allocation over 64 KiB on its own, so that freed memory leaves the RSS and is not reused
   unseen).

Times are medians of interleaved rounds in CPU time of this process (user + sys), with wall time beside.

    python bench/bench_maskris.py [--repeats 15] [--step-repeats 3] [--skip-vitb] [--sections memory]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SHARED = Path("/work/shared")
CLIP = SHARED / "models/clip-vit-base-patch32-notweights"
SENTENCES = ["man on the left in a red shirt", "the small dog", "second cup from the right", "tree behind the car",
             "woman holding an umbrella near the bus stop", "top bowl"]  # fmt: skip


def photo_rows(count: int, size: int, seed: int = 0) -> list[dict]:
    """Training rows as a NeMo transform gives them: size x size crops of the real photos, a mask, a sentence."""
    sources = sorted((SHARED / "realdata/images").rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"no source images under {SHARED / 'realdata/images'}")
    originals = [Image.open(path).convert("RGB") for path in sources]
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        image = originals[i % len(originals)]
        side = int(min(image.size) * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, image.width - side), rng.randint(0, image.height - side)
        mask = np.zeros((size, size), np.uint8)
        y0, x0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
        mask[y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
        rows.append({
            "image": image.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC),
            "mask": mask, "sentence": SENTENCES[i % len(SENTENCES)], "sent_id": i,
        })  # fmt: skip
    return rows


def timed_rounds(runs: dict, repeats: int) -> dict:
    """{name: [(cpu s, wall s), ...]}: one warm-up round, then ``repeats`` rounds, variants interleaved so
    drifting load hits each alike. CPU time (user + sys of this process) is the figure to trust on a
    shared machine; wall time is shown beside it."""
    times = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            cpu, wall = time.process_time(), time.perf_counter()
            run()
            if round_:
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
    return times


def report(times: dict, base_name: str, goal_name: str, goal: float) -> None:
    base = [statistics.median(t[k] for t in times[base_name]) for k in (0, 1)]
    for name, values in times.items():
        cpu, wall = (statistics.median(t[k] for t in values) for k in (0, 1))
        ratios = [t[0] / b[0] for t, b in zip(values, times[base_name])]
        print(f"   {name:<22} cpu {1000 * cpu:8.1f} ms  x{cpu / base[0]:.3f}  (per-round {min(ratios):.2f}-"
              f"{max(ratios):.2f})   wall {1000 * wall:8.1f} ms  x{wall / base[1]:.3f}")  # fmt: skip
    print(f"   goal: {goal_name} <= x{goal} of {base_name} (cpu medians)")


def bench_collation(repeats: int) -> None:
    from transformers import CLIPSegProcessor, CLIPTokenizerFast, ViTImageProcessorPil

    from nemo_hf.transforms.maskris import MaskRIS, mask_image_patches
    from nemo_hf.training import RISCollator

    torch.set_num_threads(1)
    rows = photo_rows(16, 480)
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessorPil(size={"height": 480, "width": 480}),
        tokenizer=CLIPTokenizerFast.from_pretrained(CLIP),
    )
    plain, with_maskris, maskris = RISCollator(processor), RISCollator(processor, maskris=MaskRIS()), MaskRIS()
    batch = plain(rows)
    runs = {
        "collator": lambda: plain(rows),
        "collator + MaskRIS": lambda: with_maskris(rows),
        "MaskRIS alone": lambda: maskris(batch, processor.tokenizer, list(range(16))),
        "float copy (not done)": lambda: mask_image_patches(batch["pixel_values"]),
    }
    times = timed_rounds(runs, repeats)
    print(f"\n1. collation, 16 rows at 480 px, 1 thread, median of {repeats} interleaved rounds")
    report(times, "collator", "collator + MaskRIS", goal=1.05)
    share = statistics.median(t[0] for t in times["MaskRIS alone"]) / statistics.median(t[0] for t in times["collator"])
    print(f"   the masking itself: {share:.1%} of the collator's cpu time (goal <= 5%; the two collator rows differ by "
          "this plus noise)")


def clipseg(size: str):
    """(model, processor, batch size): the tiny CLIPSeg, or CLIPSeg rd64-refined's shape (ViT-B/16) at 352 px."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizerFast
    from transformers import ViTImageProcessorPil

    from nemo_hf.training import tiny_random_clipseg

    if size == "tiny":
        model, processor = tiny_random_clipseg(image_size=64, seed=0)
        return model, processor, 16
    config = CLIPSegConfig(
        vision_config=dict(patch_size=16, image_size=224), reduce_dim=64, extract_layers=(3, 6, 9),
        use_complex_transposed_convolution=True,
    )  # fmt: skip
    torch.manual_seed(0)
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessorPil(size={"height": 352, "width": 352}),
        tokenizer=CLIPTokenizerFast.from_pretrained(CLIP),
    )
    return CLIPSegForImageSegmentation(config), processor, 2


def trainer_for(model, processor, maskris, output_dir):
    from transformers import TrainingArguments

    from nemo_hf.training import RISTrainer

    args = TrainingArguments(output_dir=output_dir, use_cpu=True, report_to="none", remove_unused_columns=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RISTrainer(model=model, args=args, processing_class=processor, maskris=maskris)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run
    return trainer


def batches(processor, batch_size: int):
    """The same collated rows with and without MaskRIS's views (plain steps must not see the extra keys)."""
    from nemo_hf.transforms.maskris import MaskRIS
    from nemo_hf.training import RISCollator

    size = processor.image_processor.size["height"]
    masked = RISCollator(processor, maskris=MaskRIS())(photo_rows(batch_size, size))
    plain = {k: v for k, v in masked.items() if k not in ("masked_pixels", "input_ids_masked")}
    return plain, masked


def bench_steps(sizes: list[str], repeats: int) -> None:
    from nemo_hf.transforms.maskris import MaskRIS

    torch.set_num_threads(1)  # CPU time of one thread is what a shared machine measures best
    print(f"\n2. training step (training_step + SGD step), 1 thread, median of {repeats} interleaved rounds")
    for size in sizes:
        model, processor, batch_size = clipseg(size)
        plain_batch, masked_batch = batches(processor, batch_size)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
        with tempfile.TemporaryDirectory() as tmp:
            variants = {
                "plain": (trainer_for(model, processor, None, tmp), plain_batch),
                "DCL per_pass": (trainer_for(model, processor, MaskRIS(backward="per_pass"), tmp), masked_batch),
                "DCL combined": (trainer_for(model, processor, MaskRIS(backward="combined"), tmp), masked_batch),
            }
            times = timed_rounds({name: functools.partial(step, *variant, model, optimizer)
                                  for name, variant in variants.items()}, repeats)  # fmt: skip
        print(f"   {size} CLIPSeg, batch {batch_size}:")
        report(times, "plain", "DCL", goal=2.1)


def step(trainer, batch, model, optimizer) -> None:
    trainer.training_step(model, dict(batch))
    optimizer.step()
    optimizer.zero_grad()


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}")


def memory_child(size: str, strategy: str) -> None:
    """One loss + backward in this fresh process; prints how far the peak RSS rose above the RSS just
    before the step, in MiB, as JSON (Linux: the peak is reset through /proc/self/clear_refs first)."""
    from nemo_hf.transforms.maskris import MaskRIS

    model, processor, batch_size = clipseg(size)
    plain_batch, masked_batch = batches(processor, 4 * batch_size)  # activations, not weights, should dominate
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(model, processor, None if strategy == "plain" else MaskRIS(backward=strategy), tmp)
        for p in model.parameters():  # gradients allocated before the baseline: only activations count
            p.grad = torch.zeros_like(p)
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        before = status_kib("VmRSS")
        trainer.training_step(model, dict(plain_batch if strategy == "plain" else masked_batch))
        peak = status_kib("VmHWM")
    print(json.dumps({"peak_rise_mib": (peak - before) / 1024}))


def bench_memory(size: str) -> None:
    print(f"\n3. peak memory of one step (loss + backward), {size} CLIPSeg, 4x the step batch, fresh process each")
    results = {}
    for strategy in ("plain", "per_pass", "combined"):
        out = subprocess.run(
            [sys.executable, __file__, "--memory-child", size, strategy], capture_output=True, text=True, check=False,
            env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"},  # tensors get their own pages, freed pages leave RSS
        )  # fmt: skip
        if out.returncode:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"memory child {strategy} failed")
        results[strategy] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rise_mib"]
    for strategy, mib in results.items():
        print(f"   {strategy:<10} +{mib:8.0f} MiB  (x{mib / results['plain']:.2f} of plain)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="collation rounds")
    parser.add_argument("--step-repeats", type=int, default=3, help="training-step rounds per model")
    parser.add_argument("--skip-vitb", action="store_true", help="tiny CLIPSeg only (minutes faster)")
    parser.add_argument("--sections", default="collation,steps,memory", help="comma-separated subset to run")
    parser.add_argument("--memory-child", nargs=2, metavar=("SIZE", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    sections = set(args.sections.split(","))
    if "collation" in sections:
        bench_collation(args.repeats)
    if "steps" in sections:
        bench_steps(["tiny"] if args.skip_vitb else ["tiny", "vitb16"], args.step_repeats)
    if "memory" in sections:
        bench_memory("tiny" if args.skip_vitb else "vitb16")


if __name__ == "__main__":
    main()
