"""Writing a hub-ready folder: Parquet shards per config and split, a manifest and a dataset card.

The folder is written beside its destination and swapped into place at the end, so an interrupted
build never looks finished and never damages an earlier build at the same path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__, embeddings, progress
from .refer import ReferFormatError
from .schema import DEFAULT_CONFIG, IMAGES_CONFIG, REFS_CONFIGS
from .source import open_source

logger = logging.getLogger(__name__)

MANIFEST = "nemo_hf.json"
MAX_SHARD_SIZE = "500MB"  # the Hub's own choice for push_to_hub: the dataset viewer reads such shards well


@dataclass
class MiningOptions:
    """What `nemo-hf build` passes to the builder's mining fields."""

    model: str = "openai/clip-vit-base-patch32"
    model_revision: str | None = None
    tau: str = "p99"
    top_k: int = 20
    mode: str = "i2i"
    index: str = "flat"
    embed_cache_dir: str | None = None


@dataclass
class BuildReport:
    """The manifest: what a folder holds and how it was made; the card is rendered from it."""

    nemo_hf_version: str
    source: str
    configs: dict = field(default_factory=dict)  # name -> {"splits": {split: {...counts, shards}}, "mining": ..., "skipped": ...}
    default_config: str = DEFAULT_CONFIG
    eval_images_excluded_from_pools: int = 0
    embeddings: dict = field(default_factory=dict)  # the mining embeddings kept beside the data (nemo_hf.embeddings)

    @property
    def embedding_files(self) -> list[str]:
        return [self.embeddings[k] for k in ("images",) if k in self.embeddings] + list(
            self.embeddings.get("sentences", {}).values()
        )

    def write(self, folder: Path) -> None:
        (folder / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "BuildReport":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            if Path(folder).is_dir() and any(
                (Path(folder) / REFS_CONFIGS[c].dataset / "instances.json").is_file() for c in REFS_CONFIGS
            ):
                raise FileNotFoundError(
                    f"{folder} is a refer source, not a built folder: build one first with "
                    f"`nemo-hf build --source {folder} --out DIR`, then point this command at DIR"
                )
            raise FileNotFoundError(f"{path}: no build manifest; is {folder} a folder written by `nemo-hf build`?")
        return cls(**json.loads(path.read_text()))


def resolve_configs(source_root, datasets_and_split_bys: list[str]) -> list[str]:
    """``["all"]`` -> every refs config whose files are present; otherwise validated names."""
    if list(datasets_and_split_bys) == ["all"]:
        present = open_source(source_root).present_configs
        if not present:
            raise ReferFormatError(f"{source_root}: no refs(<split_by>).p + instances.json pair found")
        return present
    unknown = [c for c in datasets_and_split_bys if c not in REFS_CONFIGS]
    if unknown:
        raise ValueError(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(REFS_CONFIGS)} or all")
    return list(dict.fromkeys(datasets_and_split_bys))


def build_folder(
    source_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    configs: list[str] = (DEFAULT_CONFIG,),
    *,
    image_dir: str | os.PathLike | None = None,
    mining: MiningOptions | None = MiningOptions(),
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> Path:
    """Build ``configs`` (plus ``images``) from a refer source into ``out_dir``; returns ``out_dir``.

    ``mining=None`` leaves the negative columns empty.
    """
    with progress.build_stages():
        return _build_folder(source_root, out_dir, configs, image_dir, mining, max_shard_size)


def _build_folder(source_root, out_dir, configs, image_dir, mining, max_shard_size) -> Path:
    from nemo_hf_builders.nemo_refcoco import NemoRefcoco

    out_dir = Path(out_dir).expanduser().resolve()
    source = open_source(source_root, image_dir)
    configs = resolve_configs(source.root, list(configs))
    for config in configs:
        source.require(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        report = BuildReport(
            nemo_hf_version=__version__,
            source=str(source.root),
            default_config=DEFAULT_CONFIG if DEFAULT_CONFIG in configs else configs[0],
            eval_images_excluded_from_pools=len(source.eval_image_ids),
        )
        common = {"source": str(source.root), "image_dir": str(source.image_dir), "cache_dir": str(partial / ".cache")}
        mining_fields = {"mine": False} if mining is None else {"mine": True, **asdict(mining)}
        embedded_images: dict = {}
        for config in configs:
            logger.info("building %s from %s", config, source.root)
            builder = NemoRefcoco(config_name=config, **common, **mining_fields)
            entry = _prepare(builder, partial, config, max_shard_size)
            entry["mining"] = builder.provenance
            entry["skipped"] = {split: refs for split, refs in builder.skipped.items() if refs}
            if builder.provenance:
                _stamp_provenance(partial, entry, builder.provenance)
            if builder.embeddings is not None:
                _keep_embeddings(partial, report, config, builder, embedded_images)
            report.configs[config] = entry
        if embedded_images:
            report.embeddings["images"] = embeddings.write_images(partial, embedded_images)
        logger.info("building %s (the images of %s)", IMAGES_CONFIG, ", ".join(configs))
        builder = NemoRefcoco(config_name=IMAGES_CONFIG, refs_configs=",".join(configs), **common)
        report.configs[IMAGES_CONFIG] = _prepare(builder, partial, IMAGES_CONFIG, max_shard_size)
        _write_preview(partial, report.default_config)
        for scratch in (".cache", ".staging"):
            shutil.rmtree(partial / scratch, ignore_errors=True)
        report.write(partial)
        from .card import write_card

        write_card(partial, report)
        _swap_into_place(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir


def _prepare(builder, partial: Path, config: str, max_shard_size) -> dict:
    """Run the builder into Parquet and move its shards to ``data/<config>/<split>-XXXXX-of-YYYYY.parquet``."""
    from datasets.exceptions import DatasetGenerationError

    staging = partial / ".staging" / config
    try:
        builder.download_and_prepare(output_dir=str(staging), file_format="parquet", max_shard_size=max_shard_size)
    except DatasetGenerationError as err:  # a bad annotation found while rows are written: say which
        if isinstance(err.__cause__, ReferFormatError):
            raise err.__cause__ from None
        raise
    target = partial / "data" / config
    target.mkdir(parents=True)
    splits = {}
    for split in builder.info.splits:
        files = sorted(staging.glob(f"{builder.dataset_name}-{split}*.parquet"))
        shards = []
        for i, path in enumerate(files):
            dest = target / f"{split}-{i:05d}-of-{len(files):05d}.parquet"
            path.rename(dest)
            shards.append(dest.relative_to(partial).as_posix())
        info = builder.info.splits[split]
        splits[split] = {"rows": info.num_examples, "num_bytes": info.num_bytes, "shards": shards, **_counts(partial, shards)}
    return {"splits": splits}


def _counts(folder: Path, shards: list[str]) -> dict:
    """Sentences and distinct images of a refs split (images config: bytes only)."""
    schema = pq.read_schema(folder / shards[0])
    if "sentences" not in schema.names:
        return {"bytes": sum((folder / s).stat().st_size for s in shards)}
    sentences, images = 0, set()
    for shard in shards:
        table = pq.read_table(folder / shard, columns=["sentences", "image_id"])
        sentences += pc.sum(pc.list_value_length(table["sentences"])).as_py() or 0
        images.update(table["image_id"].to_pylist())
    return {"sentences": sentences, "images": len(images)}


def _keep_embeddings(folder: Path, report: BuildReport, config: str, builder, embedded_images: dict) -> None:
    """The config's sentence embeddings into ``embeddings/<config>.parquet``; its image ones join the build's."""
    kept = builder.embeddings
    report.embeddings.setdefault("model", builder.provenance["model"])
    report.embeddings["dtype"] = embeddings.DTYPE
    report.embeddings.setdefault("sentences", {})[config] = embeddings.write_sentences(folder, config, kept)
    embedded_images.update(zip(kept.image_ids, kept.images))


def _stamp_provenance(folder: Path, entry: dict, provenance: dict) -> None:
    """Mining provenance into each refs shard's Arrow schema metadata (key ``nemo_hf``)."""
    blob = json.dumps(provenance, sort_keys=True).encode()
    for split in entry["splits"].values():
        for shard in split["shards"]:
            path = folder / shard
            table = pq.read_table(path)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"nemo_hf": blob})
            pq.write_table(table, path)


def _write_preview(folder: Path, config: str, n: int = 8) -> None:
    """A grid of mosaics for the card (and the Hub page): a person can see at once that masks land right."""
    from datasets import Dataset

    from .card import PREVIEW_FILE
    from .preview import render_preview

    def read(name: str, split: str) -> Dataset:
        files = sorted(str(p) for p in (folder / "data" / name).glob(f"{split}-*.parquet"))
        return Dataset.from_parquet(files, cache_dir=str(folder / ".cache"))

    render_preview(read(config, "train"), read(IMAGES_CONFIG, "train"), n=n, config=config).save(folder / PREVIEW_FILE)


def _swap_into_place(partial: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an older build is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    partial.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
