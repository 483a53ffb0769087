"""Pushing a hub-ready folder in one atomic commit.

`upload_folder` may split a large upload into several commits and leave a half-pushed repo; here every
file goes into a single `create_commit`, which also deletes data files an older push left behind (a
stale shard would otherwise match the card's ``train-*.parquet`` pattern and be loaded).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token

from .card import PREVIEW_FILE, render_card
from .folder import MANIFEST, BuildReport
from .schema import IMAGES_CONFIG

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PushError(ValueError):
    """The folder, the repo id or the credentials are not fit to push; nothing was uploaded."""


def check_folder(folder: str | os.PathLike) -> BuildReport:
    """The folder's manifest, after checking that every shard it lists is there with its row count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder}: no such folder")
    try:
        report = BuildReport.read(folder)
    except FileNotFoundError as err:
        raise PushError(f"{err} (an interrupted build leaves no manifest)") from None
    if not (folder / "README.md").is_file():
        raise PushError(f"{folder}: no README.md dataset card; rebuild the folder")
    for config, entry in report.configs.items():
        for split, info in entry["splits"].items():
            rows = 0
            for shard in info["shards"]:
                path = folder / shard
                if not path.is_file():
                    raise PushError(f"{folder}: {config}/{split} shard {shard} is missing; the card and the data disagree")
                rows += pq.read_metadata(path).num_rows
            if rows != info["rows"]:
                raise PushError(f"{folder}: {config}/{split} has {rows} rows in its shards, the card says {info['rows']}")
    return report


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    include_images: bool = True,
    api: HfApi | None = None,
    commit_message: str = "Upload NeMo RefCOCO dataset (nemo_hf)",
) -> str:
    """Upload ``folder`` to the dataset repo ``repo_id`` in one commit; returns the commit URL.

    ``include_images=False`` pushes the refs configs alone (users bring their own COCO copy).
    """
    folder = Path(folder)
    if not REPO_ID.match(repo_id or "") or "--" in repo_id or ".." in repo_id:
        raise PushError(f"{repo_id!r} is not a Hub repo id; expected USER/NAME (letters, digits, '-', '_', '.')")
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    report = check_folder(folder)
    if not include_images:
        report = dataclasses.replace(report, configs={k: v for k, v in report.configs.items() if k != IMAGES_CONFIG})

    files = [MANIFEST] + [s for entry in report.configs.values() for split in entry["splits"].values() for s in split["shards"]]
    files += [f for f in report.embedding_files if (folder / f).is_file()]
    if (folder / PREVIEW_FILE).is_file():
        files.append(PREVIEW_FILE)
    card = render_card(report, repo=repo_id, preview=(folder / PREVIEW_FILE).is_file()).encode()
    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))

    api = api or HfApi()
    repo_url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
    pushed = set(files)
    stale = [f for f in api.list_repo_files(repo_id, repo_type="dataset", token=token) if f.startswith(("data/", "embeddings/")) and f not in pushed]
    operations += [CommitOperationDelete(path_in_repo=f) for f in stale]
    commit = api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="dataset", token=token)
    return getattr(commit, "commit_url", None) or str(repo_url)
