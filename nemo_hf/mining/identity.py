"""Which model made an embedding: what goes into embedding cache keys and provenance."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


@dataclass(frozen=True)
class ModelIdentity:
    """What a model's embeddings are reproducible from (goes into cache keys and provenance).

    ``revision``: the resolved hub commit; ``checkpoint_sha256``: a hash of the weight files and
    config.json of a local checkpoint, or of the weights of a model built in memory.
    """

    model_id: str
    revision: str | None = None
    checkpoint_sha256: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def checkpoint_identity(model_id_or_path: str | Path, revision: str | None = None) -> ModelIdentity:
    """Identity of a local checkpoint directory (file hashes) or a hub id (commit from the HF cache)."""
    path = Path(model_id_or_path).expanduser()
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir() if f.is_file() and (f.suffix in _WEIGHT_SUFFIXES or f.name == "config.json")
        )
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0")
            with file.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
        return ModelIdentity(str(path.resolve()), checkpoint_sha256=digest.hexdigest())
    return ModelIdentity(str(model_id_or_path), revision=_resolved_revision(str(model_id_or_path), revision))


def module_identity(model: torch.nn.Module, model_id: str) -> ModelIdentity:
    """Identity of a model built in memory: a hash of its parameters and buffers."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return ModelIdentity(model_id, checkpoint_sha256=digest.hexdigest())


def _resolved_revision(repo_id: str, revision: str | None) -> str | None:
    """The commit the HF cache resolves ``revision`` to (None when nothing is cached)."""
    if revision is not None and len(revision) == 40 and all(ch in "0123456789abcdef" for ch in revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(cached).parent.name if isinstance(cached, str) else None
