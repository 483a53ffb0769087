"""One progress bar per stage of a build (read, embed images, embed sentences, select, write), whatever
the number of configs and splits, instead of `datasets`' bar per split of every config.

Inside ``build_stages()`` every ``stage(name, total)`` of the same name extends one bar. Outside it
(``load_dataset("nemo_refcoco", ...)``, an ``Embedder`` used alone) each embedding call gets a bar of its
own and the other stages none (`datasets` shows its own bars there).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

STAGES = ("read", "embed images", "embed sentences", "select", "write")
UNITS = {"read": "ref", "embed images": "image", "embed sentences": "sentence", "select": "sentence", "write": "row"}
_bars: dict[str, tqdm] | None = None


class _SharedBar:
    """A build's bar for one stage, lent to one piece of work: closing it leaves the bar open."""

    def __init__(self, bar: tqdm):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        pass

    def __enter__(self) -> _SharedBar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def stage(name: str, total: int, disable: bool = False) -> tqdm | _SharedBar:
    """A bar for ``total`` more units of stage ``name`` (use as a context manager or close it)."""
    if _bars is None or disable:
        alone = name.startswith("embed") and not disable
        return tqdm(total=total, desc=name, unit=UNITS.get(name, "it"), disable=not alone)
    bar = _bars.get(name)
    if bar is None:
        bar = _bars[name] = tqdm(total=total, desc=name, unit=UNITS.get(name, "it"))
    else:
        bar.total += total
        bar.refresh()
    return _SharedBar(bar)


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
    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("nemo_hf")]):
            yield
    finally:
        for bar in _bars.values():
            bar.close()
        _bars = None
        if datasets_bars:
            datasets.enable_progress_bars()
