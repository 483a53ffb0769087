"""``nemo-hf``: build a hub-ready folder, inspect its negatives, preview mosaics, push it to the Hub."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from .refer import ReferFormatError
from .schema import config_name

DEFAULT_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}


def _configs(datasets: list[str], split_bys: list[str]) -> list[str]:
    """``--dataset refcoco --split-by unc`` pairs (or config names, or ``all``) -> config names."""
    if "all" in datasets:
        return ["all"]
    if split_bys and len(split_bys) not in (1, len(datasets)):
        raise ValueError("give one --split-by for all datasets, or one per --dataset")
    names = []
    for i, dataset in enumerate(datasets):
        if "_" in dataset:  # already a config name, e.g. refcocog_google
            names.append(dataset)
            continue
        split_by = split_bys[i if len(split_bys) > 1 else 0] if split_bys else DEFAULT_SPLIT_BY.get(dataset, "")
        names.append(config_name(dataset, split_by))
    return names


def cmd_build(args) -> int:
    from nemo_hf_builders.nemo_refcoco import DEMO_MODEL

    from .folder import MiningOptions, build_folder

    mining = None if args.no_mining else MiningOptions(
        model=args.model or (DEMO_MODEL if args.source is None else MiningOptions.model),
        model_revision=args.model_revision,
        tau=args.tau,
        top_k=args.top_k,
        mode=args.mode,
        index=args.index,
        embed_cache_dir=args.embed_cache_dir,
    )
    configs = _configs(args.dataset or ["refcoco"], args.split_by or [])
    if args.source is not None:
        out = build_folder(args.source, args.out, configs, image_dir=args.image_dir, mining=mining)
    else:
        from .synthetic import make_refer_source

        print(f"no --source: building the embedded demo (a synthetic refer source of {args.demo_images} images)")
        with tempfile.TemporaryDirectory(prefix="nemo_hf_demo_") as tmp:
            make_refer_source(tmp, n_images=args.demo_images, seed=args.seed)
            out = build_folder(tmp, args.out, configs if args.dataset else ["all"], mining=mining)
    print(f"wrote {out}\nload it with: datasets.load_dataset({str(out)!r}, name)  (configs: see {out}/README.md)")
    return 0


def _load_split(folder: str, config: str, split: str = "train"):
    from datasets import load_dataset

    return load_dataset(folder, config, split=split)


def cmd_stats(args) -> int:
    from .stats import write_stats

    out = args.output or f"{args.config}_negatives.png"
    print(write_stats(_load_split(args.folder, args.config, args.split), out))
    print(f"plot: {out}")
    return 0


def cmd_preview(args) -> int:
    from .preview import render_preview

    refs = _load_split(args.folder, args.config, args.split)
    grid = render_preview(refs, _load_split(args.folder, "images"), n=args.n, output_size=args.size,
                          seed=args.seed, config=args.config, tile=args.tile)
    grid.save(args.output)
    print(f"wrote {args.output}: {args.n} samples of {args.config}/{args.split}")
    return 0


def cmd_push(args) -> int:
    from .hub import push_folder

    url = push_folder(args.folder, args.repo_id, token=args.token, private=args.private, include_images=not args.no_images,
                      delete_remote_images=args.delete_remote_images)
    print(f"pushed {args.folder} to {args.repo_id} in one commit: {url}")
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluate import Expressions, evaluate_predictions, format_report, plot_breakdowns, split_tables

    refs, images = split_tables(args.folder, args.config, args.split)
    expressions = Expressions.from_tables(refs, images, where=f"{args.folder} ({args.config}/{args.split})")
    report = evaluate_predictions(
        expressions, args.predictions, strict=args.strict, empty_iou=args.empty_iou, allow_missing=args.allow_missing
    )
    report = {"folder": str(args.folder), "config": args.config, "split": args.split, **report}
    title = f"{args.config}/{args.split} ({args.predictions})"
    print(format_report(report, title))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nreport: {args.json}")
    if args.plot:
        print(f"plot: {plot_breakdowns(report, args.plot, title)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="refer files -> hub-ready folder (Parquet + dataset card)")
    b.add_argument("--source", help="refer layout root; omit for the embedded synthetic demo")
    b.add_argument("--dataset", action="append", help="refcoco | refcoco+ | refcocog | a config name | all (repeatable)")
    b.add_argument("--split-by", action="append", help="unc | umd | google (default: unc, umd for refcocog)")
    b.add_argument("--image-dir", help="COCO train2014 folder (default <source>/images/mscoco/images/train2014)")
    b.add_argument("--out", required=True, help="output folder; an existing one is replaced atomically only if it is an "
                   "earlier nemo-hf build (nemo_hf.json and build files, nothing else), anything else is refused; "
                   "it may not overlap --source")
    b.add_argument("--model", help="mining model id or local path (default openai/clip-vit-base-patch32)")
    b.add_argument("--model-revision")
    b.add_argument("--tau", default="p99", help="i2i/t2i upper bound: a cosine (0.9) or a percentile (p99)")
    b.add_argument("--top-k", type=int, default=20, help="negatives kept per expression")
    b.add_argument("--mode", choices=["i2i", "t2i"], default="i2i")
    b.add_argument("--index", choices=["flat", "ivf", "hnsw"], default="flat")
    b.add_argument("--embed-cache-dir")
    b.add_argument("--no-mining", action="store_true", help="leave the negative columns empty")
    b.add_argument("--demo-images", type=int, default=48, help="images in the synthetic demo source")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_build)

    st = sub.add_parser("stats", help="distribution of the mined negatives, as text and a PNG plot")
    st.add_argument("folder")
    st.add_argument("--config", default="refcoco_unc")
    st.add_argument("--split", default="train")
    st.add_argument("-o", "--output", help="PNG path (default <config>_negatives.png)")
    st.set_defaults(func=cmd_stats)

    pv = sub.add_parser("preview", help="a grid of mosaics with the mask overlaid and the sentence under each")
    pv.add_argument("folder")
    pv.add_argument("--config", default="refcoco_unc")
    pv.add_argument("--split", default="train")
    pv.add_argument("-n", type=int, default=16)
    pv.add_argument("--size", type=int, default=256, help="side of each mosaic in pixels")
    pv.add_argument("--tile", choices=["squash", "letterbox"], default="squash")
    pv.add_argument("--seed", type=int, default=0)
    pv.add_argument("-o", "--output", default="grid.png")
    pv.set_defaults(func=cmd_preview)

    ev = sub.add_parser("eval", help="score a predictions file on a split: oIoU, mIoU, Prec@X and difficulty breakdowns")
    ev.add_argument("folder", help="a folder written by nemo-hf build")
    ev.add_argument("--config", default="refcoco_unc")
    ev.add_argument("--split", default="val")
    ev.add_argument("--predictions", required=True, help="JSON Lines or Parquet: sent_id + mask RLE at original size")
    ev.add_argument("--strict", action="store_true", help="Prec@X counts IoU > X (CRIS, TAS) instead of >= X")
    ev.add_argument("--empty-iou", type=int, choices=[0, 1], default=0,
                    help="IoU of an expression whose prediction and ground truth are both empty")
    ev.add_argument("--allow-missing", action="store_true", help="score a missing expression as an empty prediction")
    ev.add_argument("--json", help="also write the report as JSON here")
    ev.add_argument("--plot", help="also draw the breakdowns as bar charts (PNG)")
    ev.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="upload a built folder to the Hub in one atomic commit")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True, help="USER/NAME")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", help="default: HF_TOKEN or the cached login")
    p.add_argument("--no-images", action="store_true", help="push the refs configs only (image shards already on the Hub stay)")
    p.add_argument("--delete-remote-images", action="store_true", help="with --no-images: delete the image shards already on the Hub")
    p.set_defaults(func=cmd_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ReferFormatError, ValueError, OSError) as err:  # ModelLoadError is an OSError
        print(f"nemo-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
