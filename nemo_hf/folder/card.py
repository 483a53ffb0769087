"""The dataset card: YAML metadata that lets plain `datasets` and the Hub viewer load the folder, and
the text a user reads (counts, schema, mining provenance, sources, licences, citations)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template

from datasets import DatasetInfo
from datasets.info import DatasetInfosDict
from datasets.splits import SplitDict, SplitInfo
from datasets.utils.metadata import MetadataConfigs
from huggingface_hub import DatasetCardData

from ..schema import IMAGES_CONFIG, IMAGES_FEATURES, REFS_FEATURES

PREVIEW_FILE = "preview.png"


def card_yaml(report) -> str:
    configs, infos = {}, {}
    for name, entry in report.configs.items():
        splits = entry["splits"]
        configs[name] = {
            # the shards by name, content hash included: `datasets` keys its cache for a local folder on
            # this YAML, so a rebuild that changes any shard is never read back from a stale cache
            "data_files": [{"split": split, "path": v["shards"]} for split, v in splits.items()],
            **({"default": True} if name == report.default_config else {}),
        }
        infos[name] = DatasetInfo(
            features=IMAGES_FEATURES if name == IMAGES_CONFIG else REFS_FEATURES,
            config_name=name,
            splits=SplitDict({s: SplitInfo(name=s, num_examples=v["rows"], num_bytes=v["num_bytes"]) for s, v in splits.items()}),
        )
    data = DatasetCardData(
        license="cc-by-4.0",
        task_categories=["image-segmentation"],
        language=["en"],
        pretty_name="NeMo RefCOCO / RefCOCO+ / RefCOCOg",
        tags=["referring-image-segmentation", "refcoco", "nemo", "hard-negatives"],
    )
    MetadataConfigs(configs).to_dataset_card_data(data)
    DatasetInfosDict(infos).to_dataset_card_data(data)
    return data.to_yaml()


def _counts_table(report) -> str:
    lines = ["| config | split | refs | expressions | images |", "|---|---|---|---|---|"]
    for name, entry in report.configs.items():
        if name == IMAGES_CONFIG:
            continue
        for split, v in entry["splits"].items():
            lines.append(f"| {name} | {split} | {v['rows']:,} | {v['sentences']:,} | {v['images']:,} |")
    if IMAGES_CONFIG in report.configs:
        images = report.configs[IMAGES_CONFIG]["splits"]["train"]["rows"]
        lines.append(f"\n`images`: {images:,} images (the union of the configs above).")
    else:
        lines.append(
            "\n**No images here**: this repository holds the refs configs only. Join `file_name` with your own "
            "COCO train2014 copy (each image keeps its own Flickr licence), or build the `images` config with nemo_hf."
        )
    return "\n".join(lines)


def _skipped_text(report) -> str:
    lines = []
    for name, entry in report.configs.items():
        for split, refs in (entry.get("skipped") or {}).items():
            lines.append(f"- {name}/{split}: {len(refs)} refs skipped, e.g. {refs[0]}")
    if not lines:
        return "Every ref of the source was converted; no image was missing or unreadable.\n\n" + _images_text(report)
    text = "**Skipped** (their image file was missing, unreadable or of the wrong size; see nemo_hf.json):\n" + "\n".join(lines)
    if report.skip_broken_eval_images and any(
        split != "train" for entry in report.configs.values() for split in (entry.get("skipped") or {})
    ):
        text += (
            "\n\n**Incomplete evaluation splits**: built with `--skip-broken-eval-images`, so the val/test refs "
            "above were left out for want of a usable image. Scores on these splits are not comparable with "
            "published ones, which count every expression."
        )
    return text + "\n\n" + _images_text(report)


def _images_text(report) -> str:
    """How the stored images relate to the source files: PIL's decoding rule, warnings, orientation."""
    warned = report.images.get("decoded_with_warnings") or []
    turned = report.images.get("orientation_neutralised") or []
    text = "Images: an image is kept iff PIL decodes it, as the refer toolkit, LAVT and CARIS load images."
    if warned:
        first = warned[0]
        text += (
            f" {len(warned):,} decode with a libjpeg warning (e.g. image {first['image_id']}: {first['warning']}); "
            "PIL decodes them, so they are kept, bytes unchanged."
        )
    if turned:
        text += (
            f" {len(turned):,} carried an EXIF orientation tag: the stored bytes have it set to 1, the pixels untouched, "
            "so `datasets` (which applies the tag) and PIL both show the stored pixel order the masks refer to."
        )
    return text


def _mining_text(report) -> str:
    rows = ["| config | model | revision / weights | tau (as given -> cosine) | K | mode | index | pool images | sentences | fallbacks |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    demo = False
    for name, entry in report.configs.items():
        prov = entry.get("mining")
        if name == IMAGES_CONFIG:
            continue
        if not prov:
            rows.append(f"| {name} | not mined: negative columns are empty lists | | | | | | | | |")
            continue
        model = prov["model"]
        demo |= model["model_id"].startswith("nemo_hf-demo")
        weights = model.get("revision") or f"sha256 {str(model.get('checkpoint_sha256'))[:12]}"
        rows.append(
            f"| {name} | `{model['model_id']}` | {weights} | {prov['tau']} -> {prov['tau_cosine']:.4f} | {prov['top_k']} "
            f"| {prov['mode']} | {prov['index']} | {prov['pool_size']:,} | {prov['sentences']:,} | {prov['fallback_sentences']:,} |"
        )
    notes = (
        "\n\n**Demo build: the negatives were mined with a randomly initialised CLIP and are meaningless.**"
        if demo else ""
    )
    if report.embeddings:
        notes += (
            "\n\n`embeddings/` holds the mining model's L2-normalised embeddings (float16 bytes per cell, "
            '`np.frombuffer(cell, "<f2")`): `images.parquet` per image, `<config>.parquet` per training sentence. '
            "`nemo-hf stats` and `nemo-hf show` read them to plot tau and show each sentence's negatives without the model."
        )
    return (
        "For each training expression, candidate images of the training pool (own image excluded) are ranked by\n"
        "text-to-image similarity; candidates too similar to the target (above tau) are dropped as likely false\n"
        "negatives; the first K survivors form the pool (`nemo_hf.mining`). The full provenance (nemo_hf version,\n"
        "preprocessing hashes, seeds) is in `nemo_hf.json` and in each refs shard's Arrow schema metadata (key `nemo_hf`).\n\n"
        + "\n".join(rows) + notes
    )


def render_card(report, repo: str = "path/to/this/folder", preview: bool = False) -> str:
    template = Template(resources.files("nemo_hf_cards").joinpath("dataset_card.md").read_text())
    return template.substitute(
        yaml=card_yaml(report).strip(),
        title="NeMo RefCOCO / RefCOCO+ / RefCOCOg (nemo_hf)",
        version=report.nemo_hf_version,
        config_list=", ".join(f"`{c}`" for c in report.configs),
        default_config=report.default_config,
        repo=repo,
        preview=f"![NeMo mosaics with the target mask overlaid]({PREVIEW_FILE})" if preview else "",
        counts=_counts_table(report),
        skipped=_skipped_text(report),
        mining=_mining_text(report),
        excluded=f"{report.eval_images_excluded_from_pools:,}",
    )


def write_card(folder: str | Path, report, repo: str = "path/to/this/folder") -> Path:
    folder = Path(folder)
    path = folder / "README.md"
    path.write_text(render_card(report, repo=repo, preview=(folder / PREVIEW_FILE).is_file()))
    return path
