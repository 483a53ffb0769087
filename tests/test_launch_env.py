"""Launcher variables that cannot work (issue 23 point 6): named at once, or within NEMO_HF_DIST_TIMEOUT, never a hang.

The rendezvous cases run `nemo-hf build` in a subprocess with a 5 s timeout and an outer limit, with TMPDIR
of their own, so that a hang fails the test and anything left in the temporary folder is seen.
"""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
from conftest import write_tiny_source

from nemo_hf.cli import main


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is outside 0\.\.1 \(WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK=-1 is outside 0\.\.1 \(WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "3", "RANK": "7"}, r"RANK=7 is outside 0\.\.2 \(WORLD_SIZE=3\)"),
    ({"WORLD_SIZE": "-2"}, r"WORLD_SIZE=-2 is not a number of processes"),
    ({"WORLD_SIZE": "2", "RANK": None}, r"WORLD_SIZE=2 but RANK not set"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": None}, r"WORLD_SIZE=2 but MASTER_ADDR not set"),
    ({"WORLD_SIZE": "2", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP port"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, r"LOCAL_RANK=2 is outside 0\.\.1 \(LOCAL_WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, r"LOCAL_RANK=-1 is outside 0\.\.1 \(WORLD_SIZE=2\)"),
])  # fmt: skip
def test_a_rank_that_cannot_exist_is_named_before_any_connection(tmp_path, monkeypatch, capsys, env, message):
    launch = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
              "NEMO_HF_DIST_TIMEOUT": "600", **env}  # fmt: skip
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name, value in launch.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    root = write_tiny_source(tmp_path / "src")
    start = time.monotonic()
    assert main(["build", "--source", str(root), "--out", str(tmp_path / "out"), "--no-mining"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert time.monotonic() - start < 60  # not waited for the 600 s timeout
    assert not (tmp_path / "out").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_world_size_2_with_one_process_fails_within_the_timeout_naming_it(tmp_path, rank):
    """Rank 0 alone waits for a rank 1 that never starts; rank 1 alone for a rank 0. Both stop within
    NEMO_HF_DIST_TIMEOUT (5 s here; torch retries a connection once) and say which variables to fix."""
    root = write_tiny_source(tmp_path / "src")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NEMO_HF_DIST_TIMEOUT": "5",
           "TMPDIR": str(scratch), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
    code = "import sys; from nemo_hf.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["build", "--source", str(root), "--out", str(tmp_path / "out"), "--no-mining"]
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"rank {rank} of 2: not all WORLD_SIZE=2 ranks met" in last and "within 5 s (NEMO_HF_DIST_TIMEOUT" in last
    assert "start one process per RANK 0..1" in last and "unset WORLD_SIZE" in last
    assert elapsed < 60
    assert not (tmp_path / "out").exists() and list(scratch.iterdir()) == []  # no nemo_hf_rank_* left
