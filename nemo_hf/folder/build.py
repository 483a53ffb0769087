"""Writing a hub-ready folder: Parquet shards per config and split, a manifest and a dataset card.

The folder is written beside its destination and swapped into place at the end, so an interrupted
build never looks finished and never damages an earlier build at the same path. An existing
destination is replaced only when it is an earlier build (a manifest and nothing but the files a
build writes): nemo_hf never deletes what it did not write. A lock file beside the destination keeps
two builds from writing it at once, and the next build cleans up after an interrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import __version__, progress
from ..schema import DEFAULT_CONFIG, IMAGES_CONFIG, refs_config
from ..source.reader import open_source
from ..source.refer import ReferFormatError
from . import embeddings
from .card import PREVIEW_FILE
from .manifest import BUILD_FILES, EMBEDDINGS_NAME, MANIFEST, SHARD_NAME, BuildReport

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "500MB"  # the Hub's own choice for push_to_hub: the dataset viewer reads such shards well
class OutFolderError(ValueError):
    """``--out`` cannot be written: it is not an earlier nemo_hf build, it overlaps the source, or
    another build is writing it. Nothing was changed."""


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
    embed_batch_size: int = 64


def resolve_configs(source_root, datasets_and_split_bys: list[str]) -> list[str]:
    """``["all"]`` -> every refs config whose files are present; otherwise validated names."""
    if list(datasets_and_split_bys) == ["all"]:
        present = open_source(source_root).present_configs
        if not present:
            raise ReferFormatError(f"{source_root}: no refs(<split_by>).p + instances.json pair found")
        return present
    return list(dict.fromkeys(refs_config(name) for name in datasets_and_split_bys))  # refcocoplus, typos


def build_folder(
    source_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    configs: list[str] = (DEFAULT_CONFIG,),
    *,
    image_dir: str | os.PathLike | None = None,
    mining: MiningOptions | None = MiningOptions(),
    max_shard_size: str | int = MAX_SHARD_SIZE,
    skip_broken_eval_images: bool = False,
) -> Path:
    """Build ``configs`` (plus ``images``) from a refer source into ``out_dir``; returns ``out_dir``.

    ``mining=None`` leaves the negative columns empty. A val/test ref whose image cannot be used
    (missing, or not decodable by PIL) stops the build before anything is written
    (`nemo_hf.source.reader.IncompleteEvalError`), unless ``skip_broken_eval_images``: then such refs
    are left out and listed in the manifest and the card. An existing ``out_dir`` is replaced only if it
    is an earlier build (else `OutFolderError`, and nothing is touched). Under a launcher
    (``torchrun``, ``accelerate launch``: ``WORLD_SIZE`` > 1) every rank embeds its share into the
    shared embedding cache, then rank 0 alone selects and writes the folder while the others wait for
    it (``nemo_hf.mining.ranks``).
    """
    from ..mining.ranks import launched

    if launched():
        return _build_on_ranks(source_root, out_dir, configs, image_dir, mining, max_shard_size, skip_broken_eval_images)
    with progress.build_stages():
        return _build_folder(source_root, out_dir, configs, image_dir, mining, max_shard_size, skip_broken_eval_images)


def _check_source_images(source, configs: list[str], skip_broken_eval_images: bool) -> None:
    """Before anything is written: one declared size per image across the configs, and (unless told
    otherwise) every val/test ref's image usable."""
    source.declared_images(configs)
    if not skip_broken_eval_images:
        source.require_complete_eval(configs)


def _build_on_ranks(source_root, out_dir, configs, image_dir, mining: MiningOptions | None, max_shard_size,
                    skip_broken_eval_images: bool) -> Path:
    """Every rank embeds its share (per config, in turn), then rank 0 builds from the full cache."""
    import tempfile

    from nemo_hf_builders.nemo_refcoco import NemoRefcoco

    from ..mining.ranks import launched_ranks

    source = open_source(source_root, image_dir)
    source.forget_changed_images()
    _check_no_overlap(Path(out_dir).expanduser().resolve(), source)
    _check_replaceable(Path(out_dir).expanduser().resolve())  # fail before embedding; rank 0 checks again, locked
    configs = resolve_configs(source.root, list(configs))
    for config in configs:
        source.require(config)
    _check_source_images(source, configs, skip_broken_eval_images)
    with launched_ranks() as ranks, tempfile.TemporaryDirectory(prefix="nemo_hf_rank_") as scratch:
        for config in configs if mining is not None else ():
            builder = NemoRefcoco(config_name=config, source=str(source.root), image_dir=str(source.image_dir),
                                  cache_dir=scratch, mine=True, skip_broken_eval_images=skip_broken_eval_images,
                                  **asdict(mining))
            embedded = builder.embed_mining_share(ranks)
            logger.info("rank %d embedded %s for %s", ranks.rank, embedded, config)
        if not ranks.is_main:
            ranks.wait_for_main()
            return Path(out_dir).expanduser().resolve()
        try:
            with progress.build_stages():
                out = _build_folder(source.root, out_dir, configs, image_dir, mining, max_shard_size,
                                    skip_broken_eval_images)
        except BaseException as err:
            ranks.main_done(f"{type(err).__name__}: {err}")
            raise
        ranks.main_done(None)
        return out


def _build_folder(source_root, out_dir, configs, image_dir, mining, max_shard_size, skip_broken_eval_images) -> Path:
    out_dir = Path(out_dir).expanduser().resolve()
    source = open_source(source_root, image_dir)
    source.forget_changed_images()
    _check_no_overlap(out_dir, source)
    configs = resolve_configs(source.root, list(configs))
    for config in configs:
        source.require(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir), _interrupts_noted() as interrupts:
        _clean_up_after_interrupted_builds(out_dir)
        _check_replaceable(out_dir)
        _check_source_images(source, configs, skip_broken_eval_images)
        partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
        partial.mkdir()
        try:
            _build_into(partial, source, configs, mining, max_shard_size, skip_broken_eval_images)
            if interrupts:  # a Ctrl-C swallowed on the way (in a finaliser, a worker's teardown) still stops it
                raise KeyboardInterrupt
            _swap_into_place(partial, out_dir)
        except BaseException as err:
            shutil.rmtree(partial, ignore_errors=True)
            _raise_if_out_of_space(err, out_dir)
            raise
    return out_dir


def _raise_if_out_of_space(err: BaseException, out_dir: Path) -> None:
    """A full disk (or quota) anywhere in ``err``'s chain (`datasets` wraps it in a DatasetGenerationError
    that says nothing of space) as one OSError naming where, and what is left as it was."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" ({err.filename})" if err.filename else ""
            full = OSError(
                f"no space left on the device{where} while building {out_dir}: nothing was replaced (an earlier "
                f"build there is untouched) and the unfinished copy was removed; free space (the build writes a "
                f"full copy beside {out_dir} before swapping it in, plus the embedding cache) or choose another "
                "--out / --embed-cache-dir"
            )
            full.errno = err.errno
            raise full from None
        err = err.__cause__ or err.__context__


@contextlib.contextmanager
def _interrupts_noted():
    """Within: the first Ctrl-C raises KeyboardInterrupt as usual; every one is noted in the yielded list,
    which the swap checks. Only where Python's own handler is installed (the main thread, not changed by
    the caller)."""
    import signal
    import threading

    noted: list[int] = []
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield noted
        return

    def note(signum, frame):
        noted.append(signum)
        if len(noted) == 1:  # a second one (a worker passing the same Ctrl-C on) must not cut the cleanup short
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield noted
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _build_into(partial: Path, source, configs: list[str], mining: MiningOptions | None, max_shard_size,
                skip_broken_eval_images: bool = False) -> None:
    from nemo_hf_builders.nemo_refcoco import NemoRefcoco

    report = BuildReport(
        nemo_hf_version=__version__,
        source=str(source.root),
        default_config=DEFAULT_CONFIG if DEFAULT_CONFIG in configs else configs[0],
        eval_images_excluded_from_pools=len(source.eval_image_ids),
        skip_broken_eval_images=skip_broken_eval_images,
    )
    common = {"source": str(source.root), "image_dir": str(source.image_dir), "cache_dir": str(partial / ".cache"),
              "skip_broken_eval_images": skip_broken_eval_images}
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
        _name_by_content(partial, entry)
        report.configs[config] = entry
    if embedded_images:
        report.embeddings["images"] = embeddings.write_images(partial, embedded_images)
    logger.info("building %s (the images of %s)", IMAGES_CONFIG, ", ".join(configs))
    builder = NemoRefcoco(config_name=IMAGES_CONFIG, refs_configs=",".join(configs), **common)
    report.configs[IMAGES_CONFIG] = _name_by_content(partial, _prepare(builder, partial, IMAGES_CONFIG, max_shard_size))
    report.images = builder.image_notes
    train = report.configs[report.default_config]["splits"].get("train", {})
    if train.get("rows"):
        _write_preview(partial, report.default_config)
    else:  # every training ref skipped (or none): nothing to draw, and the card says so by its counts
        logger.warning("no preview.png: %s has no training refs to draw", report.default_config)
    for scratch in (".cache", ".staging"):
        shutil.rmtree(partial / scratch, ignore_errors=True)
    report.write(partial)
    from .card import write_card

    write_card(partial, report)


def _check_no_overlap(out_dir: Path, source) -> None:
    """``--out`` may not be, hold or lie inside the source or its image folder: a build never writes
    into, or replaces, what it reads."""
    for option, path in (("--source", source.root), ("--image-dir", source.image_dir)):
        path = Path(path).resolve()
        if out_dir == path or out_dir.is_relative_to(path) or path.is_relative_to(out_dir):
            raise OutFolderError(
                f"--out {out_dir} overlaps {option} {path}: choose an output folder outside the source"
            )


def _not_a_build(folder: Path, need_manifest: bool = True) -> str | None:
    """Why ``folder`` is not an earlier nemo_hf build (None if it is, or is empty): every entry must be
    a file a build writes, and the manifest must be one nemo_hf wrote."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    for entry in sorted(folder.rglob("*")):
        name = entry.relative_to(folder).as_posix()
        mode = entry.lstat().st_mode
        if stat.S_ISDIR(mode) and (name in ("data", embeddings.DIRECTORY) or re.fullmatch(r"data/[a-z0-9_]+", name)):
            continue
        if stat.S_ISREG(mode) and (name in BUILD_FILES or SHARD_NAME.fullmatch(name) or EMBEDDINGS_NAME.fullmatch(name)):
            continue
        return f"it holds {name}, which no build writes"
    if not need_manifest or not any(folder.iterdir()):
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"it has no readable {MANIFEST} manifest"
    if not (isinstance(manifest, dict) and "nemo_hf_version" in manifest and isinstance(manifest.get("configs"), dict)):
        return f"its {MANIFEST} was not written by nemo_hf"
    return None


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        reason = _not_a_build(out_dir)
        if reason:
            raise OutFolderError(
                f"--out {out_dir} exists and is not an earlier nemo-hf build ({reason}); a build replaces only "
                "a folder it wrote itself. Choose another --out, or move that folder away yourself"
            )


@contextlib.contextmanager
def _locked(out_dir: Path):
    """Hold ``.<out>.lock`` beside ``out_dir`` (flock, released if the process dies) for the whole build."""
    path = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutFolderError(
                f"--out {out_dir} is being written by another nemo-hf build (it holds {path}); "
                "wait for that build to finish, or choose another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the last holder removed the file after we opened it: lock the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def _clean_up_after_interrupted_builds(out_dir: Path) -> None:
    """Remove the partial folders an interrupted build of ``out_dir`` left beside it, and put back an
    earlier build that an interrupted swap had moved aside (the lock says no build is running)."""
    ours = re.compile(re.escape(f".{out_dir.name}.") + r"(partial|old)-[0-9a-f]{8}")
    for leftover in sorted(out_dir.parent.iterdir()):
        match = ours.fullmatch(leftover.name)
        if match is None:
            continue
        if match[1] == "partial":
            shutil.rmtree(leftover)
            logger.warning("removed %s, the unfinished folder of an interrupted build", leftover)
        elif not out_dir.exists() and _not_a_build(leftover) is None:
            leftover.rename(out_dir)
            logger.warning("put back %s: an interrupted build had moved this earlier build aside", out_dir)
        elif _not_a_build(leftover, need_manifest=False) is None:
            shutil.rmtree(leftover)
            logger.warning("removed %s, an earlier build already replaced by %s", leftover, out_dir)
        else:
            logger.warning("left %s alone: it holds files no build writes", leftover)


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

    from ..inspection.preview import render_preview

    def read(name: str, split: str) -> Dataset:
        files = sorted(str(p) for p in (folder / "data" / name).glob(f"{split}-*.parquet"))
        return Dataset.from_parquet(files, cache_dir=str(folder / ".cache"))

    render_preview(read(config, "train"), read(IMAGES_CONFIG, "train"), n=n, config=config).save(folder / PREVIEW_FILE)


def _name_by_content(folder: Path, entry: dict) -> dict:
    """Append each shard's content hash to its name (see ``SHARD_NAME``); returns ``entry``."""
    for split in entry["splits"].values():
        named = []
        for shard in split["shards"]:
            path = folder / shard
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
            path = path.rename(path.with_name(f"{path.stem}-{digest.hexdigest()[:16]}.parquet"))
            named.append(path.relative_to(folder).as_posix())
        split["shards"] = named
    return entry


def _swap_into_place(partial: Path, out_dir: Path) -> None:
    """Rename the finished folder into place; an older build is moved aside first and removed after
    (checked again just before: nothing added to it meanwhile is ever deleted)."""
    _check_replaceable(out_dir)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    partial.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
