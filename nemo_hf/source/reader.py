"""A refer source folder: its refs configs, its images, and which images may serve as negatives.

RefCOCO, RefCOCO+ and RefCOCOg annotate the same COCO train2014 images, so whether an image is an
evaluation image is a property of the whole source, not of one config: an image that is val or test
in *any* refs file present is kept out of *every* training negative pool.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from functools import cached_property
from pathlib import Path

import simplejpeg
from PIL import Image

from ..pixels import to_8bit
from ..schema import REFS_CONFIGS, TRAIN_SPLIT
from . import refer

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 1 << 30  # never read a file this large into memory as "an image"


class ReferSource:
    """Reads a refer-layout folder once per process and answers the builder's questions about it."""

    def __init__(self, root: str | os.PathLike, image_dir: str | os.PathLike | None = None):
        self.root = Path(root).expanduser()
        self.image_dir = Path(image_dir).expanduser() if image_dir else refer.default_image_dir(self.root)
        if not self.root.is_dir():
            raise refer.ReferFormatError(f"{self.root}: source folder not found")
        self._refs: dict[str, list[dict]] = {}
        self._instances: dict[str, refer.Instances] = {}
        self._image_problems: dict[int, str | None] = {}
        self._rows: dict[str, tuple[dict, dict]] = {}

    def __repr__(self) -> str:
        return f"ReferSource(root={str(self.root)!r}, image_dir={str(self.image_dir)!r})"

    @cached_property
    def present_configs(self) -> list[str]:
        """Refs configs whose two annotation files exist, in schema order."""
        return [name for name, cfg in REFS_CONFIGS.items() if refer.is_present(self.root, cfg)]

    def require(self, config: str) -> None:
        cfg = REFS_CONFIGS[config]
        for path in (refer.refs_path(self.root, cfg), refer.instances_path(self.root, cfg)):
            if not path.is_file():
                found = ", ".join(self.present_configs) or "none"
                raise refer.ReferFormatError(
                    f"{path}: not found, so config {config!r} cannot be built (configs present in {self.root}: {found})"
                )

    def refs(self, config: str) -> list[dict]:
        if config not in self._refs:
            self.require(config)
            cfg = REFS_CONFIGS[config]
            path = refer.refs_path(self.root, cfg)
            refs = refer.load_refs(path)
            for ref in refs:
                if ref["split"] not in cfg.splits:
                    raise refer.ReferFormatError(
                        f"{path}: ref {ref['ref_id']} has split {ref['split']!r}; {config} has {', '.join(cfg.splits)}"
                    )
            self._refs[config] = refs
        return self._refs[config]

    def instances(self, config: str) -> refer.Instances:
        if config not in self._instances:
            self.require(config)
            self._instances[config] = refer.load_instances(refer.instances_path(self.root, REFS_CONFIGS[config]))
        return self._instances[config]

    @cached_property
    def _image_root(self) -> Path:
        return self.image_dir.resolve()

    def image_path(self, file_name: str) -> Path:
        """Where ``file_name`` lies, symlinks resolved; a ``ReferFormatError`` if that is outside ``image_dir``."""
        path = (self._image_root / file_name).resolve()
        if not path.is_relative_to(self._image_root):
            raise refer.ReferFormatError(f"{file_name!r} leads outside the image folder {self.image_dir}")
        return path

    def image_problem(self, image: dict) -> str | None:
        """Why an image file cannot be used (outside the image folder, missing, not a regular file, damaged,
        size differs from instances.json), or None.

        A JPEG is decoded strictly at 1/8 scale (the whole entropy-coded stream is read, and a libjpeg
        warning counts as damage); anything else is decoded in full by PIL.
        """
        image_id = int(image["id"])
        if image_id not in self._image_problems:
            problem = None
            try:
                path = self.image_path(image["file_name"])
                status = path.stat()
                if not stat.S_ISREG(status.st_mode):
                    raise refer.ReferFormatError("is not a regular file")
                if status.st_size > MAX_IMAGE_BYTES:
                    raise refer.ReferFormatError(f"is {status.st_size:,} bytes, more than an image of 32768x32768 needs")
                size = _decoded_size(path.read_bytes())
                if size != (int(image["width"]), int(image["height"])):
                    problem = f"is {size[0]}x{size[1]}, instances.json says {image['width']}x{image['height']}"
            except FileNotFoundError:
                problem = "is missing"
            except refer.ReferFormatError as err:
                problem = str(err)
            except Exception as err:  # PIL and libjpeg raise many types for corrupt files
                problem = f"is unreadable or damaged ({type(err).__name__}: {err})"
            if problem:
                logger.warning("skipping image %d: %s %s", image_id, image["file_name"], problem)
            self._image_problems[image_id] = problem
        return self._image_problems[image_id]

    def rows(self, config: str) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
        """Validated rows per split, and per split the refs skipped because their image is unusable.

        The rows are shared between callers, so none may change them (the builder mines into copies).
        """
        if config not in self._rows:
            self._rows[config] = self._read_rows(config)
        return self._rows[config]

    def _read_rows(self, config: str) -> tuple[dict[str, list[dict]], dict[str, list[str]]]:
        cfg = REFS_CONFIGS[config]
        instances = self.instances(config)
        rows: dict[str, list[dict]] = {split: [] for split in cfg.splits}
        skipped: dict[str, list[str]] = {split: [] for split in cfg.splits}
        refs = self.refs(config)
        self._check_images_present(config, refs, instances)
        for row in refer.ref_rows(refs, instances, refer.refs_path(self.root, cfg), self.image_problem, skipped):
            rows[row["split"]].append(row)
        return rows, skipped

    def _check_images_present(self, config: str, refs: list[dict], instances: refer.Instances) -> None:
        """Stop at once, in one line, when most images the refs name are not in the image folder: a wrong
        ``image_dir`` would otherwise skip every ref with a warning each and end in an empty build."""
        names = {instances.images[r["image_id"]]["file_name"] for r in refs if r["image_id"] in instances.images}
        missing = [n for n in sorted(names) if not (self.image_dir / n).exists()]
        if names and len(missing) * 2 > len(names):
            raise refer.ReferFormatError(
                f"{len(missing)} of the {len(names)} images that {config} names are not in {self.image_dir} "
                f"(e.g. {missing[0]}); point --image-dir (image_dir=) at the folder that holds them"
            )

    @cached_property
    def eval_image_ids(self) -> frozenset[int]:
        """Images with a non-train ref in any refs config present in the source."""
        return frozenset(
            int(ref["image_id"])
            for config in self.present_configs
            for ref in self.refs(config)
            if ref["split"] != TRAIN_SPLIT
        )

    def training_pool(self, config: str) -> list[int]:
        """Image ids that may serve as negatives (and random tiles) for ``config``'s training rows."""
        instances = self.instances(config)
        train_ids = {int(r["image_id"]) for r in self.refs(config) if r["split"] == TRAIN_SPLIT}
        return sorted(
            i for i in train_ids - self.eval_image_ids if self.image_problem(instances.images[i]) is None
        )


def _decoded_size(data: bytes) -> tuple[int, int]:
    """The (width, height) of an encoded image after decoding it all; raises on any damage."""
    if data[:2] == b"\xff\xd8":
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace in ("Gray", "YCbCr", "RGB"):  # what the mosaic decodes with libjpeg-turbo
            simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=1, min_height=1, strict=True)  # at 1/8 scale
            return width, height
    with Image.open(io.BytesIO(data)) as im:
        size = im.size
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        to_8bit(im)  # refuses pixels with no 8-bit meaning
    return size


_SOURCES: dict[tuple, ReferSource] = {}


def open_source(root: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> ReferSource:
    """One ReferSource per (root, image_dir, annotation files' mtimes) and process, so configs built
    one after another share what was read and checked."""
    root = Path(root).expanduser().resolve()
    files = sorted(root.glob("*/*.p")) + sorted(root.glob("*/instances.json")) if root.is_dir() else []
    key = (str(root), str(image_dir), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    if key not in _SOURCES:
        _SOURCES[key] = ReferSource(root, image_dir)
    return _SOURCES[key]
