"""Mining on two ranks (gloo, CPU): a rank that dies is named, the re-run under torchrun resumes from
the cache, each rank embeds only its share, and the folder's cells equal a one-process build's."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nemo_hf.cli import main
from nemo_hf.mining.ranks import Ranks
from nemo_hf.source.synthetic import make_refer_source

RUNNER = Path(__file__).with_name("_rank_runner.py")
BATCH = 4
OPTIONS = ["--dataset", "refcoco", "--model", "demo-random", "--top-k", "5", "--embed-batch-size", str(BATCH)]


def _cached(cache: Path, kind: str) -> int:
    import numpy as np

    return sum(len(np.load(chunk)["keys"]) for chunk in cache.glob(f"{kind}-*/chunk-*.npz"))


def _counts(folder: Path, ranks=(0, 1)) -> list[dict]:
    return [json.loads((folder / f"counts-rank{rank}.json").read_text()) for rank in ranks]


def _same_cells(a: Path, b: Path) -> None:
    shards = sorted((a / "data").rglob("*.parquet"))
    assert shards and [s.relative_to(a) for s in shards] == [s.relative_to(b) for s in sorted((b / "data").rglob("*.parquet"))]
    for shard in shards:
        left, right = pq.read_table(shard), pq.read_table(b / shard.relative_to(a))
        assert left.column_names == right.column_names
        for column in left.column_names:
            assert left[column].to_pylist() == right[column].to_pylist(), (shard.name, column)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_share_is_whole_batches_split_evenly():
    for n, world, batch in [(13, 2, 4), (108, 2, 4), (3, 4, 1), (0, 3, 8), (1000, 7, 64)]:
        shares = [Ranks(r, world, None, None, None).share(n, batch) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(n))
        assert all(len(s) == 0 or s[0] % batch == 0 for s in shares)
        sizes = [-(-len(s) // batch) for s in shares]
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.slow
def test_dead_rank_is_named_and_torchrun_rerun_resumes_with_one_process_cells(tmp_path):
    source = make_refer_source(tmp_path / "src", n_images=14, seed=3, datasets=("refcoco",))
    one = ["build", "--source", str(source), "--out", str(tmp_path / "one"), "--embed-cache-dir", str(tmp_path / "emb1")]
    assert main(one + OPTIONS) == 0
    images, texts = _cached(tmp_path / "emb1", "image"), _cached(tmp_path / "emb1", "text")
    assert images > 2 * BATCH and texts > 2 * BATCH

    build = ["build", "--source", str(source), "--out", str(tmp_path / "two"), "--embed-cache-dir", str(tmp_path / "emb2"), *OPTIONS]
    scratch = tmp_path / "tmp"  # the killed rank's nemo_hf_rank_* and torchrun's torchelastic_* stay: not in /tmp
    scratch.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "NEMO_HF_DIST_TIMEOUT": "30",
           "TMPDIR": str(scratch)}
    # A launcher of our own, as on a node of a multi-node job: torchrun would tear down the survivor itself.
    (tmp_path / "c1").mkdir()
    launch = {**env, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(_free_port()), "NEMO_HF_TEST_COUNTS": str(tmp_path / "c1"),
              "NEMO_HF_TEST_KILL": "1:0"}  # rank 1 dies at its first forward
    procs = [
        subprocess.Popen([sys.executable, str(RUNNER), *build], env={**launch, "RANK": str(r), "LOCAL_RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]
    start = time.monotonic()
    out0, err0 = procs[0].communicate(timeout=180)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, err0[-3000:]
    assert "rank 1 of 2 did not reach the barrier after embedding images within 30 s (NEMO_HF_DIST_TIMEOUT): died or hung" in err0
    assert "run the same command again to resume" in err0
    assert time.monotonic() - start < 150
    assert not (tmp_path / "two").exists()
    first = _counts(tmp_path / "c1", ranks=(0,))[0]
    assert first == {"images": _cached(tmp_path / "emb2", "image"), "texts": 0} and 0 < first["images"] < images

    (tmp_path / "c2").mkdir()
    rerun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RUNNER), *build],
        env={**env, "NEMO_HF_TEST_COUNTS": str(tmp_path / "c2")}, capture_output=True, text=True, timeout=240,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(list(scratch.glob("nemo_hf_rank_*"))) == 1  # the killed rank's only (torchrun keeps its torchelastic_*)
    counts = _counts(tmp_path / "c2")
    # only what was missing is embedded, each rank its share of it; rank 0's selection embeds nothing more
    share = [Ranks(r, 2, None, None, None).share for r in (0, 1)]
    assert [c["images"] for c in counts] == [len(share[r](images - first["images"], BATCH)) for r in (0, 1)]
    assert [c["texts"] for c in counts] == [len(share[r](texts, BATCH)) for r in (0, 1)]
    assert all(c["texts"] > 0 for c in counts) and sum(c["texts"] for c in counts) == texts
    _same_cells(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "2", "NEMO_HF_DIST_TIMEOUT": "inf"}, r"NEMO_HF_DIST_TIMEOUT='inf': give the barrier timeout in seconds"),
    ({"WORLD_SIZE": "2", "NEMO_HF_DIST_TIMEOUT": "1e300"}, r"NEMO_HF_DIST_TIMEOUT='1e300': give the barrier timeout"),
])
def test_a_bad_launcher_variable_is_named(tmp_path, monkeypatch, capsys, env, message):
    import re

    from conftest import write_tiny_source

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    root = write_tiny_source(tmp_path / "src")
    assert main(["build", "--source", str(root), "--out", str(tmp_path / "out"), "--no-mining"]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_bad_local_world_size_is_named(monkeypatch):
    from nemo_hf.mining.ranks import local_processes

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2.5")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='2.5' is not an integer"):
        local_processes()
