"""Florence-2 costs and the target's fidelity, each cost as a ratio against a baseline measured in the same run
(CPU, noisy shared machine).

1. Round trip (mask -> target text -> the processor's parser -> raster, IoU with the mask) on the real COCO masks
   of /work/shared/realdata at their images' sizes and as NeMo mosaics place them (2x2 and 3x3 cells and single,
   768 px), with target lengths in tokens; then the same masks under smaller token budgets (what simplification
   costs) and a 768 px mask with holes (what holes cost).
2. Collation per sample: ``Florence2Collator`` (768 px) against ``RISCollator`` with CLIPSeg's processor (352 px)
   on the same real photos and masks, rows already rendered at each model's size; the target encoding's share
   (``mask_to_target`` + tokenizing it); the MaskRIS draws' extra. One torch thread, as in a DataLoader worker.
3. Training step (``Florence2Trainer.training_step`` + SGD step) with MaskRIS (the masked view trained on the
   same target: two passes) against a plain step, tiny random Florence-2, batch 4.
4. Evaluation per expression: generation (tiny random Florence-2, greedy, a fixed number of new tokens, so the
   figure is per generated token), parse + map to the original size + raster, and RLE encoding.

Times are medians of interleaved rounds in CPU time of this process (user + sys), with wall time beside.

    python bench/bench_florence2.py [--repeats 7] [--sections roundtrip,collate,step,eval]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]
import bench_maskris  # noqa: E402
from test_florence2 import mosaic_masks, real_masks  # noqa: E402  (the masks the tests check, measured here)

SHARED = Path("/work/shared")
PROCESSOR = SHARED / "models/florence-2-large-notweights"


def placed(mask: np.ndarray, cell, size: int) -> np.ndarray:
    from nemo_hf.masks import encode_rle
    from nemo_hf.transforms.geometry import Placement

    canvas = np.zeros((size, size), np.uint8)
    Placement.fit(mask.shape[::-1], cell, "squash").place_mask(encode_rle(mask), canvas)
    return canvas


def rows(size: int, count: int = 8) -> list[dict]:
    """Rendered rows: real photos resized to ``size``, the real masks in mosaic cells, sentences."""
    from nemo_hf.transforms.geometry import grid_cells

    photos = [Image.open(p).convert("RGB") for p in sorted((SHARED / "realdata/images").glob("*.jpg"))]
    masks = list(real_masks().values())
    cells = grid_cells(size, 2)
    return [
        {"image": photos[i % len(photos)].resize((size, size), Image.Resampling.BICUBIC),
         "mask": placed(masks[i % len(masks)], cells[i % 4], size), "sentence": bench_maskris.SENTENCES[i % len(bench_maskris.SENTENCES)], "sent_id": i}
        for i in range(count)
    ]  # fmt: skip


def timed_rounds(runs: dict, repeats: int) -> dict:
    """{name: (median cpu s, median wall s)} of `bench_maskris.timed_rounds`' interleaved rounds."""
    rounds = bench_maskris.timed_rounds(runs, repeats)
    return {name: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t)) for name, t in rounds.items()}


def show(times: dict, per: int, baseline: str, unit: str = "ms / sample") -> None:
    base = times[baseline][0]
    for name, (cpu, wall) in times.items():
        print(f"  {name:<48} {1e3 * cpu / per:9.2f} cpu  {1e3 * wall / per:9.2f} wall  {unit}   x{cpu / base:5.2f} of {baseline}")


def summary(ious, lengths) -> str:
    ious, lengths = np.asarray(ious), np.asarray(lengths)
    return (f"IoU mean {ious.mean():.4f} median {np.median(ious):.4f} min {ious.min():.4f}; tokens median "
            f"{np.median(lengths):.0f} p99 {np.percentile(lengths, 99):.0f} max {lengths.max()}")  # fmt: skip


def section_roundtrip(processor) -> None:
    from nemo_hf.training.florence2_targets import round_trip

    real, mosaic = list(real_masks().values()), list(mosaic_masks().values())
    print(f"\n1. round trip, {len(real)} real COCO masks at their images' sizes, {len(mosaic)} as mosaics place them (768 px)")
    for name, masks in (("real", real), ("mosaic", mosaic)):
        results = [round_trip(m, processor) for m in masks]
        print(f"  {name:<7} budget 1024: {summary(*zip(*results))}")
    for budget in (512, 256, 128, 64):
        results = [round_trip(m, processor, budget) for m in real + mosaic]
        print(f"  all     budget {budget:4d}: {summary(*zip(*results))}")
    holed = real_masks()["mask_80472.png"].copy()
    ys, xs = np.nonzero(holed)
    cy, cx = int(ys.mean()), int(xs.mean())
    holed[cy - 20 : cy + 20, cx - 20 : cx + 20] = 0  # a 40 x 40 hole inside the man
    iou, _ = round_trip(holed, processor)
    print(f"  a 40 x 40 px hole in mask_80472 (the man, {int(holed.sum())} px): IoU {iou:.4f} (the hole is filled)")


def section_collate(processor, repeats: int) -> None:
    from nemo_hf import florence2
    from nemo_hf.training import RISCollator, tiny_random_clipseg
    from nemo_hf.transforms.maskris import MaskRIS

    torch.set_num_threads(1)
    f_rows, c_rows = rows(768), rows(352)
    _, clipseg = tiny_random_clipseg(image_size=352)
    plain, masked = florence2.Florence2Collator(processor), florence2.Florence2Collator(processor, maskris=MaskRIS())
    ris = RISCollator(clipseg)
    times = timed_rounds({
        "RISCollator, CLIPSeg processor, 352 px": lambda: ris(c_rows),
        "Florence2Collator, 768 px": lambda: plain(f_rows),
        "  of which labels (mask_to_target + tokenizer)": lambda: plain.labels(f_rows),
        "  of which mask_to_target alone": lambda: [florence2.mask_to_target(r["mask"]) for r in f_rows],
        "Florence2Collator + MaskRIS": lambda: masked(f_rows),
    }, repeats)  # fmt: skip
    print(f"\n2. collation, {len(f_rows)} rows, one thread, median of {repeats} rounds")
    show(times, len(f_rows), "RISCollator, CLIPSeg processor, 352 px")
    share = times["  of which labels (mask_to_target + tokenizer)"][0] / times["Florence2Collator, 768 px"][0]
    print(f"  target encoding's share of Florence2Collator: {100 * share:.1f}%")


def section_step(processor, repeats: int) -> None:
    from transformers import TrainingArguments

    from nemo_hf import florence2
    from nemo_hf.transforms.maskris import MaskRIS

    torch.set_num_threads(1)
    batch_rows = rows(768, 4)
    model = florence2.tiny_random_florence2(processor)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    trainers, batches = {}, {}
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TrainingArguments(output_dir=out, use_cpu=True, report_to="none", save_strategy="no")
        for name, maskris in (("plain step", None), ("MaskRIS step (two passes)", MaskRIS())):
            trainer = florence2.Florence2Trainer(model=model, args=args, processing_class=processor, maskris=maskris)
            trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run
            trainers[name], batches[name] = trainer, trainer.data_collator(batch_rows)

        def step(name):
            trainers[name].training_step(model, dict(batches[name]))
            optimizer.step()
            optimizer.zero_grad()

        times = timed_rounds({name: (lambda n=name: step(n)) for name in trainers}, repeats)
    print(f"\n3. training step (training_step + SGD step), tiny random Florence-2, batch 4, one thread, median of {repeats}")
    show(times, 4, "plain step")


def section_eval(processor, repeats: int, new_tokens: int = 64) -> None:
    from nemo_hf import florence2
    from nemo_hf.masks import encode_rle

    torch.set_num_threads(1)
    model = florence2.tiny_random_florence2(processor).eval()
    collator = florence2.Florence2Collator(processor)
    batch_rows = rows(768, 4)
    for row in batch_rows:  # as EvalTransform gives them: a 640 x 480 original squashed into the square
        row |= {"orig_size": [480, 640], "content_box": [0, 0, 768, 768]}
    inputs = collator.model_inputs(batch_rows)
    texts = [florence2.mask_to_target(row["mask"]) for row in batch_rows]  # what a perfect model would generate
    masks = [florence2.prediction_at_original(t, r, processor) for t, r in zip(texts, batch_rows)]

    def generate():
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False)

    times = timed_rounds({
        f"generate {new_tokens} tokens (tiny model, greedy)": generate,
        "parse + map to original + raster": lambda: [florence2.prediction_at_original(t, r, processor) for t, r in zip(texts, batch_rows)],
        "RLE encode at original size": lambda: [encode_rle(m) for m in masks],
    }, repeats)  # fmt: skip
    lengths = [2 + t.count("<loc_") + t.count("<sep>") for t in texts]
    print(f"\n4. evaluation per expression, batch 4, one thread, median of {repeats}; the parsed targets have "
          f"{min(lengths)}-{max(lengths)} tokens")  # fmt: skip
    show(times, 4, f"generate {new_tokens} tokens (tiny model, greedy)", "ms / expression")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sections", default="roundtrip,collate,step,eval")
    args = parser.parse_args(argv)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(PROCESSOR)
    warnings.filterwarnings("ignore", message=".*max_length.*")
    sections = args.sections.split(",")
    if "roundtrip" in sections:
        section_roundtrip(processor)
    if "collate" in sections:
        section_collate(processor, args.repeats)
    if "step" in sections:
        section_step(processor, max(2, args.repeats // 2))
    if "eval" in sections:
        section_eval(processor, args.repeats)


if __name__ == "__main__":
    main()
