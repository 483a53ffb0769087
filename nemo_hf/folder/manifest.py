"""The manifest of a built folder (``nemo_hf.json``) and the names of the files a build writes.

Every command that reads a folder starts here; `BuildReport.read` refuses a manifest that would make it
read outside the folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..schema import DEFAULT_CONFIG, REFS_CONFIGS
from . import embeddings
from .card import PREVIEW_FILE
from .files import inside

MANIFEST = "nemo_hf.json"
MAX_MANIFEST = 16 << 20  # a manifest names shards and counts: kilobytes; more is not one
# data/<config>/<split>-00000-of-00001-<content hash>.parquet: the card lists the shards by name, and the
# `datasets` cache keys a local folder on its card, so the hash makes every changed build new to it
# (builds of nemo_hf 0.1.0 before the hash are earlier builds too)
SHARD_NAME = re.compile(r"data/[a-z0-9_]+/[A-Za-z0-9_]+-\d{5}-of-\d{5}(-[0-9a-f]{16})?\.parquet")
EMBEDDINGS_NAME = re.compile(rf"{embeddings.DIRECTORY}/[a-z0-9_]+\.parquet")  # images.parquet, <config>.parquet
BUILD_FILES = (MANIFEST, "README.md", PREVIEW_FILE)


@dataclass
class BuildReport:
    """The manifest: what a folder holds and how it was made; the card is rendered from it."""

    nemo_hf_version: str
    source: str
    configs: dict = field(default_factory=dict)  # name -> {"splits": {split: {...counts, shards}}, "mining": ..., "skipped": ...}
    default_config: str = DEFAULT_CONFIG
    eval_images_excluded_from_pools: int = 0
    embeddings: dict = field(default_factory=dict)  # the mining embeddings kept beside the data (nemo_hf.folder.embeddings)
    # the stored images: "decoded_with_warnings" [{image_id, file_name, warning}] (kept: PIL decodes them),
    # "orientation_neutralised" [{image_id, file_name, orientation}] (EXIF/XMP orientation set to 1 in the bytes)
    images: dict = field(default_factory=dict)
    skip_broken_eval_images: bool = False  # built with val/test refs left out for want of a usable image

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
        if os.path.lexists(path):  # a FIFO, a device, a directory or a link there is named, never read
            inside(folder, MANIFEST, "build manifest")
            if path.stat().st_size > MAX_MANIFEST:
                raise ValueError(f"{path}: {path.stat().st_size >> 20} MiB, too large for a nemo_hf build manifest")
        if not path.is_file():
            if Path(folder).is_dir() and any(
                (Path(folder) / REFS_CONFIGS[c].dataset / "instances.json").is_file() for c in REFS_CONFIGS
            ):
                raise FileNotFoundError(
                    f"{folder} is a refer source, not a built folder: build one first with "
                    f"`nemo-hf build --source {folder} --out DIR`, then point this command at DIR"
                )
            raise FileNotFoundError(f"{path}: no build manifest; is {folder} a folder written by `nemo-hf build`?")
        try:
            report = cls(**json.loads(path.read_text()))
        except (ValueError, TypeError, RecursionError) as err:  # not JSON (or too deep), not an object, other keys
            raise ValueError(f"{path}: not a nemo_hf build manifest ({err})") from None
        report._check_shards(path)
        return report

    def _check_shards(self, path: Path) -> None:
        """Every shard the manifest names is a relative path inside the folder: commands read them, and a
        folder from a stranger must not make them read elsewhere."""
        if not isinstance(self.configs, dict):
            raise ValueError(f"{path}: 'configs' is not an object; not a nemo_hf build manifest")
        for name, entry in self.configs.items():
            splits = entry.get("splits") if isinstance(entry, dict) else None
            if not isinstance(splits, dict) or not all(isinstance(s, dict) and isinstance(s.get("shards"), list) for s in splits.values()):
                raise ValueError(f"{path}: config {name!r} has no splits with shard lists; not a nemo_hf build manifest")
            for split, info in splits.items():
                for shard in info["shards"]:
                    if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
                        raise ValueError(f"{path}: {name}/{split} shard {shard!r} is not a file inside the folder (an absolute or a '..' path)")
