"""A refer source folder: its refs configs, its images, and which images may serve as negatives.

RefCOCO, RefCOCO+ and RefCOCOg annotate the same COCO train2014 images, so whether an image is an
evaluation image is a property of the whole source, not of one config: an image that is val or test
in *any* refs file present is kept out of *every* training negative pool.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from ..schema import REFS_CONFIGS, TRAIN_SPLIT
from . import refer
from .images import ImageCheck, check_image, neutral_orientation

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 1 << 30  # never read a file this large into memory as "an image"
SKIP_FLAG = "--skip-broken-eval-images (skip_broken_eval_images=True)"


class IncompleteEvalError(refer.ReferFormatError):
    """A val/test ref's image cannot be used: an evaluation split must be complete, so nothing is built."""


class ReferSource:
    """Reads a refer-layout folder once per process and answers the builder's questions about it."""

    def __init__(self, root: str | os.PathLike, image_dir: str | os.PathLike | None = None):
        self.root = Path(root).expanduser()
        self.image_dir = Path(image_dir).expanduser() if image_dir else refer.default_image_dir(self.root)
        if not self.root.is_dir():
            raise refer.ReferFormatError(f"{self.root}: source folder not found")
        self._refs: dict[str, list[dict]] = {}
        self._instances: dict[str, refer.Instances] = {}
        # (id, file_name, width, height) -> (problem, what decoding found, the file's identity when checked)
        self._image_checks: dict[tuple, tuple[str | None, ImageCheck | None, tuple | None]] = {}
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
        """Why an image file cannot be used (outside the image folder, missing, not a regular file, not
        decodable by PIL, size differs from instances.json), or None. See `nemo_hf.source.images`: an image
        PIL decodes is kept, libjpeg warnings and all."""
        return self._checked(image)[0]

    def image_warning(self, image: dict) -> str | None:
        """The libjpeg warning a usable image was decoded past, or None."""
        check = self._checked(image)[1]
        return check.warning if check else None

    def _checked(self, image: dict) -> tuple[str | None, ImageCheck | None, tuple | None]:
        key = (int(image["id"]), image["file_name"], int(image["width"]), int(image["height"]))
        if key not in self._image_checks:
            problem, check, identity = None, None, None
            try:
                data, identity = _read_image_file(self.image_path(image["file_name"]))
                check = check_image(data)
                if check.size != (int(image["width"]), int(image["height"])):
                    problem = f"is {check.size[0]}x{check.size[1]}, instances.json says {image['width']}x{image['height']}"
            except FileNotFoundError:
                problem = "is missing"
            except refer.ReferFormatError as err:
                problem = str(err)
            except Exception as err:  # PIL raises many types for corrupt files
                problem = f"is unreadable or damaged ({type(err).__name__}: {err})"
            if problem:
                logger.warning("skipping image %d: %s %s", key[0], image["file_name"], problem)
            elif check.warning:
                logger.info("image %d: %s decodes with a libjpeg warning (%s); kept, as PIL decodes it", key[0], image["file_name"], check.warning)
            self._image_checks[key] = (problem, None if problem else check, identity)
        return self._image_checks[key]

    def forget_changed_images(self) -> None:
        """Drop the checks of image files that changed since (one stat each) and every config's rows: a
        build starts with this, so a long-lived process never builds from an earlier build's verdicts."""
        changed = [key for key, (_, _, identity) in self._image_checks.items() if self._identity(key[1]) != identity]
        for key in changed:
            del self._image_checks[key]
        if changed:
            self._rows.clear()

    def _identity(self, file_name: str) -> tuple | None:
        try:
            status = self.image_path(file_name).stat()
        except (OSError, refer.ReferFormatError):
            return None
        return (status.st_ino, status.st_size, status.st_mtime_ns) if stat.S_ISREG(status.st_mode) else None

    def image_bytes(self, image: dict) -> tuple[bytes, int | None]:
        """The bytes a build stores for a usable image: the file's, with an EXIF/XMP orientation set to 1
        (losslessly), and the orientation that was neutralised (or None).

        A `ReferFormatError` when the file changed after it was checked: its rows were made for the
        checked file. This source is then forgotten, so that the next `open_source` reads everything again.
        """
        problem, check, identity = self._checked(image)
        path = self.image_dir / image["file_name"]
        if problem:
            raise refer.ReferFormatError(f"image {image['id']}: {path} {problem}")
        try:
            data, now = _read_image_file(self.image_path(image["file_name"]))
        except (OSError, refer.ReferFormatError) as err:
            data, now = None, f"{type(err).__name__}: {err}"
        if now != identity:
            for key in [k for k, source in _SOURCES.items() if source is self]:
                del _SOURCES[key]
            raise refer.ReferFormatError(
                f"image {image['id']}: {path} changed after nemo_hf checked it (size, time or inode differ); "
                "the rows were made for the file as it was: run the build again once the image folder is stable"
            )
        if check.orientation is None:
            return data, None
        return neutral_orientation(data), check.orientation

    def declared_images(self, configs: Iterable[str]) -> dict[int, dict]:
        """image_id -> its instances.json entry, over the images the refs of ``configs`` name.

        A `ReferFormatError` when two configs' instances.json declare one image differently (file name or
        size): its masks would be rasterised at one size over pixels of another.
        """
        declared: dict[int, tuple[dict, Path]] = {}
        for config in configs:
            instances = self.instances(config)
            for image_id in sorted({int(ref["image_id"]) for ref in self.refs(config)}):
                image = instances.images.get(image_id)
                if image is None:
                    continue  # ref_rows names the ref and the file
                first, where = declared.setdefault(image_id, (image, instances.path))
                if _declaration(first) != _declaration(image):
                    raise refer.ReferFormatError(
                        f"image {image_id} is declared differently by two instances.json files: {where} says "
                        f"{_describe(first)}, {instances.path} says {_describe(image)}; correct one of them, or "
                        "build these configs into separate folders"
                    )
        return {image_id: image for image_id, (image, _) in declared.items()}

    def require_complete_eval(self, configs: Iterable[str]) -> None:
        """An `IncompleteEvalError` naming each image a val/test ref of ``configs`` needs but cannot use.

        Benchmark numbers depend on every expression of an evaluation split, so such a ref is never
        dropped quietly; a build that is told to (``skip_broken_eval_images``) lists them in its card.
        """
        gaps: dict[int, tuple[dict, str, list[str]]] = {}
        for config in configs:
            self.rows(config)  # every ref checked first: a malformed one is reported as such
            instances = self.instances(config)
            for ref in sorted(self.refs(config), key=lambda r: r["ref_id"]):
                if ref["split"] == TRAIN_SPLIT:
                    continue
                image = instances.images[ref["image_id"]]
                problem = self.image_problem(image)
                if problem:
                    gaps.setdefault(int(image["id"]), (image, problem, []))[2].append(f"{config}/{ref['split']} ref {ref['ref_id']}")
        if not gaps:
            return
        shown = [
            f"image {image_id} {image['file_name']} {problem} (needed by {', '.join(refs)})"
            for image_id, (image, problem, refs) in list(gaps.items())[:3]
        ]
        more = f"; and {len(gaps) - 3} more images" if len(gaps) > 3 else ""
        n_refs = sum(len(refs) for _, _, refs in gaps.values())
        raise IncompleteEvalError(
            f"{n_refs} val/test refs need an image that cannot be used, and an evaluation split must be complete: "
            f"{'; '.join(shown)}{more}. Nothing was written. Restore those files (in {self.image_dir}), or pass "
            f"{SKIP_FLAG} to build without these refs (the card and nemo_hf.json then list them)"
        )

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


def _read_image_file(path: Path) -> tuple[bytes, tuple[int, int, int]]:
    """A regular file's bytes and its identity (inode, size, mtime) as read; never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise refer.ReferFormatError("is not a regular file")
        if status.st_size > MAX_IMAGE_BYTES:
            raise refer.ReferFormatError(f"is {status.st_size:,} bytes, more than an image of 32768x32768 needs")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    finally:
        os.close(fd)
    return data, (status.st_ino, status.st_size, status.st_mtime_ns)


def _declaration(image: dict) -> tuple:
    return image["file_name"], int(image["width"]), int(image["height"])


def _describe(image: dict) -> str:
    return f"{image['file_name']} {image['width']}x{image['height']}"


_SOURCES: dict[tuple, ReferSource] = {}


def open_source(root: str | os.PathLike, image_dir: str | os.PathLike | None = None) -> ReferSource:
    """One ReferSource per (root, image_dir, annotation files' mtimes) and process, so configs built
    one after another share what was read and checked."""
    root = Path(root).expanduser().resolve()
    files = sorted(root.glob("*/*.p")) + sorted(root.glob("*/instances.json")) if root.is_dir() else []
    # the default image folder named or not, relative or absolute: one source (the builder names it)
    image_dir = Path(image_dir).expanduser().resolve() if image_dir else refer.default_image_dir(root).resolve()
    key = (str(root), str(image_dir), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    if key not in _SOURCES:
        _SOURCES[key] = ReferSource(root, image_dir)
    return _SOURCES[key]
