"""`nemo-hf eval` on a RefCOCO-scale split against decoding its RLEs alone, and what the ``objects`` column costs.

1. Scoring: a split of ``--expressions`` expressions (RefCOCO val: 10,834) with predictions near the ground
   truth (shifted and grown by a few pixels), scored as `nemo-hf eval` does (read the Parquet split and the
   images' objects, bucket every expression, stream the JSON Lines file, score in RLE space), against the
   floor of any scorer that looks at pixels: decoding the ground-truth and prediction RLEs, nothing else.
   Goal: <= 1.5x.
2. Building: the same folder built with and without the ``objects`` column (`refer.image_objects` stubbed out),
   the time and the bytes the column adds, and those bytes scaled to RefCOCO (19,994 images, about 10
   instances each: REFERENCE.md).

    python bench/bench_eval.py --images 2000 --work /tmp/nemo_hf_bench_eval

Times are CPU seconds of this process (the machine is shared): scoring the median of ``--repeats`` runs,
builds the best of ``--repeats``; read the ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REFCOCO_IMAGES, REFCOCO_OBJECTS_PER_IMAGE = 19_994, 10


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        t = time.process_time()
        result = fn()
        times.append(time.process_time() - t)
    return statistics.median(times), result


def column_bytes(path: Path, prefix: str) -> int:
    """Compressed bytes of a Parquet file's columns whose path starts with ``prefix``."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    return sum(
        meta.row_group(r).column(c).total_compressed_size
        for r in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(r).column(c).path_in_schema.startswith(prefix)
    )


def build_cost(source: Path, work: Path, repeats: int) -> Path:
    import pyarrow.parquet as pq

    from nemo_hf.source import refer
    from nemo_hf.folder import build_folder

    from nemo_hf.source import reader as source_module

    real = refer.image_objects
    results = {}
    for label, stub in [("without objects", True), ("with objects", False)] * repeats:  # alternated; best of each
        refer.image_objects = (lambda sources, image_id: []) if stub else real
        source_module._SOURCES.clear()  # each build reads and checks the source afresh
        try:
            t = time.process_time()  # CPU time: what the build costs, whatever else runs on a shared machine
            out = build_folder(source, work / label.replace(" ", "_"), ["refcoco_unc"], mining=None)
            seconds = time.process_time() - t
        finally:
            refer.image_objects = real
        shards = sorted((out / "data/images").glob("*.parquet"))
        best = min(seconds, results[label][0]) if label in results else seconds
        results[label] = (best, sum(p.stat().st_size for p in shards), out, shards)
    for label, (seconds, size, *_) in results.items():
        print(f"build refcoco_unc + images, {label}: {seconds:.1f} s CPU (best of {repeats}), images config {size / 1e6:.1f} MB")
    seconds, size, out, shards = results["with objects"]
    base_s, base_size = results["without objects"][:2]
    n_images = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    n_objects = sum(pq.read_table(p, columns=["objects"]).column("objects").combine_chunks().value_lengths().to_numpy().sum()
                    for p in shards)  # fmt: skip
    objects = sum(column_bytes(p, "objects") for p in shards)
    per_object = objects / n_objects
    print(f"objects: {n_objects:,} instances on {n_images:,} images ({n_objects / n_images:.1f} per image), "
          f"{objects / 1e6:.2f} MB compressed in Parquet ({per_object:.0f} B per instance); build time "
          f"{seconds / base_s:.2f}x the build without them (+{seconds - base_s:.1f} s); images config "
          f"+{(size - base_size) / 1e6:.2f} MB")
    scaled = per_object * REFCOCO_IMAGES * REFCOCO_OBJECTS_PER_IMAGE
    print(f"scaled to RefCOCO ({REFCOCO_IMAGES:,} images x ~{REFCOCO_OBJECTS_PER_IMAGE} instances, synthetic "
          f"polygons): ~{scaled / 1e6:.0f} MB for the objects column")
    return out


def scoring(folder: Path, work: Path, n_expressions: int, repeats: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pycocotools import mask as mask_utils

    from nemo_hf.evaluation import Expressions, evaluate_predictions, format_report, split_tables
    from nemo_hf.folder import BuildReport
    from nemo_hf.evaluation.predictions import write_predictions
    from nemo_hf.masks import encode_rle

    # the split: every refs row of the folder, repeated with fresh sent_ids until n_expressions
    report = BuildReport.read(folder)
    splits = report.configs["refcoco_unc"]["splits"]
    rows = [r for s in splits.values() for shard in s["shards"] for r in pq.read_table(folder / shard).to_pylist()]
    split, sent_id = [], 0
    while sent_id < n_expressions:
        for row in rows:
            sentences = [dict(s, sent_id=sent_id + k) for k, s in enumerate(row["sentences"])]
            sent_id += len(sentences)
            split.append(dict(row, split="val", sentences=sentences))
            if sent_id >= n_expressions:
                break
    eval_folder = work / "eval_folder"
    shutil.rmtree(eval_folder, ignore_errors=True)
    (eval_folder / "data/refcoco_unc").mkdir(parents=True)
    shutil.copytree(folder / "data/images", eval_folder / "data/images")
    pq.write_table(pa.Table.from_pylist(split, schema=pq.read_schema(folder / splits["train"]["shards"][0])),
                   eval_folder / "data/refcoco_unc/val-00000-of-00001.parquet")
    report.configs["refcoco_unc"]["splits"] = {"val": {"shards": ["data/refcoco_unc/val-00000-of-00001.parquet"]}}
    report.write(eval_folder)

    rng = np.random.default_rng(0)
    gts, preds = [], {}
    for row in split:
        gt = {"size": row["mask"]["size"], "counts": row["mask"]["counts"].encode()}
        mask = mask_utils.decode(gt)
        dy, dx = rng.integers(-4, 5, 2)
        moved = np.roll(mask, (dy, dx), axis=(0, 1))
        moved[1:] |= moved[:-1]  # grown by a pixel downwards
        for s in row["sentences"]:
            gts.append(gt)
            preds[s["sent_id"]] = encode_rle(moved)
    path = write_predictions(work / "preds.jsonl", preds)
    pred_rles = [{"size": m["size"], "counts": m["counts"].encode()} for m in preds.values()]
    print(f"split: {len(gts):,} expressions on {len({r['image_id'] for r in split}):,} images; predictions "
          f"{path.stat().st_size / 1e6:.1f} MB of JSON Lines")

    def decode_only():
        for gt, pred in zip(gts, pred_rles):
            mask_utils.decode(gt)
            mask_utils.decode(pred)

    def nemo_hf_eval():
        refs, images = split_tables(eval_folder, "refcoco_unc", "val")
        result = evaluate_predictions(Expressions.from_tables(refs, images), path)
        format_report(result, "bench")
        return result

    floor, _ = timed(decode_only, repeats)
    ours, result = timed(nemo_hf_eval, repeats)
    tracemalloc.start()
    nemo_hf_eval()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"decode ground truth + prediction RLEs alone: {floor:.2f} s CPU")
    print(f"nemo-hf eval (read split + objects, bucket, stream predictions, score, report): {ours:.2f} s CPU = "
          f"{ours / floor:.2f}x the decode floor (goal <= 1.5x); oIoU {result['metrics']['oIoU']:.3f}; peak Python "
          f"allocations {peak / 1e6:.0f} MB (tracemalloc; one decoded 640x480 mask is 0.3 MB)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--expressions", type=int, default=10_834, help="RefCOCO val: 10,834")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/nemo_hf_bench_eval")
    parser.add_argument("--keep-source", action="store_true", help="reuse a source generated earlier")
    args = parser.parse_args()

    from nemo_hf.source.synthetic import make_refer_source

    work = Path(args.work)
    source = work / "source"
    if not (args.keep_source and source.exists()):
        shutil.rmtree(source, ignore_errors=True)
        t = time.perf_counter()
        make_refer_source(source, n_images=args.images, seed=0, datasets=("refcoco",), workers=os.cpu_count() or 1)
        print(f"synthetic source: {args.images:,} images in {time.perf_counter() - t:.1f} s")
    folder = build_cost(source, work, args.repeats)
    scoring(folder, work, args.expressions, args.repeats)


if __name__ == "__main__":
    main()
