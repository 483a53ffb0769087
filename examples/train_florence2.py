"""Fine-tune Florence-2 for referring segmentation on NeMo mosaics; generate and score val at original size.

    python examples/train_florence2.py --folder DIR --config refcoco_unc --predictions val.jsonl   # Florence-2-base
    python examples/train_florence2.py --folder DIR --tiny-random --processor PATH --max-steps 20   # offline
    nemo-hf eval DIR --config refcoco_unc --split val --predictions val.jsonl

DIR is a hub-ready folder written by `nemo-hf build`. The target of each mosaic is its mask as Florence-2's
polygon text (``nemo_hf.florence2.mask_to_target``); evaluation generates for every sentence of the split,
parses the polygons, maps them to each image's original size and writes the predictions file. With
--maskris every training step also trains the masked view (image patches, the expression's tokens) on the
same target. The checkpoint must be in transformers' own Florence-2 format (florence-community/Florence-2-base
or -large, or a local copy of one); microsoft/Florence-2-* hold remote code (trust_remote_code), another class.
--tiny-random builds an untrained ~2M-parameter Florence-2 in code (no download) around --processor, a folder
with Florence-2's processor files (tokenizer, image-processor and processor configs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from datasets import load_dataset
from transformers import AutoProcessor, TrainingArguments, set_seed

from nemo_hf import florence2
from nemo_hf.evaluation.scoring import Expressions, split_tables
from nemo_hf.transforms.maskris import MaskRIS
from nemo_hf.transforms.mosaic import EvalTransform, MosaicEpochCallback, NeMoMosaic, explode_sentences


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="hub-ready folder written by nemo-hf build")
    parser.add_argument("--config", default="refcoco_unc")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--model", default="florence-community/Florence-2-base",
                        help="checkpoint id or local path in transformers' own Florence-2 format")
    parser.add_argument("--processor", default=None, help="processor files (default: --model's)")
    parser.add_argument("--tiny-random", action="store_true", help="tiny untrained Florence-2 built in code")
    parser.add_argument("--predictions", default=None,
                        help="val predictions file (.jsonl / .parquet); default OUTPUT_DIR/predictions.jsonl")
    parser.add_argument("--output-dir", default="runs/florence2-nemo")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers rendering mosaics")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--maskris", action="store_true", help="MaskRIS; the masked view learns the same target")
    parser.add_argument("--max-target-tokens", type=int, default=florence2.MAX_TARGET_TOKENS,
                        help="target length budget; masks are simplified only to fit it (README: what it costs)")
    parser.add_argument("--max-new-tokens", type=int, default=florence2.MAX_TARGET_TOKENS, help="generation length")
    parser.add_argument("--num-beams", type=int, default=3, help="beam width at evaluation (Florence-2's examples use 3)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    processor = AutoProcessor.from_pretrained(args.processor or args.model)
    if args.tiny_random:
        model = florence2.tiny_random_florence2(processor, seed=args.seed)
    else:
        from transformers import Florence2ForConditionalGeneration

        model = Florence2ForConditionalGeneration.from_pretrained(args.model)
    size = processor.image_processor.size["height"]  # render at the model's input size: no second resize

    refs = load_dataset(args.folder, args.config)
    images = load_dataset(args.folder, "images")["train"]
    train = refs["train"]
    mosaic = NeMoMosaic(images, output_size=size, config=args.config, seed=args.seed)
    train.set_transform(mosaic)
    evaluation = explode_sentences(refs[args.eval_split])  # every sentence of every ref
    evaluation.set_transform(EvalTransform(images, output_size=size))

    maskris = MaskRIS(seed=args.seed) if args.maskris else None
    trainer = florence2.Florence2Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            seed=args.seed,
            logging_steps=args.logging_steps,
            dataloader_num_workers=args.workers,
            save_strategy="no",
            report_to="none",
        ),
        train_dataset=train,
        processing_class=processor,  # saved beside the model
        data_collator=florence2.Florence2Collator(processor, maskris=maskris, max_target_tokens=args.max_target_tokens),
        callbacks=[MosaicEpochCallback(mosaic)],
        maskris=maskris,
    )
    trainer.train()
    trainer.save_state()
    trainer.save_model()

    predictions = Path(args.predictions or Path(args.output_dir) / "predictions.jsonl")
    refs_table, images_table = split_tables(args.folder, args.config, args.eval_split)
    report = florence2.evaluate_florence2(
        model, processor, evaluation, predictions, batch_size=args.batch_size,
        expressions=Expressions.from_tables(refs_table, images_table, where=f"{args.config}/{args.eval_split}"),
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
    )  # fmt: skip
    (Path(args.output_dir) / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"metrics": report["metrics"], "unparsed": report["unparsed"]}, indent=2))
    print(f"score it: nemo-hf eval {args.folder} --config {args.config} --split {args.eval_split} "
          f"--predictions {predictions}")
    return report


if __name__ == "__main__":
    main()
