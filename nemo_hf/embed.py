"""Image and sentence embeddings for mining, with any ``transformers`` checkpoint that has
``get_image_features`` / ``get_text_features`` (CLIP, SigLIP, ...), cached on disk.

Embeddings are L2-normalised float32. The cache is keyed by everything that changes them (model
identity, dtype, preprocessing, nemo_hf version) and then per image id and content (bytes' digest, or file
size and modification time), or per sentence id and text;
it is written in chunks, each atomically, so an interrupted run resumes where it stopped.
Image embeddings can also come as a memory-mapped ``.npy`` matrix filled from the cache chunk by chunk,
for pools too large to hold in RAM.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import stat
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nemo_hf import __version__, progress
from nemo_hf.pixels import to_8bit

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
_LOG = logging.getLogger(__name__)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5")


class ModelLoadError(OSError):
    """The embedding model could not be loaded; the message says how to point at one."""


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


class EmbeddingCache:
    """Embeddings under one cache key: ``chunk-*.npz`` files (keys + vectors), each written atomically.

    A run that stops keeps every chunk written; a chunk that cannot be read (a copy cut short, a
    filesystem without atomic rename) is dropped with a warning and its embeddings recomputed.
    """

    def __init__(self, directory: str | Path, meta: dict):
        self.directory = cache_directory(directory, meta)

    def __repr__(self) -> str:
        return f"EmbeddingCache({str(self.directory)!r})"

    def load(self) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for keys, vectors in self._chunks():
            for key, vector in zip(keys, vectors):
                found.setdefault(key, vector)
        return found

    def keys(self) -> set[str]:
        """The keys present, read without their vectors."""
        present: set[str] = set()
        for keys, _ in self._chunks(vectors=False):
            present.update(keys)
        return present

    def matrix_path(self, keys: Sequence[str]) -> Path:
        """Where ``write_matrix`` puts the matrix of ``keys``: named by their ordered list, which finds it again."""
        digest = hashlib.sha256()
        for key in keys:
            digest.update(key.encode() + b"\0")
        return self.directory / f"matrix-{digest.hexdigest()[:20]}.npy"

    def write_matrix(self, path: Path, keys: Sequence[str], dim: int) -> np.memmap:
        """Write ``path``, a ``(len(keys), dim)`` float32 ``.npy`` file whose row i is ``keys[i]``'s vector, and
        return it memory-mapped read-only.

        Filled one chunk at a time: RAM holds one chunk and a key -> row dict, never the matrix, so a pool
        of millions of images can be mined. Written under a temporary name, then renamed; the other
        ``matrix-*.npy`` files here are removed first, since each is as large as a pool's embeddings.
        """
        for old in self.directory.glob("matrix-*.npy"):
            if old != path and not old.is_dir():
                old.unlink(missing_ok=True)
        row_of: dict[str, int] = {}
        repeats = []  # (row, the first row of its key)
        for row, key in enumerate(keys):
            first = row_of.setdefault(key, row)
            if first != row:
                repeats.append((row, first))
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(keys), dim))
            for chunk_keys, vectors in self._chunks():
                hits = [(i, row_of.pop(key)) for i, key in enumerate(chunk_keys) if key in row_of]  # first chunk wins
                if hits:
                    src, dst = np.array(hits).T
                    out[dst] = vectors[src]
            if row_of:
                raise RuntimeError(
                    f"image {next(iter(row_of)).split(':')[0]}: its embedding left the cache {self.directory} "
                    "while the matrix was filled (a chunk was removed, or found unreadable and dropped); "
                    "run again to recompute it"
                )
            if repeats:
                dst, src = np.array(repeats).T
                out[dst] = out[src]
            out.flush()
            del out
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
            matrix = np.load(tmp, mmap_mode="r")  # mapped before the rename: another run's clean-up cannot remove it
            os.replace(tmp, path)
            matrix.filename = os.path.abspath(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a matrix is as large as the pool's embeddings: leave no partial one
            raise
        return matrix

    def _chunks(self, vectors: bool = True) -> Iterator[tuple[list[str], np.ndarray | None]]:
        """Each readable chunk's keys and (``vectors``) vectors, in file-name order; one that cannot be read
        is dropped with a warning (class docstring), so its embeddings count as missing."""
        for chunk in sorted(self.directory.glob("chunk-*.npz")):
            try:
                with np.load(chunk, allow_pickle=False) as data:
                    keys = data["keys"]
                    found = data["vectors"] if vectors else None
                if keys.ndim != 1 or found is not None and (found.ndim != 2 or len(keys) != len(found)):
                    raise ValueError(f"keys of shape {keys.shape} for vectors of shape {getattr(found, 'shape', None)}")
            except UNREADABLE_NPZ as err:
                warnings.warn(f"embedding cache: dropping unreadable chunk {chunk} ({err}); it will be recomputed")
                chunk.unlink(missing_ok=True)
                continue
            yield keys.tolist(), found

    def append(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not len(keys):
            return
        buffer = io.BytesIO()
        np.savez(buffer, keys=np.asarray(keys, dtype=str), vectors=np.asarray(vectors, dtype=np.float32))
        _atomic_write(self.directory / f"chunk-{uuid.uuid4().hex}.npz", buffer.getvalue())


# what np.load(allow_pickle=False) raises on a damaged, truncated or hostile .npz (a header declaring a huge array)
UNREADABLE_NPZ = (OSError, ValueError, KeyError, EOFError, MemoryError, zipfile.BadZipFile)


def key_digest(meta: dict) -> str:
    """A short, stable name for a cache key."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]


def cache_directory(directory: str | Path, meta: dict) -> Path:
    """``directory``, made, with ``meta.json`` saying which key its files belong to (written once, atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        _atomic_write(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode())
    return directory


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_matrix(path: Path, shape: tuple[int, int]) -> np.memmap | None:
    """The float32 matrix of ``shape`` that ``path`` holds, memory-mapped read-only; None when it is absent or
    anything else (damaged, another shape, not a regular file: a FIFO would block the read), to be rewritten."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except UNREADABLE_NPZ:
        return None
    if matrix.dtype != np.float32 or matrix.shape != shape or not matrix.flags.c_contiguous:
        return None
    return matrix


class _ImageFiles(Dataset):
    """Decodes and preprocesses images in DataLoader workers; errors name the image."""

    def __init__(self, items: Sequence[tuple[int, str | Path | bytes]], image_processor):
        self.items, self.image_processor = items, image_processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        image_id, source = self.items[index]
        where = "<encoded bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
                rgb = to_8bit(image)  # stored pixel order: EXIF orientation is not applied
        except (OSError, ValueError, SyntaxError) as err:
            raise ValueError(f"image {image_id}: cannot decode {where}: {err}") from err
        pixels = self.image_processor(images=rgb, return_tensors="np")["pixel_values"][0]
        return torch.from_numpy(np.ascontiguousarray(pixels))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # a decode worker must not spawn a thread pool of its own


def available_cores() -> int:
    """This process's cores: its affinity, shared with the other processes a launcher started on the node."""
    from .distributed import local_processes

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_processes())


class Embedder:
    """Embeds images and sentences with one model; ``from_pretrained`` loads one by id or path.

    The model is moved to ``device`` (default: CUDA when available) in place, in fp16 on GPU.
    Without an ``identity`` (``from_pretrained`` makes one from the checkpoint) the weights are hashed.

    Threads: on CPU the forward pass gets ``threads`` torch threads (default: all cores) and image
    decoding ``num_workers`` DataLoader processes (default: one per 8 cores, at least one: decoding
    and preprocessing a COCO image costs ~1/10 of a ViT-B/32 forward). On GPU, fp16, one torch
    thread and a worker per remaining core, since decoding is then the bottleneck.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_processor,
        tokenizer,
        identity: ModelIdentity | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
        threads: int | None = None,
        cache_chunk: int = 4096,
        progress: bool = True,
    ):
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ModelLoadError(
                f"{type(model).__name__} has no get_image_features/get_text_features: "
                "use a CLIP- or SigLIP-style model"
            )
        if batch_size < 1 or cache_chunk < 1:
            raise ValueError(f"batch_size ({batch_size}) and cache_chunk ({cache_chunk}) must be >= 1")
        self.identity = identity or module_identity(model, model.name_or_path or type(model).__name__)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.image_processor, self.tokenizer = image_processor, tokenizer
        cores = available_cores()
        on_gpu = self.device.type == "cuda"
        self.threads = threads or (1 if on_gpu else cores)
        if num_workers is None:
            num_workers = 0 if cores < 2 else (cores - 1 if on_gpu else max(1, cores // 8))
        self.num_workers, self.batch_size, self.cache_chunk = num_workers, batch_size, cache_chunk
        self.progress = progress
        text_config = getattr(model.config, "text_config", model.config)
        self.text_max_length = min(tokenizer.model_max_length, text_config.max_position_embeddings)
        # SigLIP was trained on texts padded to the full length (it pools the last token).
        self.text_padding = "max_length" if model.config.model_type.startswith("siglip") else "longest"

    def __repr__(self) -> str:
        return (
            f"Embedder(model={self.identity.model_id!r}, device={self.device.type}, dtype={str(self.dtype)[6:]}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers}, threads={self.threads})"
        )

    @classmethod
    def from_pretrained(
        cls, model_id_or_path: str | Path = DEFAULT_MODEL, revision: str | None = None, **kwargs
    ) -> Embedder:
        """Load a hub id (from the HF cache when offline) or a local checkpoint directory."""
        from transformers import AutoModel, AutoProcessor

        local = Path(model_id_or_path).expanduser()
        name = str(local) if local.is_dir() else str(model_id_or_path)
        try:
            model = AutoModel.from_pretrained(name, revision=revision)
            processor = AutoProcessor.from_pretrained(name, revision=revision)
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"cannot load embedding model {name!r}: {err}\n"
                "Without network the model must already be in the Hugging Face cache (set HF_HUB_OFFLINE=1 "
                "to use the cache without network calls), or point at a local checkpoint directory "
                "holding the weights, config and processor files: --model /path/to/clip"
            ) from err
        if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ModelLoadError(f"{name!r}: its processor lacks an image processor or a tokenizer")
        identity = checkpoint_identity(name, revision)
        return cls(model, processor.image_processor, processor.tokenizer, identity, **kwargs)

    @property
    def dim(self) -> int:
        config = self.model.config
        return getattr(config, "projection_dim", None) or config.text_config.hidden_size

    def cache_key(self, kind: str) -> dict:
        """Everything that changes the ``kind`` ("image" or "text") embeddings of this embedder."""
        if kind == "image":
            processor = f"{type(self.image_processor).__name__}\n{self.image_processor.to_json_string()}"
        else:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is not None:  # its padding/truncation state changes with every call: not identity
                spec = json.loads(backend.to_str())
                spec.pop("padding", None)
                spec.pop("truncation", None)
            else:
                spec = self.tokenizer.get_vocab()
            spec = json.dumps(spec, sort_keys=True)
            processor = f"{type(self.tokenizer).__name__}\n{spec}\n{self.text_padding}\n{self.text_max_length}"
        return {
            "nemo_hf": __version__,
            "kind": kind,
            "model": self.identity.as_dict(),
            "dtype": str(self.dtype),
            "preprocessing_sha256": hashlib.sha256(processor.encode()).hexdigest(),
        }

    def embed_images(
        self,
        images: Sequence[tuple[int, str | Path | bytes]],
        cache_dir: str | Path | None = None,
        memory_map: bool = False,
    ) -> np.ndarray:
        """(n, dim) float32 for ``(image_id, file path or encoded bytes)`` pairs, in their order.

        ``memory_map``: a read-only ``np.memmap`` of a ``.npy`` file in the cache (``cache_dir`` needed)
        instead of an array in RAM, for pools whose embeddings would not fit there (10M images x 512
        dims: 20 GB). The same call again maps the same file without rewriting it.
        """
        kind, keys, items, batches = self._image_job(images)
        if not memory_map:
            return self._embed(kind, keys, items, batches, cache_dir)
        if cache_dir is None:
            raise ValueError("memory_map=True needs a cache_dir: the matrix file is kept in the cache")
        cache = self._open_cache(kind, cache_dir)
        path = cache.matrix_path(keys)
        matrix = _read_matrix(path, (len(keys), self.dim))
        if matrix is None:  # what the cache lacks goes into it chunk by chunk, then the matrix is filled from it
            self._compute(kind, keys, items, batches, _missing(keys, cache.keys()), cache, None)
            matrix = cache.write_matrix(path, keys, self.dim)
        return matrix

    def embed_texts(self, texts: Sequence[tuple[int, str]], cache_dir: str | Path | None = None) -> np.ndarray:
        """(n, dim) float32 for ``(sent_id, text)`` pairs, in their order; cached per id and text."""
        return self._embed(*self._text_job(texts), cache_dir)

    def embed_share(
        self,
        images: Sequence[tuple[int, str | Path | bytes]],
        texts: Sequence[tuple[int, str]],
        cache_dir: str | Path,
        ranks,
    ) -> dict[str, int]:
        """Under several processes: this rank's share of the ``images`` and ``texts`` that ``cache_dir``
        lacks, embedded into it. Returns how many of each kind this rank embedded.

        ``ranks``: a ``nemo_hf.distributed.Ranks``. Per kind, every rank lists the cache, all meet (so
        all see the same list: nobody writes before everyone has listed), each embeds its contiguous
        block of what is missing, and all meet again. ``cache_dir`` must be one folder every rank
        sees (shared storage across nodes); afterwards ``embed_images``/``embed_texts`` on any rank
        read everything from it.
        """
        embedded = {}
        for kind, keys, items, batches in (self._image_job(images), self._text_job(texts)):
            cache = self._open_cache(kind, cache_dir)
            present = cache.keys()
            ranks.barrier(f"listing the {kind} embedding cache")
            todo = _missing(keys, present)
            if kind == "text" and todo:  # split in the order the batches are made, so they are a single process's
                todo = [todo[i] for i in self._by_length([items[i][1] for i in todo])]
            mine = [todo[i] for i in ranks.share(len(todo), self.batch_size)]
            _LOG.info("rank %d embeds %d of the %d %ss missing from the cache", ranks.rank, len(mine), len(todo), kind)
            self._compute(kind, keys, items, batches, mine, cache, None)
            ranks.barrier(f"embedding {kind}s")
            embedded[kind] = len(mine)
        return embedded

    def _image_job(self, images) -> tuple[str, list[str], list, Callable]:
        items = [(int(image_id), source) for image_id, source in images]
        return "image", [_image_key(i, source) for i, source in items], items, self._image_batches

    def _text_job(self, texts) -> tuple[str, list[str], list, Callable]:
        items = [(int(sent_id), str(text)) for sent_id, text in texts]
        keys = [f"{i}:{hashlib.sha256(t.encode()).hexdigest()[:16]}" for i, t in items]
        return "text", keys, items, self._text_batches

    def _open_cache(self, kind: str, cache_dir: str | Path) -> EmbeddingCache:
        meta = self.cache_key(kind)
        return EmbeddingCache(Path(cache_dir) / f"{kind}-{key_digest(meta)}", meta)

    def _embed(self, kind: str, keys: list[str], items: list, batches: Callable, cache_dir) -> np.ndarray:
        cache = None if cache_dir is None else self._open_cache(kind, cache_dir)
        found = {} if cache is None else cache.load()
        self._compute(kind, keys, items, batches, _missing(keys, found), cache, found)
        return self._stack(found, keys)

    def _compute(self, kind: str, keys, items, batches: Callable, todo: list[int], cache, found: dict | None) -> None:
        """Embed ``items[todo]`` into ``cache`` (chunk by chunk) and ``found`` (when given)."""
        if not todo:
            return
        pending_keys: list[str] = []
        pending: list[np.ndarray] = []
        try:
            stage_name = "embed images" if kind == "image" else "embed sentences"
            with self._thread_budget(), progress.stage(stage_name, len(todo), disable=not self.progress) as bar:
                for indices, vectors in batches([items[i] for i in todo], todo):
                    for index, vector in zip(indices, vectors):
                        if found is not None:
                            found[keys[index]] = vector
                        pending_keys.append(keys[index])
                    pending.append(vectors)
                    bar.update(len(indices))
                    if cache is not None and len(pending_keys) >= self.cache_chunk:
                        cache.append(pending_keys, np.concatenate(pending))
                        pending_keys, pending = [], []
        finally:  # what was computed survives an interruption
            if cache is not None and pending_keys:
                cache.append(pending_keys, np.concatenate(pending))

    def _stack(self, found: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
        if not keys:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([found[key] for key in keys]).astype(np.float32, copy=False)

    @contextlib.contextmanager
    def _thread_budget(self) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _image_batches(self, items: list, indices: list[int]) -> Iterator[tuple[list[int], np.ndarray]]:
        loader = DataLoader(
            _ImageFiles(items, self.image_processor),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            worker_init_fn=_worker_init if self.num_workers else None,
            prefetch_factor=4 if self.num_workers else None,
            pin_memory=self.device.type == "cuda",
        )
        start = 0
        for pixels in loader:
            with torch.inference_mode():
                out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            yield indices[start : start + len(pixels)], _normalised(out)
            start += len(pixels)

    def _by_length(self, texts: list[str]) -> np.ndarray:
        """The order texts are batched in: by token count (similar lengths together: little padding)."""
        tokens = self.tokenizer(texts, truncation=True, max_length=self.text_max_length)["input_ids"]
        return np.argsort([len(ids) for ids in tokens], kind="stable")

    def _text_batches(self, items: list, indices: list[int]) -> Iterator[tuple[list[int], np.ndarray]]:
        texts = [text for _, text in items]
        order = self._by_length(texts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            tokens = self.tokenizer(
                [texts[i] for i in batch],
                padding=self.text_padding,
                truncation=True,
                max_length=self.text_max_length,
                return_tensors="pt",
            )
            inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode():
                out = self.model.get_text_features(**inputs)
            yield [indices[i] for i in batch], _normalised(out)


def _image_key(image_id: int, source) -> str:
    """An image's cache key: its id and what identifies its content (encoded bytes: their digest; a file: its
    size and modification time). An id alone is not content: another source, or a replaced file, may use it
    for another image, whose negatives would then be mined from the old image's embedding."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"{image_id}:{hashlib.sha256(source).hexdigest()[:16]}"
    try:
        status = os.stat(source)
    except OSError:
        return f"{image_id}:unreadable"  # embedding it raises the error that names the image
    return f"{image_id}:{status.st_size}:{status.st_mtime_ns}"


def _missing(keys: list[str], present) -> list[int]:
    """The first position of each key not in ``present``, in order."""
    first: dict[str, int] = {}
    for index, key in enumerate(keys):
        if key not in present:
            first.setdefault(key, index)
    return list(first.values())


def _normalised(out) -> np.ndarray:
    """The projected embedding (``pooler_output`` of transformers 5 outputs), L2-normalised float32."""
    emb = (out.pooler_output if hasattr(out, "pooler_output") else out).float()
    return torch.nn.functional.normalize(emb, dim=-1).cpu().numpy()


_DEMO_WORDS = (
    "a an the this that left right top bottom middle center front back far near side upper lower "
    "man woman person guy girl boy lady child kid people player men women baby "
    "red blue green yellow white black brown gray grey orange pink purple dark light "
    "shirt jacket hat dress pants car bus truck train bike motorcycle dog cat horse sheep cow bird "
    "elephant zebra giraffe bear chair couch table bed bench umbrella bag bottle cup plate pizza "
    "cake sandwich banana apple orange broccoli donut laptop phone tv book clock vase "
    "big small tall short large little standing sitting walking holding wearing with in on of "
    "and at by to next behind under over closest furthest second first third one two three"
).split()


def demo_embedder(seed: int = 0, **kwargs) -> Embedder:
    """A randomly initialised tiny CLIP with its own word tokenizer, for demos without any download.

    Deterministic for a given seed; its negatives are meaningless (a loud warning says so).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    warnings.warn(
        "DEMO EMBEDDER: a randomly initialised CLIP. The negatives it mines are MEANINGLESS; "
        "use a real checkpoint (e.g. openai/clip-vit-base-patch32) for anything but a demo.",
        stacklevel=2,
    )
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {word: i for i, word in enumerate(specials + sorted(set(_DEMO_WORDS)))}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=32,
    )
    tiny = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tiny, "vocab_size": len(vocab), "max_position_embeddings": 32,
            "pad_token_id": vocab["<pad>"], "bos_token_id": vocab["<bos>"], "eos_token_id": vocab["<eos>"],
        },
        vision_config={**tiny, "image_size": 224, "patch_size": 32},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    identity = module_identity(model, f"nemo_hf-demo-clip-seed{seed}")
    return Embedder(model, CLIPImageProcessorPil(), tokenizer, identity, **kwargs)
