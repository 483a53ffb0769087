"""The `nemo-hf` command's conventions: --version, help on every option, arguments checked before any
file is read, and a build log a person can read."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nemo_hf import __version__
from nemo_hf.cli import DEMO_NOTICE, build_parser, main
from nemo_hf.progress import STAGES


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"nemo-hf {__version__}"


def test_every_option_has_help_and_the_help_reads_plainly():
    parser = build_parser()
    assert "``" not in parser.format_help()
    commands = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    assert {"build", "stats", "show", "preview", "push"} <= set(commands)
    for name, command in commands.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"nemo-hf {name} {'/'.join(action.option_strings) or action.dest} has no help"
        assert "``" not in command.format_help()
    build = {a.dest: a.help for a in commands["build"]._actions}
    assert "default: refcoco with --source, all configs for the demo" in build["dataset"]
    assert "demo-random" in build["model"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tau", "abc"], "argument --tau: 'abc' is not a valid tau"),
        (["--tau", "1.5"], "argument --tau: '1.5' is not a valid tau"),
        (["--tau", "p0"], "argument --tau: 'p0' is not a valid tau"),
        (["--top-k", "0"], "argument --top-k: 0 must be at least 1"),
        (["--top-k", "x"], "argument --top-k: 'x' is not an integer"),
        (["--demo-images", "-3"], "argument --demo-images: -3 must be at least 1"),
    ],
)
def test_build_arguments_are_checked_before_the_source_is_read(argv, message, tmp_path, capsys):
    missing = tmp_path / "no-such-source"
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--source", str(missing), "--out", str(tmp_path / "out"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-source" not in err and not (tmp_path / "out").exists()


def test_a_library_warning_is_printed_once():
    """The CLI configures nemo_hf's logger alone: huggingface_hub's own handler prints its warnings once,
    FAISS's loader INFO lines stay quiet."""
    script = """
import logging, huggingface_hub.utils.logging
from nemo_hf.cli import _configure_logging
_configure_logging()
logging.getLogger("huggingface_hub.file_download").warning("a hub warning")
logging.getLogger("faiss.loader").info("Loading faiss with AVX2 support.")
logging.getLogger("nemo_hf.folder.build").info("building refcoco_unc")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("a hub warning") == 1
    assert "faiss" not in run.stderr
    assert "INFO nemo_hf.folder.build: building refcoco_unc" in run.stderr


DEMO_BUILD = ["build", "--demo-images", "16", "--dataset", "refcoco", "--dataset", "refcoco+"]


def _demo_env(tmp_path) -> dict:
    return {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_demo_build_log_to_a_file(tmp_path):
    """Issue 22.1: stderr redirected to a file (CI, SLURM) gets plain lines, no carriage return or cursor
    move; each stage starts and ends once (one per stage, not one per split); no FAISS loader lines, no line
    twice, the demo warning once at the start and once at the end instead of a UserWarning."""
    with open(tmp_path / "log.txt", "w") as log_file:
        run = subprocess.run([sys.executable, "-m", "nemo_hf.cli", *DEMO_BUILD, "--out", str(tmp_path / "demo")],
                             stdout=log_file, stderr=subprocess.STDOUT, env=_demo_env(tmp_path), timeout=300)
    log = (tmp_path / "log.txt").read_text()
    assert run.returncode == 0, log
    assert "\x1b" not in log and "\r" not in log
    assert "faiss.loader" not in log and "ModuleNotFoundError" not in log
    assert "Generating" not in log and "UserWarning" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    for stage in ("read", "embed images", "select", "write"):
        assert sum(line.startswith(f"{stage}: started,") for line in lines) == 1, stage
        assert sum(line.startswith(f"{stage}: done,") for line in lines) == 1, stage
    assert re.search(r"^write: done, \d+ rows in [0-9.]+s$", log, re.M)
    # issue 22.7: 16 demo images leave pools under --top-k 20, and the log says so with the numbers
    assert re.search(r"^WARNING nemo_hf.mining.refs: \d+ of \d+ training sentences keep fewer than top_k=20 negatives "
                     r"\(\d+( to \d+)?\): --top-k 20 is larger than the pool, \d+ training images", log, re.M), log
    assert len(lines) < 30, log
    repeated = {line for line in lines if lines.count(line) > 1} - {DEMO_NOTICE}
    assert not repeated
    assert lines.count(DEMO_NOTICE) == 2 and lines[0] == DEMO_NOTICE and lines[-1] == DEMO_NOTICE


def test_demo_build_log_in_a_terminal(tmp_path):
    """Issue 22.1: in a terminal, one tqdm bar per stage (its empty state printed once, when it is created)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # tqdm draws nothing 0 wide
    run = subprocess.Popen([sys.executable, "-m", "nemo_hf.cli", *DEMO_BUILD, "--out", str(tmp_path / "demo")],
                           stdout=follower, stderr=follower, env=_demo_env(tmp_path))
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert run.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(leader)
    log = b"".join(chunks).decode(errors="replace")
    for stage in STAGES:
        assert log.count(f"{stage}:   0%") == 1, stage
    assert "started," not in log


@pytest.mark.parametrize("command", ["difficulty", "preview"])
def test_a_rendered_side_beyond_8192_pixels_is_refused_before_any_allocation(tmp_path, capsys, command):
    """--size 1000000 used to reach np.empty((size, size, 3)) (a MemoryError traceback, or swap at 60000)."""
    with pytest.raises(SystemExit):
        main([command, str(tmp_path), "--size", "1000000"])
    assert "argument --size: 1000000 must be at most 8192" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.fixture(scope="module")
def earlier_build(tmp_path_factory) -> Path:
    """A small demo build, copied to each test's --out as the earlier build an interrupted one must keep."""
    out = tmp_path_factory.mktemp("earlier") / "demo"
    first = subprocess.run([sys.executable, "-m", "nemo_hf.cli", "build", "--out", str(out), "--demo-images", "16",
                            "--dataset", "refcoco"], capture_output=True, text=True, timeout=300,
                           env=_demo_env(out.parent))
    assert first.returncode == 0, first.stderr
    return out


def _interrupted_demo_build(tmp_path, earlier_build, send) -> tuple[subprocess.Popen, str, float]:
    """An earlier demo build at ``out``, then a second, bigger one into the same ``out``, interrupted by
    ``send(process)`` once its image embedding has started. Returns the second run, its stderr and the
    manifest's mtime before it."""
    import time

    out, env = tmp_path / "demo", _demo_env(tmp_path)
    shutil.copytree(earlier_build, out)
    before = (out / "nemo_hf.json").stat().st_mtime_ns
    run = subprocess.Popen([sys.executable, "-m", "nemo_hf.cli", "build", "--out", str(out), "--demo-images", "120",
                            "--dataset", "refcoco", "--embed-cache-dir", str(tmp_path / "embeddings")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    lines = []
    for line in run.stderr:
        lines.append(line)
        if line.startswith("embed images: started"):
            break
    time.sleep(0.5)
    send(run)
    rest = run.communicate(timeout=60)[1]
    return run, "".join(lines) + rest, before


@pytest.mark.slow
def test_ctrl_c_exits_130_with_one_line_and_keeps_the_older_folder(tmp_path, earlier_build):
    """Issue 22.2: Ctrl-C (SIGINT to the process group, as a terminal sends it) stops the build with exit 130
    and one line saying what was kept, no traceback; the earlier build at --out is untouched."""
    import signal

    run, err, before = _interrupted_demo_build(tmp_path, earlier_build, lambda p: os.killpg(p.pid, signal.SIGINT))
    assert run.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1
    assert said[0].startswith("nemo-hf build: interrupted;") and "was not touched" in said[0]
    assert str(tmp_path / "embeddings") in said[0] and "resumes" in said[0]
    assert (tmp_path / "demo" / "nemo_hf.json").stat().st_mtime_ns == before
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the embedder decodes without worker processes")
def test_an_interrupt_in_a_worker_process_stops_the_build(tmp_path, earlier_build):
    """Issue 23.8 (Ctrl-C swallowed at a fork): SIGINT to a forked decode worker alone stops the whole build
    (exit 130, one line) and never replaces the earlier build."""
    import signal

    def to_a_worker(p):
        children = _children(p.pid)
        assert children, "the embedder's decode worker should be running"
        os.kill(children[0], signal.SIGINT)

    run, err, before = _interrupted_demo_build(tmp_path, earlier_build, to_a_worker)
    assert run.returncode == 130, err
    assert "Traceback" not in err and sum("interrupted" in line for line in err.splitlines()) == 1
    assert (tmp_path / "demo" / "nemo_hf.json").stat().st_mtime_ns == before


def test_k_not_reached_is_explained_with_numbers():
    """Issue 22.7: one line with the numbers: a pool smaller than K (the pool less the sentence's own image
    holds at most 3 here), or tau leaving fewer than K survivors in a large enough pool; nothing when all have K."""
    from nemo_hf.mining.refs import shortfall_note

    assert shortfall_note(np.array([3, 3, 2]), top_k=20, pool_size=4, tau_cosine=0.9) == (
        "3 of 3 training sentences keep fewer than top_k=20 negatives (2 to 3): --top-k 20 is larger than the pool, "
        "4 training images (the source's training images less every val/test image of any config) less each "
        "sentence's own image"
    )
    assert shortfall_note(np.array([5, 4, 5, 1]), top_k=5, pool_size=100, tau_cosine=0.8125) == (
        "2 of 4 training sentences keep fewer than top_k=5 negatives (1 to 4): tau (cosine 0.812) leaves fewer than 5 "
        "of the pool's 100 images for them (a higher tau, a smaller --top-k or a larger source keeps more)"
    )
    assert shortfall_note(np.array([5, 5]), top_k=5, pool_size=100, tau_cosine=0.8) is None


def test_a_demo_too_small_to_have_negatives_builds_and_says_why(tmp_path, capsys):
    """``--demo-images 8``: after every val/test image leaves the pool, no training image is left to be a
    negative (and at 16 one or two): the build keeps none (or fewer than K) and says why, instead of
    failing on a tau percentile there is no pair to estimate from."""
    import json

    out = tmp_path / "tiny"
    assert main(["build", "--out", str(out), "--demo-images", "8", "--dataset", "refcoco"]) == 0
    mining = json.loads((out / "nemo_hf.json").read_text())["configs"]["refcoco_unc"]["mining"]
    assert mining["pool_size"] == 0 and mining["tau_cosine"] == 1.0
    assert "--top-k 20 is larger than the pool, 0 training images" in capsys.readouterr().err


def test_dataset_spellings_and_a_suggestion_for_a_typo(tmp_path, capsys):
    """Issue 22.4: the configs' own spellings are accepted (refcocoplus, any case, refcoco+_unc), a typo
    gets the closest name, before any file is read; --config of the inspection commands likewise."""
    from nemo_hf.schema import refs_config

    assert refs_config("refcocoplus") == refs_config("RefCOCO+") == refs_config("refcoco+_unc") == "refcocoplus_unc"
    assert refs_config("refcocog") == "refcocog_umd" and refs_config("refcoco", "google") == "refcoco_google"
    assert refs_config("refcocog_google", "umd") == "refcocog_google"  # a config name's own split-by wins
    assert main(["build", "--out", str(tmp_path / "out"), "--dataset", "refcco"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'refcco'; did you mean refcoco?" in err and not (tmp_path / "out").exists()
    assert main(["build", "--out", str(tmp_path / "out"), "--dataset", "refcoco", "--split-by", "umd"]) == 2
    assert "refcoco has no split-by 'umd': it has unc or google" in capsys.readouterr().err
    assert main(["show", str(tmp_path), "--config", "refcocg", "--ref-id", "1"]) == 2
    assert "did you mean refcocog?" in capsys.readouterr().err


def test_accelerate_with_two_processes_but_no_multi_gpu_is_said(tmp_path):
    """Issue 22.11: `accelerate launch --num_processes 2` without --multi_gpu starts one process (the simple
    launcher); the build warns. Read from the launcher's command line, as here (a parent with those args)."""
    child = "from nemo_hf.cli import accelerate_ran_one_process as w; print(w())"
    parent = "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])"
    env = {**os.environ, "ACCELERATE_USE_CPU": "False"}
    env.pop("WORLD_SIZE", None)
    for launcher, expected in ((["launch", "--num_processes", "2"], "without --multi_gpu started ONE process"),
                               (["launch", "--num_processes=2", "--multi_gpu"], "None"),
                               (["launch", "--num_processes", "1"], "None")):
        run = subprocess.run([sys.executable, "-c", parent, child, *launcher], capture_output=True, text=True,
                             env=env, timeout=120)
        assert expected in run.stdout, (launcher, run.stdout, run.stderr)


def test_only_rank_0_prints_the_demo_banner(tmp_path, monkeypatch, capsys):
    """Issue 22.11: under a launcher every rank runs the command; the banner and the 'wrote' lines are rank 0's."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process: the build itself runs here
    assert main(["build", "--out", str(tmp_path / "demo"), "--demo-images", "16", "--dataset", "refcoco"]) == 0
    captured = capsys.readouterr()
    assert DEMO_NOTICE not in captured.err and "wrote" not in captured.out and "no --source" not in captured.out


@pytest.mark.parametrize("mode, grid, tiles", [("single", "2", 1), ("random", "3", 9)])
def test_preview_mode_and_grid(tmp_path, capsys, mode, grid, tiles):
    """Issue 22.11: `preview --mode` and `--grid` reach the mosaics (the captions name the mode and the tiles)."""
    assert main(["build", "--out", str(tmp_path / "demo"), "--demo-images", "32", "--dataset", "refcoco",
                 "--no-mining"]) == 0  # a training pool of more than 8 images: a 3x3 random mosaic needs 8
    out = tmp_path / "grid.png"
    assert main(["preview", str(tmp_path / "demo"), "-n", "2", "--size", "96", "--mode", mode, "--grid", grid,
                 "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    from datasets import load_dataset

    from nemo_hf.inspection.preview import render_preview

    refs = load_dataset(str(tmp_path / "demo"), "refcoco_unc", split="train")
    images = load_dataset(str(tmp_path / "demo"), "images", split="train")
    from nemo_hf.transforms.mosaic import NeMoMosaic

    sample = NeMoMosaic(images, output_size=96, p={mode: 1.0}, grid=int(grid), config="refcoco_unc")(
        {k: [v] for k, v in refs[0].items()})
    assert sample["mode"] == [mode] and len(sample["tile_image_ids"][0]) == tiles
    assert render_preview(refs, images, n=1, output_size=96, p={mode: 1.0}, grid=int(grid)).width > 96


def test_many_missing_images_give_a_few_lines_and_a_count(tmp_path, capsys):
    """Issue 22.5: one warning per missing image would be thousands of lines at COCO scale: the first five,
    then one line with the count."""
    from nemo_hf.source.synthetic import make_refer_source

    source = make_refer_source(tmp_path / "src", n_images=80, seed=0, datasets=("refcoco",))
    for image in sorted((source / "images/mscoco/images/train2014").glob("*.jpg"))[:12]:
        image.unlink()
    assert main(["build", "--source", str(source), "--out", str(tmp_path / "out"), "--no-mining",
                 "--skip-broken-eval-images"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping image") == 5 + 1
    assert "12 'skipping image ...' warnings in all, the first 5 shown above" in err
