"""Loading the zero-shot pipeline's extra models (SAM, a captioner) by hub id or local path, offline-friendly."""

from __future__ import annotations

from pathlib import Path


def load_pretrained(what: str, model_id_or_path: str, *loaders):
    """``loader(name)`` for each loader, ``name`` being the local directory when one exists, else the id.

    A failure becomes an OSError naming ``what`` and how to point at a model without network.
    """
    from ..mining.embed import hub_access

    local = Path(model_id_or_path).expanduser()
    name = str(local) if local.is_dir() else str(model_id_or_path)
    access = hub_access(name)  # one quick look: an unreachable Hub fails at once, not after minutes of retries
    try:
        return name, [load(name, **access) for load in loaders]
    except (OSError, ValueError) as err:
        raise OSError(
            f"cannot load {what} {name!r}: {err}\nOffline, the model must be in the Hugging Face cache "
            "(HF_HUB_OFFLINE=1) or a local directory holding its weights, config and processor files"
        ) from err
