"""The note beside a zero-shot predictions file that says what made it (read by `nemo-hf eval`; light imports)."""

from __future__ import annotations

import json
from pathlib import Path

MAX_PROVENANCE = 1 << 20  # a summary of a few hundred bytes: a larger file is not one, and is not read


def provenance_path(predictions) -> Path:
    """Where `run_zeroshot` says what made a predictions file: ``<predictions>.provenance.json``."""
    predictions = Path(predictions)
    return predictions.with_name(predictions.name + ".provenance.json")


def provenance_banner(predictions) -> str | None:
    """For `nemo-hf eval`'s report: the oracle warning when zero-shot predictions used the instances oracle."""
    path = provenance_path(predictions)
    if not path.is_file() or path.stat().st_size > MAX_PROVENANCE:  # absent, a FIFO (would block), or not one
        return None
    try:
        provenance = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # deep nesting: not one either
        return None
    if isinstance(provenance, dict) and provenance.get("oracle_proposals"):
        return (f"ORACLE SETTING ({path.name}): zero-shot predictions from {provenance.get('proposals')}; an upper "
                "bound, not comparable with proposal-based zero-shot numbers")  # fmt: skip
    return None
