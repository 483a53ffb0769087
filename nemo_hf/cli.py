"""The ``nemo-hf`` command: build a hub-ready folder, inspect and preview it, evaluate, zero-shot TAS, push."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from nemo_hf_builders.nemo_refcoco import DEMO_MODEL

from . import __version__
from .mining.ranks import RankFailure
from .schema import refs_config
from .source.refer import ReferFormatError

DESCRIPTION = (
    "nemo-hf: build a hub-ready folder, inspect its negatives, preview mosaics, evaluate predictions, "
    "segment zero-shot (TAS), measure difficulty, push it to the Hub."
)
DEMO_NOTICE = (
    "DEMO: mining with a randomly initialised CLIP (--model demo-random): the negatives are MEANINGLESS. "
    "Use --model openai/clip-vit-base-patch32 (or a local checkpoint) for real training data."
)


def _tau(value: str):
    """``--tau``: a cosine (``0.9``) or a percentile (``p99``), checked before any file is read."""
    from .mining.negatives import MiningParams

    try:
        tau = value if value.startswith("p") else float(value)
        MiningParams(tau=tau)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid tau: give a cosine in [-1, 1] (e.g. 0.9) or a percentile p<q> (e.g. p99)"
        ) from err
    return tau


def _at_least(low: int, high: int | None = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        if high is not None and number > high:
            raise argparse.ArgumentTypeError(f"{value} must be at most {high}")
        return number

    return parse


_positive, _non_negative = _at_least(1), _at_least(0)
_side = _at_least(1, 8192)  # a rendered side in pixels: a typo like 1000000 would allocate terabytes


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (``main`` may run again under other streams)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _FirstFew(logging.Filter):
    """Lets through the first ``shown`` records of each repeated kind (``REPEATED``: one per image at COCO
    scale) and counts the rest, which ``main`` then says in one line."""

    REPEATED = ("skipping image",)

    def __init__(self, shown: int = 5):
        super().__init__()
        self.shown, self.seen = shown, {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = next((k for k in self.REPEATED if str(record.msg).startswith(k)), None)
        if kind is None:
            return True
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return self.seen[kind] <= self.shown

    def summary(self) -> list[str]:
        return [f"{n} '{kind} ...' warnings in all, the first {self.shown} shown above; the dataset card's summary "
                "counts the refs they skipped" for kind, n in self.seen.items() if n > self.shown]


def _configure_logging() -> None:
    """nemo_hf's own INFO lines, on a handler of the ``nemo_hf`` logger. No root handler: one would print
    FAISS's loader chatter and repeat every huggingface_hub warning (that library has its own handler)."""
    package = logging.getLogger("nemo_hf")
    if not any(getattr(h, "nemo_hf_cli", False) for h in package.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_FirstFew())
        handler.nemo_hf_cli = True
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def _configs(datasets: list[str], split_bys: list[str]) -> list[str]:
    """``--dataset refcoco --split-by unc`` pairs (or config names, or ``all``) -> config names, in any
    usual spelling (``refcocoplus``, ``RefCOCO+``); a typo gets the closest name."""
    if "all" in datasets:
        return ["all"]
    if split_bys and len(split_bys) not in (1, len(datasets)):
        raise ValueError("give one --split-by for all datasets, or one per --dataset")
    return [
        refs_config(dataset, split_bys[i if len(split_bys) > 1 else 0] if split_bys else None)
        for i, dataset in enumerate(datasets)
    ]


def accelerate_ran_one_process() -> str | None:
    """The warning for ``accelerate launch --num_processes N`` (N > 1) without ``--multi_gpu``: accelerate's
    simple launcher then starts ONE process (no WORLD_SIZE), silently. Read from the launcher's command line."""
    if not any(key.startswith("ACCELERATE_") for key in os.environ) or os.environ.get("WORLD_SIZE", "1") != "1":
        return None  # not accelerate, or several processes (a bad WORLD_SIZE is the build's to name)
    try:
        argv = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux: nothing to read the launcher's arguments from
        return None
    if "launch" not in argv or {"--multi_gpu", "--multi-gpu"} & set(argv):
        return None
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value.isdigit() and int(value) > 1:
                return (f"accelerate launch {name} {value} without --multi_gpu started ONE process: this run works "
                        "alone. Add --multi_gpu, or on CPUs use torchrun --standalone --nproc_per_node "
                        f"{value} -m nemo_hf.cli ...")
    return None


def cmd_build(args) -> int:
    from .folder.build import MiningOptions, build_folder

    mining = None if args.no_mining else MiningOptions(
        model=args.model or (DEMO_MODEL if args.source is None else MiningOptions.model),
        model_revision=args.model_revision,
        tau=MiningOptions.tau if args.tau is None else args.tau,
        top_k=args.top_k,
        mode=args.mode,
        index=args.index,
        embed_cache_dir=args.embed_cache_dir,
        embed_batch_size=args.embed_batch_size,
    )
    configs = _configs(args.dataset or ["refcoco"], args.split_by or [])
    one_process = accelerate_ran_one_process()
    if one_process:
        print(f"WARNING {one_process}", file=sys.stderr)
    main_rank = os.environ.get("RANK", "0") == "0"  # under a launcher, rank 0 speaks for the run
    demo = main_rank and mining is not None and mining.model == DEMO_MODEL
    if demo:
        print(DEMO_NOTICE, file=sys.stderr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DEMO EMBEDDER")  # said once above, and again at the end
        if args.source is not None:
            out = build_folder(args.source, args.out, configs, image_dir=args.image_dir, mining=mining,
                               skip_broken_eval_images=args.skip_broken_eval_images)
        else:
            from .source.synthetic import make_refer_source

            if main_rank:
                print(f"no --source: building the embedded demo (a synthetic refer source of {args.demo_images} images)")
            with tempfile.TemporaryDirectory(prefix="nemo_hf_demo_") as tmp:
                make_refer_source(tmp, n_images=args.demo_images, seed=args.seed)
                out = build_folder(tmp, args.out, configs if args.dataset else ["all"], mining=mining)
    if main_rank:  # rank 0 wrote it
        print(f"wrote {out}\nload it with: datasets.load_dataset({str(out)!r}, name)  (configs: see {out}/README.md)")
    if demo:
        print(DEMO_NOTICE, file=sys.stderr)
    return 0


def _load_split(folder: str, config: str, split: str = "train", image_ids=None):
    """A split read in place from the shards the manifest names (never the `datasets` cache, never the card's paths)."""
    from .folder.reading import read_split

    return read_split(folder, config, split, image_ids=image_ids)


def cmd_stats(args) -> int:
    from .inspection.stats import folder_stats

    out = args.output or f"{args.config}_negatives.png"
    print(folder_stats(args.folder, args.config, out, split=args.split, tau=args.tau, sample=args.sample, seed=args.seed,
                       json_out=args.json))
    print(f"plot: {out}")
    if args.json:
        print(f"numbers: {args.json}")
    return 0


def cmd_preview(args) -> int:
    from .folder.manifest import BuildReport
    from .folder.reading import FolderImages
    from .inspection.preview import render_preview

    BuildReport.read(args.folder)  # a clear error for a refer source or any other folder

    refs = _load_split(args.folder, args.config, args.split)
    images = FolderImages(args.folder)  # read a row group at a time: memory holds the images drawn
    grid = render_preview(refs, images, n=args.n, output_size=args.size, seed=args.seed, config=args.config,
                          tile=args.tile, p={args.mode: 1.0}, grid=int(args.grid) if args.grid.isdigit() else args.grid,
                          pool=images.pool(args.config))
    grid.save(args.output)
    print(f"wrote {args.output}: {args.n} samples of {args.config}/{args.split}")
    return 0


def cmd_show(args) -> int:
    from .inspection.show import show_ref

    shown = show_ref(args.folder, args.config, ref_id=args.ref_id, sent_id=args.sent_id, show_all=args.all)
    out = args.output or f"ref_{args.ref_id if args.ref_id is not None else 'sent_' + str(args.sent_id)}.png"
    shown.image.save(out)
    print(shown.text)
    print(f"wrote {out}")
    return 0


def cmd_push(args) -> int:
    from .folder.push import plan_push, push_folder

    if args.dry_run:
        print(plan_push(args.folder, args.repo_id, include_images=not args.no_images,
                        delete_remote_images=args.delete_remote_images).describe())
        return 0
    url = push_folder(args.folder, args.repo_id, token=args.token, private=args.private, include_images=not args.no_images,
                      delete_remote_images=args.delete_remote_images)
    print(f"pushed {args.folder} to {args.repo_id} in one commit: {url}")
    return 0


def cmd_eval(args) -> int:
    import json

    from .evaluation.report import format_report, format_split_table, plot_breakdowns
    from .evaluation.scoring import Expressions, evaluate_predictions, split_tables
    from .zeroshot.provenance import provenance_banner

    splits = [split.strip() for split in args.split.split(",") if split.strip()]
    if len(splits) > 1 and "{split}" not in args.predictions:
        raise ValueError(f"--split {args.split}: give --predictions a {{split}} pattern, one file per split "
                         "(e.g. preds_{split}.jsonl)")
    reports = {}
    for split in splits:
        predictions = args.predictions.replace("{split}", split)
        refs, images = split_tables(args.folder, args.config, split)
        expressions = Expressions.from_tables(refs, images, where=f"{args.folder} ({args.config}/{split})")
        report = evaluate_predictions(
            expressions, predictions, strict=args.strict, empty_iou=args.empty_iou, allow_missing=args.allow_missing
        )
        report = {"folder": str(args.folder), "config": args.config, "split": split, "predictions": predictions, **report}
        banner = provenance_banner(predictions)  # zero-shot predictions made with the instances oracle
        if banner:
            report["oracle"] = banner
            print(banner)
        reports[split] = report
    title = f"{args.config}/{args.split} ({args.predictions})"
    print(format_report(reports[splits[0]], title) if len(splits) == 1 else format_split_table(reports, title))
    if args.json:
        out = reports[splits[0]] if len(splits) == 1 else {"splits": reports}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nreport: {args.json}")
    if args.plot:
        for split, report in reports.items():
            path = Path(args.plot)
            if len(splits) > 1:  # one picture per split: report.png -> report_val.png, report_testA.png, ...
                path = path.with_name(f"{path.stem}_{split}{path.suffix}")
            title = f"{args.config}/{split} ({report['predictions']})"
            print(f"plot: {plot_breakdowns(report, path, title)}")
    return 0


def cmd_zeroshot(args) -> int:
    from .zeroshot.run import build_predictor, format_summary, load_encoder, run_zeroshot

    predictor = build_predictor(
        load_encoder(args.model, args.batch_size), args.proposals, args.captioner, args.phrases,
        args.negative_phrases, args.synonym_threshold, args.spacy_model, args.rectifier, args.crop_box,
    )  # fmt: skip
    refs = _load_split(args.folder, args.config, args.split)
    images = _load_split(args.folder, "images", image_ids=set(refs["image_id"]))  # the split's images only
    summary = run_zeroshot(refs, images, predictor, args.output, args.cache_dir)
    print(format_summary(summary))
    print(f"score it (TAS counts Prec@X as IoU > X: --strict): nemo-hf eval {args.folder} --config {args.config} "
          f"--split {args.split} --predictions {args.output} --strict")
    return 0


def cmd_difficulty(args) -> int:
    import json

    from .folder.reading import FolderImages
    from .zeroshot.difficulty import format_difficulty, measure_difficulty, plot_difficulty
    from .zeroshot.run import DEMO_MODEL, build_predictor, load_encoder

    predictor = build_predictor(load_encoder(args.model, args.batch_size), phrases="vocabulary" if args.negatives else "none")
    refs = _load_split(args.folder, args.config, "train")
    images = FolderImages(args.folder)  # read a row group at a time: memory holds the images drawn
    report = measure_difficulty(refs, images, predictor, args.samples, args.seed, config=args.config,
                                output_size=args.size, pool=images.pool(args.config))  # fmt: skip
    demo = args.model == DEMO_MODEL
    print(format_difficulty(report, demo))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {args.json}")
    if args.output:
        plot_difficulty(report, args.output, demo)
        print(f"plot: {args.output}")
    return 0


def _what_was_kept(args) -> str:
    """The one line after Ctrl-C: what stays on disk and how to go on."""
    if args.command == "build":
        if args.no_mining:
            cache = "nothing is cached without mining"
        else:
            import datasets

            cache = args.embed_cache_dir or os.path.join(datasets.config.HF_DATASETS_CACHE, "nemo_hf_embeddings")
            cache = f"the embeddings computed so far are kept in {cache}"
        return f"{args.out} was not touched (an earlier build there is as it was); {cache}; the same command resumes"
    if args.command == "zeroshot":
        cache = args.cache_dir or f"{args.output}.cache"
        return f"no predictions file was written; the images done so far are kept in {cache}; the same command resumes"
    if args.command == "push":
        return "nothing was committed (a push is one commit)"
    return "nothing was written"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-hf", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"nemo-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="refer files -> hub-ready folder (Parquet + dataset card)")
    b.add_argument("--source", help="refer layout root; omit for the embedded synthetic demo")
    b.add_argument(
        "--dataset",
        action="append",
        help="refcoco | refcoco+ | refcocog | a config name | all (repeatable; default: refcoco with --source, "
        "all configs for the demo)",
    )
    b.add_argument("--split-by", action="append", help="unc | umd | google (default: unc, umd for refcocog)")
    b.add_argument("--image-dir", help="COCO train2014 folder (default <source>/images/mscoco/images/train2014)")
    b.add_argument("--out", required=True, help="output folder; an existing one is replaced atomically only if it is an "
                   "earlier nemo-hf build (nemo_hf.json and build files, nothing else), anything else is refused; "
                   "it may not overlap --source")
    b.add_argument(
        "--model",
        help="mining model id or local path (default openai/clip-vit-base-patch32 with --source; the demo uses "
        f"{DEMO_MODEL}, a randomly initialised CLIP that needs no download: meaningless negatives, for trying "
        "the pipeline offline on a real source)",
    )
    b.add_argument("--model-revision", help="hub revision (branch, tag or commit) of --model")
    b.add_argument("--tau", type=_tau, help="false-negative bound on the --mode similarity: "
                   "a cosine (0.9) or a percentile of it (p99, the default)")
    b.add_argument("--top-k", type=_positive, default=20, help="negatives kept per expression (default 20)")
    b.add_argument("--mode", choices=["i2i", "t2i"], default="i2i",
                   help="what tau bounds: image-to-image similarity to the target's image (i2i, default) "
                   "or the sentence's similarity to the negative (t2i)")
    b.add_argument("--index", choices=["flat", "ivf", "ivfpq", "hnsw"], default="flat",
                   help="flat: exact search (default); ivf / ivfpq / hnsw: approximate FAISS indexes for pools of "
                   "millions (ivfpq: 64-byte codes an image, candidates re-scored exactly)")
    b.add_argument("--embed-cache-dir", help="embedding cache (default <HF datasets cache>/nemo_hf_embeddings); "
                   "under several nodes, a folder all of them see")
    b.add_argument("--embed-batch-size", type=_positive, default=64, help="images or sentences per model forward")
    b.add_argument("--no-mining", action="store_true", help="leave the negative columns empty")
    b.add_argument("--skip-broken-eval-images", action="store_true",
                   help="build without the val/test refs whose image is missing or not decodable by PIL, listing "
                   "them in the card and nemo_hf.json (default: stop, naming them; an evaluation split must be complete)")
    b.add_argument("--demo-images", type=_positive, default=48, help="images in the synthetic demo source (default 48)")
    b.add_argument("--seed", type=_non_negative, default=0, help="seed of the synthetic demo source (default 0)")
    b.set_defaults(func=cmd_build)

    st = sub.add_parser(
        "stats", help="the similarity tau bounds and the mined negatives, as text and a PNG plot (choose tau and K)"
    )
    st.add_argument("folder", help="a folder written by nemo-hf build")
    st.add_argument("--config", default="refcoco_unc", help="refs config (default refcoco_unc)")
    st.add_argument("--split", default="train", help="split (default train: only training sentences have negatives)")
    st.add_argument("--tau", type=_tau, help="preview another tau (cosine or pNN) on the stored embeddings, without rebuilding")
    st.add_argument("--sample", type=_positive, default=500,
                    help="training sentences sampled for the similarity distribution (default 500)")
    st.add_argument("--seed", type=_non_negative, default=0, help="seed of that sample (default 0)")
    st.add_argument("-o", "--output", help="PNG path (default <config>_negatives.png)")
    st.add_argument("--json", help="also write the numbers (counts, distributions, tau and what it drops) as JSON here")
    st.set_defaults(func=cmd_stats)

    pv = sub.add_parser(
        "preview", help="a grid of mosaics with the mask outlined and the sentence and tile scores under each"
    )
    pv.add_argument("folder", help="a folder written by nemo-hf build")
    pv.add_argument("--config", default="refcoco_unc", help="refs config (default refcoco_unc)")
    pv.add_argument("--split", default="train", help="split (default train)")
    pv.add_argument("-n", type=_positive, default=16, help="mosaics in the grid (default 16)")
    pv.add_argument("--size", type=_side, default=256, help="side of each mosaic in pixels (default 256)")
    pv.add_argument("--tile", choices=["squash", "letterbox"], default="squash",
                    help="how a tile is fitted to its cell (default squash)")
    pv.add_argument("--mode", choices=["retrieval", "random", "single"], default="retrieval",
                    help="the mosaics drawn: retrieval (mined negatives; unmined rows fall back to random), random "
                    "tiles, or the target image alone (default retrieval)")
    pv.add_argument("--grid", choices=["2", "3", "mix"], default="2",
                    help="tiles per side: 2 (2x2, default), 3 (3x3, the official loader's option) or mix")
    pv.add_argument("--seed", type=_non_negative, default=0, help="picks the rows and renders them (default 0)")
    pv.add_argument("-o", "--output", default="grid.png", help="PNG path (default grid.png)")
    pv.set_defaults(func=cmd_preview)

    ev = sub.add_parser("eval", help="score a predictions file on a split: oIoU, mIoU, Prec@X and difficulty breakdowns")
    ev.add_argument("folder", help="a folder written by nemo-hf build")
    ev.add_argument("--config", default="refcoco_unc", help="refs config (default refcoco_unc)")
    ev.add_argument("--split", default="val", help="split whose expressions are scored (default val); several, "
                    "comma-separated (val,testA,testB), print one row per split, the papers' table")
    ev.add_argument("--predictions", required=True, help="JSON Lines or Parquet: sent_id + mask RLE at original size; "
                    "with several splits a pattern with {split} (preds_{split}.jsonl)")
    ev.add_argument("--strict", action="store_true", help="Prec@X counts IoU > X (CRIS, TAS) instead of >= X")
    ev.add_argument("--empty-iou", type=int, choices=[0, 1], default=0,
                    help="IoU of an expression whose prediction and ground truth are both empty")
    ev.add_argument("--allow-missing", action="store_true", help="score a missing expression as an empty prediction")
    ev.add_argument("--json", help="also write the report as JSON here")
    ev.add_argument("--plot", help="also draw the breakdowns as bar charts (PNG)")
    ev.set_defaults(func=cmd_eval)

    sh = sub.add_parser("show", help="one ref: its image with the mask, its sentences, and their negatives (like showRef)")
    sh.add_argument("folder", help="a folder written by nemo-hf build")
    sh.add_argument("--config", default="refcoco_unc", help="refs config (default refcoco_unc)")
    which = sh.add_mutually_exclusive_group(required=True)
    which.add_argument("--ref-id", type=_non_negative, help="the ref to show, with all its sentences")
    which.add_argument("--sent-id", type=_non_negative, help="a sentence: its ref, that sentence alone")
    sh.add_argument("--all", action="store_true",
                    help="every candidate the rule walked, best t2i first, the ones tau dropped marked in red")
    sh.add_argument("-o", "--output", help="PNG path (default ref_<id>.png or ref_sent_<id>.png)")
    sh.set_defaults(func=cmd_show)

    p = sub.add_parser("push", help="upload a built folder to the Hub in one atomic commit")
    p.add_argument("folder", help="a folder written by nemo-hf build")
    p.add_argument("--repo-id", required=True, help="USER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", help="default: HF_TOKEN or the cached login")
    p.add_argument("--no-images", action="store_true", help="push the refs configs only (image shards already on the Hub stay)")
    p.add_argument("--delete-remote-images", action="store_true", help="with --no-images: delete the image shards already on the Hub")
    p.add_argument("--dry-run", action="store_true",
                   help="check the folder as a push does and list what would be uploaded and deleted; no token, no network")
    p.set_defaults(func=cmd_push)

    z = sub.add_parser("zeroshot", help="TAS zero-shot segmentation of a split with CLIP -> a predictions file")
    z.add_argument("folder", help="a folder written by nemo-hf build (with the objects column)")
    z.add_argument("--config", default="refcoco_unc", help="refs config (default refcoco_unc)")
    z.add_argument("--split", default="val", help="split to segment (default val)")
    z.add_argument("--model", default="openai/clip-vit-base-patch32",
                   help="CLIP-like id or local path (default openai/clip-vit-base-patch32); demo-random: untrained")
    z.add_argument("--proposals", default="instances",
                   help="instances (ORACLE: the ground-truth instance masks; default) or sam:PATH_OR_ID (a SamModel)")
    z.add_argument("--captioner", help="image-to-text model id or path: adds TAS's caption term P")
    z.add_argument("--phrases", choices=["vocabulary", "spacy", "none"], default="vocabulary",
                   help="negative phrases for N: COCO names vs the image (offline default), spaCy noun chunks of "
                        "the caption (TAS; needs spaCy, a model and --captioner), or none")
    z.add_argument("--negative-phrases", type=_positive, default=3, help="m: vocabulary names kept per image (default 3)")
    z.add_argument("--synonym-threshold", type=float, default=0.9,
                   help="drop a negative phrase whose prompt has a cosine above this with the head phrase's (default 0.9)")
    z.add_argument("--spacy-model", default="en_core_web_trf", help="spaCy model for --phrases spacy (default en_core_web_trf)")
    z.add_argument("--rectifier", choices=["tas", "words"], default="tas",
                   help="spatial rectifier: TAS's (substrings of the sentence, TAS's word order and ties; default) or "
                        "words (whole words, contradictory sides cancel); with --phrases spacy, gated by TAS's parse")
    z.add_argument("--crop-box", choices=["tas", "extent"], default="tas",
                   help="proposal crop: TAS's SAM xywh box (last mask row and column outside; default) or the full extent")
    z.add_argument("--batch-size", type=_positive, default=64, help="crops per forward pass (default 64)")
    z.add_argument("--cache-dir", help="per-image feature cache (default <output>.cache): a rerun resumes from it")
    z.add_argument("-o", "--output", required=True, help="predictions file (.jsonl or .parquet)")
    z.set_defaults(func=cmd_zeroshot)

    d = sub.add_parser("difficulty", help="zero-shot accuracy and margin of sampled sentences single / random / retrieval")
    d.add_argument("folder", help="a folder written by nemo-hf build (mined, with the objects column)")
    d.add_argument("--config", default="refcoco_unc", help="refs config (default refcoco_unc)")
    d.add_argument("--model", default="openai/clip-vit-base-patch32",
                   help="CLIP-like id or local path (default openai/clip-vit-base-patch32); demo-random: untrained")
    d.add_argument("--samples", type=_positive, default=200, help="training sentences drawn (default 200)")
    d.add_argument("--seed", type=_non_negative, default=0, help="draws the sentences and renders them (default 0)")
    d.add_argument("--negatives", action="store_true", help="add TAS's N term (offline COCO-vocabulary phrases)")
    d.add_argument("--size", type=_side, default=480, help="side of the rendered samples in pixels (default 480)")
    d.add_argument("--batch-size", type=_positive, default=64, help="crops per forward pass (default 64)")
    d.add_argument("--json", help="also write the report (with every sample) as JSON here")
    d.add_argument("-o", "--output", help="also draw the report as a PNG here")
    d.set_defaults(func=cmd_difficulty)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging()
    first_few = next(f for h in logging.getLogger("nemo_hf").handlers if getattr(h, "nemo_hf_cli", False)
                     for f in h.filters if isinstance(f, _FirstFew))
    first_few.seen.clear()
    try:
        return _run(args)
    finally:
        for line in first_few.summary():
            print(f"WARNING {line}", file=sys.stderr)


def _run(args) -> int:
    try:
        if getattr(args, "config", None):  # a refs config: refcoco, refcocoplus, RefCOCO+_unc all say which
            args.config = refs_config(args.config)
        return args.func(args)
    except (ReferFormatError, ValueError, OSError, RankFailure) as err:  # ModelLoadError is an OSError
        print(f"nemo-hf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnemo-hf {args.command}: interrupted; {_what_was_kept(args)}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
