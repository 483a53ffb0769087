"""The `nemo-hf` command's conventions: --version, help on every option, arguments checked before any
file is read, and a build log a person can read."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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


def test_demo_build_log(tmp_path):
    """No FAISS loader lines, no line twice, one bar per stage (not one per split), the demo warning once at
    the start and once at the end instead of a UserWarning."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "nemo_hf.cli", "build", "--out", str(tmp_path / "demo"), "--demo-images", "16",
         "--dataset", "refcoco", "--dataset", "refcoco+"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300,
    )
    log = run.stdout
    assert run.returncode == 0, log
    assert "faiss.loader" not in log and "ModuleNotFoundError" not in log
    assert "Generating" not in log and "UserWarning" not in log
    for stage in STAGES:  # a bar prints its empty state once, when it is created
        assert log.count(f"{stage}:   0%") == 1, stage
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", log).replace("\r", "\n")  # tqdm's cursor moves
    lines = [line for line in plain.splitlines() if line.strip() and "%|" not in line]
    repeated = {line for line in lines if lines.count(line) > 1} - {DEMO_NOTICE}
    assert not repeated
    assert lines.count(DEMO_NOTICE) == 2 and lines[0] == DEMO_NOTICE and lines[-1] == DEMO_NOTICE


@pytest.mark.parametrize("command", ["difficulty", "preview"])
def test_a_rendered_side_beyond_8192_pixels_is_refused_before_any_allocation(tmp_path, capsys, command):
    """--size 1000000 used to reach np.empty((size, size, 3)) (a MemoryError traceback, or swap at 60000)."""
    with pytest.raises(SystemExit):
        main([command, str(tmp_path), "--size", "1000000"])
    assert "argument --size: 1000000 must be at most 8192" in capsys.readouterr().err
