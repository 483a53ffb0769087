"""Issue 22.6: a Hub model name that cannot be fetched fails at once (one attempt, HF_HUB_OFFLINE respected),
in build, zeroshot, difficulty and load_dataset alike (they all load through ``hub_access``), and the
message from Python names ``model="..."``. No test here touches the network: HF_HUB_OFFLINE=1, or an
endpoint on a local port nothing listens on (refused at once)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from conftest import write_tiny_source


def _closed_port() -> int:
    """A local port nothing listens on (bound, then closed): a connection to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_means_the_cache_only(monkeypatch):
    from huggingface_hub import constants

    from nemo_hf.mining.embed import Embedder, ModelLoadError, hub_access

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_access("nobody/no-such-model") == {"local_files_only": True}
    with pytest.raises(ModelLoadError, match='model="/path/to/clip" in Python') as err:
        Embedder.from_pretrained("nobody/no-such-model")
    assert "nobody/no-such-model" in str(err.value)


def test_a_local_directory_needs_no_look_at_the_hub(tmp_path):
    from nemo_hf.mining.embed import hub_access

    assert hub_access(str(tmp_path)) == {}


SCRIPT = """
import sys
from nemo_hf.cli import main
from nemo_hf.zeroshot.run import load_encoder
from nemo_hf.zeroshot.proposals import SamProposals
rc = main(["build", "--source", sys.argv[1], "--out", sys.argv[2], "--model", "nobody/no-such-model"])
print("build exit", rc)
for load in (lambda: load_encoder("nobody/no-such-model"), lambda: SamProposals.from_pretrained("nobody/no-sam")):
    try:
        load()
    except OSError as err:
        print("refused:", str(err).splitlines()[0])
"""


def test_an_unreachable_hub_is_tried_once(tmp_path):
    """The Hub refuses the connection: one attempt per model (no "Retrying in 1s ... 8s", each model said
    unreachable once), the build exits 2 with its message, the zero-shot CLIP and SAM loaders fail the same
    way. (huggingface_hub prints its retries through its own handler; main() adds nemo_hf's.)"""
    source = write_tiny_source(tmp_path / "src")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf_home")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(source), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "Retrying" not in run.stderr, run.stderr
    assert run.stderr.count("the Hub is unreachable") == 3
    assert "build exit 2" in run.stdout
    assert "nemo-hf build: error: cannot load embedding model 'nobody/no-such-model'" in run.stderr
    assert run.stdout.count("refused: cannot load") == 2
    assert not (tmp_path / "out").exists()
