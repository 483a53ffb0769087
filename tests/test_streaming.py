"""Streaming: a built folder read with ``streaming=True`` plus the mosaic, and sharding across ranks."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from datasets import load_dataset
from datasets.distributed import split_dataset_by_node

from nemo_hf.folder import build_folder
from nemo_hf.transforms.mosaic import NeMoMosaic
from nemo_hf.source.synthetic import make_refer_source


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    source = make_refer_source(tmp / "src", n_images=16, seed=1, datasets=("refcoco",))
    return build_folder(source, tmp / "out", ["refcoco_unc"], mining=None)


def _by_ref(samples):
    return {ref: (img.tobytes(), mask.tobytes(), quadrant) for ref, img, mask, quadrant in samples}


def test_streamed_mosaics_equal_map_style_ones(folder):
    images = load_dataset(str(folder), "images", split="train")  # local, memory-mapped: random access
    mosaic = NeMoMosaic(images, output_size=96, config="refcoco_unc", p={"random": 1.0}, seed=5, return_arrays=True)

    stream = load_dataset(str(folder), "refcoco_unc", split="train", streaming=True)
    streamed = [
        (row["ref_id"], row["image"], row["mask"], row["target_quadrant"])
        for row in stream.map(mosaic, batched=True, batch_size=4, remove_columns=list(stream.column_names))
    ]
    table = load_dataset(str(folder), "refcoco_unc", split="train")
    table.set_transform(mosaic)
    mapped = [(r["ref_id"], r["image"], r["mask"], r["target_quadrant"]) for r in table]
    assert len(streamed) == len(mapped) == len(table)
    assert _by_ref(streamed) == _by_ref(mapped)
    assert all(len(r["tile_image_ids"]) == 4 for r in table)


@pytest.mark.parametrize("world_size", [2, 3])
def test_split_by_node_gives_disjoint_complete_shares(folder, world_size):
    def share(rank, seed):
        ds = load_dataset(str(folder), "refcoco_unc", split="train", streaming=True)
        ds = ds.shuffle(seed=seed, buffer_size=8)
        return [row["ref_id"] for row in split_dataset_by_node(ds, rank=rank, world_size=world_size)]

    every = sorted(load_dataset(str(folder), "refcoco_unc", split="train")["ref_id"])
    # A shuffled Parquet stream ends each pass with a fixed idle sleep in `datasets` (5 s,
    # config.SLEEP_TIME_ON_THREADS_SHUTDOWN, to let PyArrow's reader threads wind down): the ranks'
    # passes run side by side, as they would on a real cluster, so the test waits for it once.
    # Ranks that shuffle with different seeds (an unseeded shuffle) overlap and miss rows.
    runs = [(rank, 7) for rank in range(world_size)] + [(rank, 100 + rank) for rank in range(world_size)]
    with ThreadPoolExecutor(len(runs)) as pool:
        results = list(pool.map(lambda run: share(*run), runs))
    shares, unseeded = results[:world_size], results[world_size:]
    assert sorted(np.concatenate(shares).tolist()) == every
    for a in range(world_size):
        for b in range(a + 1, world_size):
            assert not set(shares[a]) & set(shares[b])
    assert shares[0] != sorted(shares[0])  # it was shuffled
    assert sorted(np.concatenate(unseeded).tolist()) != every


def test_exit_with_a_stream_half_read_prints_nothing(folder):
    """Issue 22.11: a script that keeps a streamed iterator in a global and exits printed `Exception ignored
    in: <generator ... Parquet._generate_tables>` (the reader closed during the interpreter's teardown)."""
    import subprocess
    import sys

    script = (
        "import nemo_hf\nfrom datasets import load_dataset\n"
        f"stream = load_dataset({str(folder)!r}, 'refcoco_unc', split='train', streaming=True)\n"
        "rows = iter(stream)\nprint(next(rows)['ref_id'] >= 0)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "True", run.stderr
    assert "Exception ignored" not in run.stderr and "Traceback" not in run.stderr, run.stderr
