"""Fine-tune CLIPSeg on NeMo mosaics with transformers.Trainer; evaluate at original image resolution.

    python examples/train_clipseg.py --data DIR --config refcoco_unc --output-dir runs/clipseg-nemo
    python examples/train_clipseg.py --data DIR --tiny-random --max-steps 20   # offline smoke run
    python examples/train_clipseg.py --data DIR --config refcoco_unc --maskris  # NeMo mosaics + MaskRIS (DCL)

DIR is a hub-ready folder written by `nemo-hf build` (or a Hub dataset id). Training rows are NeMo
mosaics rendered on the fly; evaluation has one row per sentence of the untouched split, scored as
oIoU / mIoU / Prec@0.5,0.7,0.9 (IoU >= X) at each image's original resolution. With --maskris, every
training batch also gets MaskRIS's masked view (image patches and text tokens) and each step trains both
views with Distortion-aware Contextual Learning (two forward passes).
"""

from __future__ import annotations

import argparse

from datasets import load_dataset
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor, TrainingArguments, set_seed

from nemo_hf.transforms.maskris import MaskRIS
from nemo_hf.transforms.mosaic import EvalTransform, MosaicEpochCallback, NeMoMosaic, explode_sentences
from nemo_hf.training import RISTrainer, tiny_random_clipseg


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="hub-ready folder (nemo-hf build) or Hub dataset id")
    parser.add_argument("--config", default="refcoco_unc")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--model", default="CIDAS/clipseg-rd64-refined")
    parser.add_argument("--tiny-random", action="store_true", help="tiny untrained CLIPSeg built in code, no download")
    parser.add_argument("--output-dir", default="runs/clipseg-nemo")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers rendering mosaics")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--maskris", action="store_true", help="MaskRIS masking + DCL with the paper's defaults")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    if args.tiny_random:
        model, processor = tiny_random_clipseg(seed=args.seed)
    else:
        processor = CLIPSegProcessor.from_pretrained(args.model)
        model = CLIPSegForImageSegmentation.from_pretrained(args.model)
    size = processor.image_processor.size["height"]  # render at the model's input size: no second resize

    refs = load_dataset(args.data, args.config)
    images = load_dataset(args.data, "images")["train"]
    train = refs["train"]
    mosaic = NeMoMosaic(images, output_size=size, config=args.config, seed=args.seed)
    train.set_transform(mosaic)
    evaluation = explode_sentences(refs[args.eval_split])  # every sentence of every ref
    evaluation.set_transform(EvalTransform(images, output_size=size))

    trainer = RISTrainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            logging_steps=args.logging_steps,
            dataloader_num_workers=args.workers,
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=processor,
        callbacks=[MosaicEpochCallback(mosaic)],
        maskris=MaskRIS(seed=args.seed) if args.maskris else None,
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    trainer.save_state()
    trainer.save_model()
    return metrics


if __name__ == "__main__":
    main()
