"""Image and sentence embeddings for mining, with any ``transformers`` checkpoint that has
``get_image_features`` / ``get_text_features`` (CLIP, SigLIP, ...), cached on disk (``cache``).

Embeddings are L2-normalised float32.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .. import __version__, progress
from ..pixels import to_8bit
from .cache import ChunkWriter, EmbeddingCache, image_key, missing, read_matrix, stack, text_key
from .identity import ModelIdentity, checkpoint_identity, module_identity

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
_LOG = logging.getLogger(__name__)


HUB_PROBE_TIMEOUT_S = 5.0
OFFLINE_HINT = (
    "Without network the model must already be in the Hugging Face cache (HF_HUB_OFFLINE=1 uses the cache "
    "with no network call), or point at a local checkpoint directory holding the weights, config and "
    'processor files: model="/path/to/clip" in Python, --model /path/to/clip on the command line'
)


class ModelLoadError(OSError):
    """The embedding model could not be loaded; the message says how to point at one."""


def hub_access(name: str, revision: str | None = None) -> dict:
    """``from_pretrained``'s extra arguments for a model after one quick look at the Hub.

    Nothing for a local directory or when the Hub answers; ``local_files_only=True`` under HF_HUB_OFFLINE
    or when the Hub cannot be reached (one attempt of at most ``HUB_PROBE_TIMEOUT_S``): the cache serves,
    or the load fails at once, instead of huggingface_hub's retries (about 25 s a file, several files).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    if Path(name).is_dir():
        return {}
    if constants.HF_HUB_OFFLINE:
        return {"local_files_only": True}
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError as err:  # the Hub answered: not found and gated say so at once, a 5xx is down
        status = getattr(err.response, "status_code", 0) if err.response is not None else 0
        if status >= 500:
            _LOG.warning("the Hub answered %s: loading %s from the cache only", status, name)
            return {"local_files_only": True}
    except ValueError:  # not a repo id (a path that does not exist): from_pretrained says so itself
        pass
    except Exception as err:  # no route, refused, timed out, no DNS (the HTTP client's own error classes)
        _LOG.warning("the Hub is unreachable (%s: %s): loading %s from the cache only", type(err).__name__, err, name)
        return {"local_files_only": True}
    return {}


class ImageFiles(Dataset):
    """Decodes (as PIL does: an image PIL decodes is an image, libjpeg warnings and all) and preprocesses
    images in DataLoader workers; errors name the image.

    ``sizes``: image id -> the (width, height) its rows were made for. An image that decodes to another
    size (its file replaced after the build checked it) is an error, never an embedding of other pixels.
    """

    def __init__(self, items: Sequence[tuple[int, str | Path | bytes]], image_processor,
                 sizes: Mapping[int, tuple[int, int]] | None = None):
        self.items, self.image_processor, self.sizes = items, image_processor, sizes or {}

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
        expected = self.sizes.get(image_id)
        if expected is not None and rgb.size != tuple(expected):
            raise ValueError(
                f"image {image_id}: {where} is {rgb.size[0]}x{rgb.size[1]}, but its rows were made for "
                f"{expected[0]}x{expected[1]}: the file changed after it was checked; run the build again"
            )
        pixels = self.image_processor(images=rgb, return_tensors="np")["pixel_values"][0]
        return torch.from_numpy(np.ascontiguousarray(pixels))


def _worker_init(_: int) -> None:
    import signal

    torch.set_num_threads(1)  # a decode worker must not spawn a thread pool of its own
    parent = os.getppid()

    def interrupt_the_parent(signum, frame) -> None:
        """Ctrl-C here stops the whole run: the parent stops and shuts its workers down, this one included."""
        if os.getppid() == parent:  # not a process that adopted this one after the parent died
            os.kill(parent, signal.SIGINT)

    signal.signal(signal.SIGINT, interrupt_the_parent)


def available_cores() -> int:
    """This process's cores: its affinity, shared with the other processes a launcher started on the node."""
    from .ranks import local_processes

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
        access = hub_access(name, revision)
        try:
            model = AutoModel.from_pretrained(name, revision=revision, **access)
            processor = AutoProcessor.from_pretrained(name, revision=revision, **access)
        except (OSError, ValueError) as err:
            said = (str(err).strip().splitlines() or [type(err).__name__])[0]  # transformers adds a docs link
            raise ModelLoadError(f"cannot load embedding model {name!r}: {said} {OFFLINE_HINT}") from err
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
        sizes: Mapping[int, tuple[int, int]] | None = None,
    ) -> np.ndarray:
        """(n, dim) float32 for ``(image_id, file path or encoded bytes)`` pairs, in their order.

        ``sizes``: image id -> the (width, height) the caller expects (``ImageFiles``); checked on decoding.

        ``memory_map``: a read-only ``np.memmap`` of a ``.npy`` file in the cache (``cache_dir`` needed)
        instead of an array in RAM, for pools whose embeddings would not fit there (10M images x 512
        dims: 20 GB). The same call again maps the same file without rewriting it.
        """
        kind, keys, items, batches = self._image_job(images, sizes)
        if not memory_map:
            return self._embed(kind, keys, items, batches, cache_dir)
        if cache_dir is None:
            raise ValueError("memory_map=True needs a cache_dir: the matrix file is kept in the cache")
        cache = self._open_cache(kind, cache_dir)
        path = cache.matrix_path(keys)
        matrix = read_matrix(path, (len(keys), self.dim))
        if matrix is None:  # what the cache lacks goes into it chunk by chunk, then the matrix is filled from it
            self._compute(kind, keys, items, batches, missing(keys, cache.keys()), cache, None)
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
        image_sizes: Mapping[int, tuple[int, int]] | None = None,
    ) -> dict[str, int]:
        """Under several processes: this rank's share of the ``images`` and ``texts`` that ``cache_dir``
        lacks, embedded into it. Returns how many of each kind this rank embedded.

        ``ranks``: a ``nemo_hf.mining.ranks.Ranks``. Per kind, every rank lists the cache, all meet (so
        all see the same list: nobody writes before everyone has listed), each embeds its contiguous
        block of what is missing, and all meet again. ``cache_dir`` must be one folder every rank
        sees (shared storage across nodes); afterwards ``embed_images``/``embed_texts`` on any rank
        read everything from it.
        """
        embedded = {}
        for kind, keys, items, batches in (self._image_job(images, image_sizes), self._text_job(texts)):
            cache = self._open_cache(kind, cache_dir)
            present = cache.keys()
            ranks.barrier(f"listing the {kind} embedding cache")
            todo = missing(keys, present)
            if kind == "text" and todo:  # split in the order the batches are made, so they are a single process's
                todo = [todo[i] for i in self._by_length([items[i][1] for i in todo])]
            mine = [todo[i] for i in ranks.share(len(todo), self.batch_size)]
            _LOG.info("rank %d embeds %d of the %d %ss missing from the cache", ranks.rank, len(mine), len(todo), kind)
            self._compute(kind, keys, items, batches, mine, cache, None)
            ranks.barrier(f"embedding {kind}s")
            embedded[kind] = len(mine)
        return embedded

    def _image_job(self, images, sizes=None) -> tuple[str, list[str], list, Callable]:
        items = [(int(image_id), source) for image_id, source in images]
        batches = functools.partial(self._image_batches, sizes=sizes)
        return "image", [image_key(i, source) for i, source in items], items, batches

    def _text_job(self, texts) -> tuple[str, list[str], list, Callable]:
        items = [(int(sent_id), str(text)) for sent_id, text in texts]
        return "text", [text_key(i, text) for i, text in items], items, self._text_batches

    def _open_cache(self, kind: str, cache_dir: str | Path) -> EmbeddingCache:
        return EmbeddingCache.for_kind(cache_dir, kind, self.cache_key(kind))

    def _embed(self, kind: str, keys: list[str], items: list, batches: Callable, cache_dir) -> np.ndarray:
        cache = None if cache_dir is None else self._open_cache(kind, cache_dir)
        found = {} if cache is None else cache.load()
        self._compute(kind, keys, items, batches, missing(keys, found), cache, found)
        return stack(found, keys, self.dim)

    def _compute(self, kind: str, keys, items, batches: Callable, todo: list[int], cache, found: dict | None) -> None:
        """Embed ``items[todo]`` into ``cache`` (chunk by chunk) and ``found`` (when given)."""
        if not todo:
            return
        stage_name = "embed images" if kind == "image" else "embed sentences"
        with ChunkWriter(cache, self.cache_chunk, found) as writer:
            with self.thread_budget(), progress.stage(stage_name, len(todo), disable=not self.progress) as bar:
                for indices, vectors in batches([items[i] for i in todo], todo):
                    writer.add([keys[i] for i in indices], vectors)
                    bar.update(len(indices))

    @contextlib.contextmanager
    def thread_budget(self) -> Iterator[None]:
        """Torch at this embedder's ``threads`` for the block, as it was after."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def _image_batches(self, items: list, indices: list[int], sizes=None) -> Iterator[tuple[list[int], np.ndarray]]:
        loader = DataLoader(
            ImageFiles(items, self.image_processor, sizes),
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
            yield indices[start : start + len(pixels)], normalised(out)
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
            yield [indices[i] for i in batch], normalised(out)


def normalised(out) -> np.ndarray:
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
