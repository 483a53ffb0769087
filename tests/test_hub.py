"""Pushing at the huggingface_hub boundary: what would be committed, file by file, and what is refused."""

from pathlib import Path

import pytest
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from nemo_hf.folder import build_folder
from nemo_hf.folder.push import PushError, push_folder


class RecordingApi:
    """Stands in for the Hub's HTTP API (unreachable here) and keeps what crosses it."""

    def __init__(self, existing=()):
        self.existing = list(existing)
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/datasets/{repo_id}"

    def list_repo_files(self, repo_id, **kw):
        self.calls.append(("list_repo_files", repo_id, kw))
        return self.existing

    def create_commit(self, repo_id, operations, **kw):
        self.calls.append(("create_commit", repo_id, operations, kw))
        return None


@pytest.fixture(autouse=True)
def _isolated_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home/token"))


@pytest.fixture
def folder(tiny_source, tmp_path):
    return build_folder(tiny_source, tmp_path / "out", ["refcoco_unc"], mining=None)


def _payload(op):
    src = op.path_or_fileobj
    return Path(src).read_bytes() if isinstance(src, str) else bytes(src)


def test_push_is_one_commit_of_exactly_the_folder(folder):
    api = RecordingApi(existing=["data/refcoco_unc/train-00000-of-00002.parquet", ".gitattributes"])
    push_folder(folder, "someone/nemo-refcoco", token="hf_test", private=True, api=api)
    kinds = [c[0] for c in api.calls]
    assert kinds.count("create_commit") == 1 and kinds[0] == "create_repo"
    assert api.calls[0][2]["private"] is True and api.calls[0][2]["repo_type"] == "dataset"
    _, repo_id, ops, kw = next(c for c in api.calls if c[0] == "create_commit")
    assert repo_id == "someone/nemo-refcoco" and kw["repo_type"] == "dataset" and kw["token"] == "hf_test"

    added = {op.path_in_repo: _payload(op) for op in ops if isinstance(op, CommitOperationAdd)}
    on_disk = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert set(added) == set(on_disk)
    for name, data in on_disk.items():
        if name != "README.md":
            assert added[name] == data, name
    card = added["README.md"].decode()
    assert 'load_dataset("someone/nemo-refcoco", "refcoco_unc")' in card
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["task_categories"] == ["image-segmentation"] and meta["license"]
    assert {c["config_name"] for c in meta["configs"]} == {"refcoco_unc", "images"}
    # the stale shard of an older push is deleted in the same commit, .gitattributes is left alone
    assert [op.path_in_repo for op in ops if isinstance(op, CommitOperationDelete)] == [
        "data/refcoco_unc/train-00000-of-00002.parquet"
    ]


def test_no_images_pushes_refs_configs_only(folder):
    api = RecordingApi()
    push_folder(folder, "someone/refs-only", token="hf_test", include_images=False, api=api)
    ops = next(c for c in api.calls if c[0] == "create_commit")[2]
    paths = {op.path_in_repo for op in ops}
    assert not any(p.startswith("data/images/") for p in paths)
    assert any(p.startswith("data/refcoco_unc/") for p in paths)
    card = next(_payload(op) for op in ops if op.path_in_repo == "README.md").decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert {c["config_name"] for c in meta["configs"]} == {"refcoco_unc"}
    assert "No images here" in card and "Flickr licence" in card


def test_refusals_upload_nothing(folder, tmp_path):
    api = RecordingApi()
    with pytest.raises(PushError, match="no Hugging Face token"):
        push_folder(folder, "someone/x", api=api)
    for bad in ("no-namespace", "a/b/c", "someone/bad name", "/x", "someone/x--y"):
        with pytest.raises(PushError, match="not a Hub repo id"):
            push_folder(folder, bad, token="hf_test", api=api)
    shard = next((folder / "data/refcoco_unc").glob("val-*.parquet"))
    shard.unlink()
    with pytest.raises(PushError, match="refcoco_unc/val shard .* is missing; the card and the data disagree"):
        push_folder(folder, "someone/x", token="hf_test", api=api)
    (tmp_path / "half").mkdir()
    with pytest.raises(PushError, match="no build manifest"):
        push_folder(tmp_path / "half", "someone/x", token="hf_test", api=api)
    assert api.calls == []


def test_token_from_environment(folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    api = RecordingApi()
    push_folder(folder, "someone/x", api=api)
    assert next(c for c in api.calls if c[0] == "create_commit")[3]["token"] == "hf_from_env"


def test_dry_run_lists_the_commit_without_token_or_network(folder, monkeypatch, capsys):
    """Issue 22.9: `push --dry-run` checks the folder as a push does and lists exactly what the push would
    upload (the same files) and the deletion rule; no token (none is set here) and no Hub call."""
    from nemo_hf.cli import main

    def no_hub(*args, **kwargs):
        raise AssertionError("a dry run must not reach the Hub")

    monkeypatch.setattr("huggingface_hub.HfApi.__init__", no_hub)
    assert main(["push", str(folder), "--repo-id", "someone/x", "--dry-run", "--no-images"]) == 0
    listed = capsys.readouterr().out
    api = RecordingApi()
    push_folder(folder, "someone/x", token="hf_test", include_images=False, api=api)
    pushed = [op.path_in_repo for op in next(c for c in api.calls if c[0] == "create_commit")[2]]
    assert listed.startswith(f"would upload to someone/x in one commit ({len(pushed)} files):")
    for path in pushed:
        assert f"  {path}  (" in listed
    assert "  data/images/" not in listed and "except under data/images/ (--no-images)" in listed
    shard = next((folder / "data/refcoco_unc").glob("val-*.parquet"))
    shard.unlink()
    assert main(["push", str(folder), "--repo-id", "someone/x", "--dry-run"]) == 2
    assert "refcoco_unc/val shard" in capsys.readouterr().err
