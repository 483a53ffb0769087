"""One progress bar per stage of a build (read, embed images, embed sentences, select, write), whatever
the number of configs and splits, instead of `datasets`' bar per split of every config.

Inside ``build_stages()`` every ``stage(name, total)`` of the same name extends one bar. Outside it
(``load_dataset("nemo_refcoco", ...)``, an ``Embedder`` used alone) each embedding call gets a bar of its
own and the other stages none (`datasets` shows its own bars there).

When stderr is not a terminal (a log file, CI, SLURM), a bar is plain lines instead: the stage's start,
its progress at each quarter (at most one line per ``QUIET_S`` seconds) or every ``EVERY_S`` seconds, and
its end with the count and the time. A terminal bar's carriage returns and cursor moves would garble a log.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

STAGES = ("read", "embed images", "embed sentences", "select", "write")
UNITS = {"read": "ref", "embed images": "image", "embed sentences": "sentence", "select": "sentence", "write": "row"}
QUIET_S = 5.0  # a quarter reached sooner than this after the last line is not worth a line of its own
EVERY_S = 60.0  # a long stage still says where it is this often
_bars: dict | None = None


def to_terminal() -> bool:
    """Whether progress goes to a terminal (bars) rather than a file or a pipe (plain lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class PlainProgress:
    """A stage's progress as plain lines on stderr, with the part of tqdm's interface nemo_hf uses. Its time
    runs from the start to the last update (a build's stage may only be closed when the whole build ends)."""

    def __init__(self, total: int, desc: str, unit: str = "it"):
        self.total, self.n, self.desc, self.unit = total, 0, desc, unit
        self.started = self.said = self.updated = time.monotonic()
        self.quarter = 0
        self.closed = False
        self._say(f"{desc}: started, {total} {unit}s")

    def _say(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.updated = time.monotonic()
        quarter = 4 * self.n // self.total if self.total else 0
        new_quarter = self.quarter < quarter < 4 and now - self.said >= QUIET_S
        if new_quarter or now - self.said >= EVERY_S:
            self.quarter, self.said = max(self.quarter, quarter), now
            percent = f" ({100 * self.n // self.total}%)" if self.total else ""
            self._say(f"{self.desc}: {self.n}/{self.total} {self.unit}s{percent}, {now - self.started:.0f}s")

    def refresh(self) -> None:
        """The total grew (a later config extends the stage): count quarters of the new total."""
        self.quarter = 4 * self.n // self.total if self.total else 0

    def close(self, said: bool = True) -> None:
        """The end line, unless ``said`` is False (a failed or interrupted run says why in its own words)."""
        if not self.closed:
            self.closed = True
            if said:
                self._say(f"{self.desc}: done, {self.n} {self.unit}s in {self.updated - self.started:.1f}s")

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(said=kind is None)


def bar(total: int, desc: str, unit: str = "it", disable: bool = False):
    """A progress bar for a terminal, plain lines otherwise (see the module's docstring)."""
    if disable or to_terminal():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable)
    return PlainProgress(total, desc, unit)


class _SharedBar:
    """A build's bar for one stage, lent to one piece of work: closing it leaves the bar open."""

    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _SharedBar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def stage(name: str, total: int, disable: bool = False):
    """A bar for ``total`` more units of stage ``name`` (use as a context manager or close it)."""
    unit = UNITS.get(name, "it")
    if _bars is None or disable:
        alone = name.startswith("embed") and not disable
        return bar(total, name, unit, disable=not alone)
    shared = _bars.get(name)
    if shared is None:
        shared = _bars[name] = bar(total, name, unit)
    else:
        shared.total += total
        shared.refresh()
    return _SharedBar(shared)


@contextlib.contextmanager
def build_stages() -> Iterator[None]:
    """Within: one bar per stage, `datasets`' own per-split bars off, nemo_hf's log lines printed above the bars."""
    import datasets

    global _bars
    if _bars is not None:  # nested: the outer build owns the bars
        yield
        return
    datasets_bars = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    _bars = {}
    finished = False
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("nemo_hf")]) if to_terminal() else contextlib.nullcontext():
            yield
        finished = True
    finally:
        for shared in _bars.values():
            shared.close(said=finished) if isinstance(shared, PlainProgress) else shared.close()
        _bars = None
        if datasets_bars:
            datasets.enable_progress_bars()
