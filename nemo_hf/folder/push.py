"""Pushing a hub-ready folder in one atomic commit.

`upload_folder` may split a large upload into several commits and leave a half-pushed repo; here every
file goes into a single `create_commit`, which also deletes data files an older push left behind (a
stale shard would otherwise match the card's ``train-*.parquet`` pattern and be loaded).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

from ..schema import IMAGES_CONFIG
from .card import PREVIEW_FILE, render_card
from .manifest import MANIFEST, BuildReport

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PushError(ValueError):
    """The folder, the repo id or the credentials are not fit to push; nothing was uploaded."""


def check_folder(folder: str | os.PathLike) -> BuildReport:
    """The folder's manifest, after checking that it lists at least one config, that every shard it lists
    is there with its row count, and that each file to upload is a regular file really inside the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder")
    try:
        report = BuildReport.read(folder)
    except FileNotFoundError as err:
        raise PushError(f"{err} (an interrupted build leaves no manifest)") from None
    except (ValueError, TypeError) as err:
        raise PushError(f"{folder}/{MANIFEST}: not a manifest written by nemo-hf build ({err})") from None
    if not (folder / "README.md").is_file():
        raise PushError(f"{folder}: no README.md dataset card; rebuild the folder")
    if not isinstance(report.configs, dict) or not report.configs:
        raise PushError(f"{folder}/{MANIFEST} lists no config; rebuild the folder")
    for config, entry in report.configs.items():
        splits = entry.get("splits") if isinstance(entry, dict) else None
        if not isinstance(splits, dict) or not splits or not all(isinstance(i, dict) and i.get("shards") for i in splits.values()):
            raise PushError(f"{folder}: config {config} lists no shards in {MANIFEST}; rebuild the folder")
        for split, info in splits.items():
            rows = 0
            for shard in info["shards"]:
                path = folder / shard if isinstance(shard, str) else None
                if path is None or not (path.is_file() or path.is_symlink()):
                    raise PushError(f"{folder}: {config}/{split} shard {shard} is missing; the card and the data disagree")
                rows += pq.read_metadata(_inside(folder, shard)).num_rows
            if rows != info.get("rows"):
                raise PushError(f"{folder}: {config}/{split} has {rows} rows in its shards, the card says {info.get('rows')}")
    if (folder / PREVIEW_FILE).exists() or (folder / PREVIEW_FILE).is_symlink():
        _inside(folder, PREVIEW_FILE)
    return report


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` if it is a regular file whose real path is that very path (no symlink anywhere,
    no ``..``, not absolute); else a PushError: push uploads nothing from outside the folder."""
    root = Path(os.path.realpath(folder))
    path = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts or Path(os.path.realpath(path)) != path:
        raise PushError(f"{folder}: {name} is not a file inside the folder (a symlink, an absolute or a '..' path); refusing to push")
    if not stat.S_ISREG(path.lstat().st_mode):
        raise PushError(f"{folder}: {name} is not a regular file; refusing to push")
    return path


@dataclasses.dataclass
class PushPlan:
    """What a push uploads (paths in the repo; the card is rendered for the repo) and which remote files it
    deletes: those under ``deletes_under`` that it does not upload, except ``keeps_under``."""

    folder: Path
    repo_id: str
    files: list[str]
    card: bytes
    deletes_under: tuple[str, ...] = ("data/", "embeddings/")
    keeps_under: tuple[str, ...] = ()

    def describe(self) -> str:
        """The dry run's listing: each file with its size, then the deletion rule (the remote is not read)."""
        lines = [f"would upload to {self.repo_id} in one commit ({len(self.files) + 1} files):"]
        total = len(self.card)
        for name in self.files:
            size = (self.folder / name).stat().st_size
            total += size
            lines.append(f"  {name}  ({_size(size)})")
        lines.append(f"  README.md  ({_size(len(self.card))}, the dataset card rendered for {self.repo_id})")
        lines.append(f"  total {_size(total)}")
        kept = f", except under {', '.join(self.keeps_under)} (--no-images)" if self.keeps_under else ""
        lines.append(f"would delete: every file already in {self.repo_id} under {', '.join(self.deletes_under)} "
                     f"that is not uploaded above{kept} (a dry run does not read the remote)")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def plan_push(folder: str | os.PathLike, repo_id: str, *, include_images: bool = True,
              delete_remote_images: bool = False) -> PushPlan:
    """Every check a push makes before its first call to the Hub (repo id, folder, files), and what it
    would upload and delete. Needs no token and no network: ``nemo-hf push --dry-run`` prints it."""
    folder = Path(folder)
    if not REPO_ID.match(repo_id or "") or "--" in repo_id or ".." in repo_id:
        raise PushError(f"{repo_id!r} is not a Hub repo id; expected USER/NAME (letters, digits, '-', '_', '.')")
    report = check_folder(folder)
    if not include_images:
        report = dataclasses.replace(report, configs={k: v for k, v in report.configs.items() if k != IMAGES_CONFIG})
        if not report.configs:
            raise PushError(f"{folder}: holds no refs config, so --no-images would push nothing")
    files = [MANIFEST] + [s for entry in report.configs.values() for split in entry["splits"].values() for s in split["shards"]]
    files += [f for f in report.embedding_files if (folder / f).is_file()]
    preview = (folder / PREVIEW_FILE).is_file()
    if preview:
        files.append(PREVIEW_FILE)
    for name in files:
        _inside(folder, name)
    keeps = () if include_images or delete_remote_images else (f"data/{IMAGES_CONFIG}/",)
    return PushPlan(folder, repo_id, files, render_card(report, repo=repo_id, preview=preview).encode(), keeps_under=keeps)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    include_images: bool = True,
    delete_remote_images: bool = False,
    api: HfApi | None = None,
    commit_message: str = "Upload NeMo RefCOCO dataset (nemo_hf)",
) -> str:
    """Upload ``folder`` to the dataset repo ``repo_id`` in one commit; returns the commit URL.

    ``include_images=False`` pushes the refs configs alone (users bring their own COCO copy); image
    shards already in the repo stay there unless ``delete_remote_images``. Every check runs before the
    first call to the Hub (``plan_push``); a network failure is a PushError in one line.
    """
    if not REPO_ID.match(repo_id or "") or "--" in repo_id or ".." in repo_id:
        raise PushError(f"{repo_id!r} is not a Hub repo id; expected USER/NAME (letters, digits, '-', '_', '.')")
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    plan = plan_push(folder, repo_id, include_images=include_images, delete_remote_images=delete_remote_images)
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(_inside(plan.folder, f))) for f in plan.files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=plan.card))

    api = api or HfApi()
    try:
        repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
        pushed = set(plan.files)
        stale = [
            f for f in api.list_repo_files(repo_id, repo_type="dataset", token=token)
            if f.startswith(plan.deletes_under) and f not in pushed and not (plan.keeps_under and f.startswith(plan.keeps_under))
        ]
        operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="dataset", token=token)
    except Exception as err:  # offline, refused, rate-limited: huggingface_hub and httpx raise many types
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise PushError(f"pushing to {repo_id} failed ({type(err).__name__}: {first_line}); nothing was committed") from err
    return getattr(commit, "commit_url", None) or str(repo_url)
