"""Zero-shot TAS throughput: ``nemo-hf zeroshot --proposals instances`` against TAS's per-expression crop encoding.

Model: the real CLIP ViT-B/32 architecture with random weights (config, tokenizer and image processor from
/work/shared/models/clip-vit-base-patch32-notweights; weights do not change the cost). Data: the val split of
a synthetic refcoco/unc folder (smooth photo-like JPEGs, about 7 expressions per image, every instance in
``objects``).

- ours: `run_zeroshot` as the command runs it (cold feature cache): per image, decode once, crops once,
  one batched forward of all crops and the whole image; expressions' texts batched over the split;
- baseline (TAS): the same, but the crops (and whole image) are re-encoded inside the per-expression loop,
  as TAS's release does; everything else is shared, so the ratio isolates that.

Both predict the same masks (checked). Timings are best of interleaved repeats on a possibly shared machine.

    python bench/bench_zeroshot.py [--source-images 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from nemo_hf.mining.embed import Embedder, available_cores
from nemo_hf.mining.identity import ModelIdentity
from nemo_hf.folder import build_folder
from nemo_hf.transforms.images import ImageTable
from nemo_hf.evaluation.predictions import read_predictions
from nemo_hf.masks import encode_rle
from nemo_hf.source.synthetic import make_refer_source
from nemo_hf.zeroshot.crops import centroid, masked_crop
from nemo_hf.zeroshot.encode import ClipEncoder, ImageFeatures
from nemo_hf.zeroshot.predict import expression_words
from nemo_hf.zeroshot.proposals import InstanceProposals
from nemo_hf.zeroshot.run import _expressions, build_predictor, decode_full, run_zeroshot

CLIP = Path("/work/shared/models/clip-vit-base-patch32-notweights")


def tas_style(refs, images, predictor) -> dict[int, dict]:
    """TAS's loop: per expression, every crop of the image through the image model again."""
    table = ImageTable(images)
    by_image = _expressions(refs)
    sentences = [e for exprs in by_image.values() for e in exprs]
    text_emb = predictor.encoder.embedder.embed_texts([(e["sent_id"], e["sent"]) for e in sentences])
    text_of = {e["sent_id"]: row for e, row in zip(sentences, text_emb)}
    predictor.prepare([e["sent"] for e in sentences])
    proposer = InstanceProposals()
    out = {}
    for image_id, expressions in by_image.items():
        pixels = decode_full(table, image_id)
        masks = proposer(pixels, table.objects_of(image_id), f"image {image_id}")
        crops = [masked_crop(pixels, m) for m in masks]
        centroids = np.array([centroid(m) for m in masks]).reshape(-1, 2)
        rles = [encode_rle(m) for m in masks]
        for expr in expressions:
            emb = predictor.encoder.encode_images(crops + [pixels])  # re-encoded per expression
            features = ImageFeatures(pixels.shape[:2], rles, emb[:-1], centroids, emb[-1])
            words = expression_words(expr["sent"], expr["tokens"])
            k = predictor.choose(features, expr["sent"], words, text_of[expr["sent_id"]])
            out[expr["sent_id"]] = rles[k]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-images", type=int, default=200, help="synthetic images (val is ~7%% of them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from datasets import load_dataset
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    embedder = Embedder(
        CLIPModel(CLIPConfig.from_pretrained(CLIP)),
        CLIPImageProcessorPil.from_pretrained(CLIP),
        AutoTokenizer.from_pretrained(CLIP),
        ModelIdentity("clip-vit-base-patch32 architecture, random weights"),
        batch_size=args.batch_size,
        progress=False,
    )
    print(f"{embedder}; cores: {available_cores()}; GPU: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = make_refer_source(tmp / "src", n_images=args.source_images, seed=0, datasets=("refcoco",))
            folder = build_folder(source, tmp / "folder", ["refcoco_unc"], mining=None)
        refs = load_dataset(str(folder), "refcoco_unc", split="val")
        images = load_dataset(str(folder), "images", split="train")
        by_image = _expressions(refs)
        n_expr = sum(len(v) for v in by_image.values())
        table = ImageTable(images)
        n_obj = np.mean([len(table.objects_of(i)) for i in by_image])
        print(f"val: {len(by_image)} images, {n_expr} expressions ({n_expr / len(by_image):.2f} per image), "
              f"{n_obj:.2f} instances per image")  # fmt: skip
        predictor = build_predictor(ClipEncoder(embedder))  # instances + offline negative phrases, as the command
        predictor.encoder.encode_images([np.zeros((32, 32, 3), np.uint8)] * 4)  # warm-up

        seconds = {"ours": [], "tas": []}
        timings = None
        for run in range(args.repeats):
            for name in ("ours", "tas") if run % 2 == 0 else ("tas", "ours"):
                predictor.encoder._texts.clear()  # both pay for their texts (head phrases are memoised)
                start = time.perf_counter()
                if name == "ours":
                    predictor.timings = Counter()
                    out = tmp / f"pred{run}.jsonl"
                    run_zeroshot(refs, images, predictor, out, cache_dir=tmp / f"cache{run}", progress=False)
                    ours = {sent_id: rle for sent_id, rle, _ in read_predictions(out)}
                    timings = dict(predictor.timings)
                else:
                    baseline = tas_style(refs, images, predictor)
                seconds[name].append(time.perf_counter() - start)
        assert ours.keys() == baseline.keys() and all(ours[k]["counts"] == baseline[k]["counts"] for k in ours), \
            "the two loops disagree"  # fmt: skip

    best = {name: min(v) for name, v in seconds.items()}
    print(f"ours (per-image features, cold cache): {n_expr / best['ours']:.1f} expressions/s  {seconds['ours']}")
    print(f"TAS-style (crops re-encoded per expression): {n_expr / best['tas']:.1f} expressions/s  {seconds['tas']}")
    print(f"speed-up: {best['tas'] / best['ours']:.2f}x (goal >= 4x)")
    n_img = len(by_image)
    print("per-image cost split (ours, last run): " + ", ".join(
        f"{stage} {1000 * timings.get(stage, 0.0) / n_img:.1f} ms" for stage in ("decode", "crops", "image forward", "text forward")))  # fmt: skip


if __name__ == "__main__":
    main()
