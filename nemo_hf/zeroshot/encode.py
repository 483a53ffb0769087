"""CLIP features for zero-shot scoring: crops and whole images in batches, texts memoised, and the
per-image cache that makes a run resumable.

TAS re-encodes an image's proposal crops inside its per-expression loop; here everything that depends
only on the image (proposal masks, crop embeddings, centroids, the whole-image embedding, captions)
is computed once per image, stored as one ``<image_id>.npz`` file (written atomically), and reused for
every expression of the image and by any later run with the same model, proposer and captioner. Each file
carries what it was computed from (the cache key and the image's content: its bytes' digest, and its
instances' for the instance proposer) and is reused only when both match: a rebuilt folder, or a file
copied to another image's name or into another cache, is recomputed, never scored stale.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..folder.files import is_regular_file
from ..mining.cache import UNREADABLE_NPZ, atomic_write, cache_directory, key_digest
from ..mining.embed import Embedder, normalised

CACHE_FORMAT = 2  # 2: each file stamped with its cache key and image content


class ClipEncoder:
    """Batches of crops (uint8 HxWx3 arrays) and of texts through one `Embedder`'s model and processors.

    Text embeddings are memoised: negative phrases and captions repeat across images.
    """

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self._texts: dict[str, np.ndarray] = {}

    def __repr__(self) -> str:
        return f"ClipEncoder({self.embedder!r})"

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, d) float32, L2-normalised; the model's own preprocessing (resize, centre crop, normalise)."""
        emb = self.embedder
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        with emb.thread_budget():
            for start in range(0, len(images), emb.batch_size):
                batch = [Image.fromarray(np.ascontiguousarray(a)) for a in images[start : start + emb.batch_size]]
                pixels = emb.image_processor(images=batch, return_tensors="pt")["pixel_values"]
                with torch.inference_mode():
                    features = emb.model.get_image_features(pixel_values=pixels.to(emb.device, emb.dtype))
                out.append(normalised(features))
        return np.concatenate(out)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32, L2-normalised, in the order given."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._texts))
        if todo:
            vectors = self.embedder.embed_texts(list(enumerate(todo)))
            self._texts.update(zip(todo, vectors))
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._texts[t] for t in texts])

    def cache_key(self) -> dict:
        return {"image": self.embedder.cache_key("image"), "text": self.embedder.cache_key("text")}


@dataclass
class ImageFeatures:
    """Everything the scorer needs from one image, whatever the expression."""

    size: tuple[int, int]  # (h, w) of the image
    masks: list[dict]  # proposal masks, COCO RLE at the image's original size
    crop_emb: np.ndarray  # (n, d)
    centroids: np.ndarray  # (n, 2) as (row, column)
    image_emb: np.ndarray  # (d,) the whole image
    captions: list[str] | None = None  # one per proposal, with a captioner
    caption_emb: np.ndarray | None = None  # (n, d)
    whole_caption: str | None = None  # the whole image's caption (for --phrases spacy)

    def to_npz(self, **stamps: str) -> bytes:
        """The arrays as ``.npz`` bytes, with ``stamps`` (strings saying what they were computed from) beside them."""
        arrays = {
            **{name: np.asarray(value, dtype=str) for name, value in stamps.items()},
            "size": np.asarray(self.size, dtype=np.int64),
            "mask_size": np.asarray([m["size"] for m in self.masks], dtype=np.int64).reshape(-1, 2),
            "mask_counts": np.asarray([m["counts"] for m in self.masks], dtype=str),
            "crop_emb": self.crop_emb.astype(np.float32),
            "centroids": self.centroids.astype(np.float64),
            "image_emb": self.image_emb.astype(np.float32),
        }
        if self.captions is not None:
            arrays["captions"] = np.asarray(self.captions, dtype=str)
            arrays["caption_emb"] = self.caption_emb.astype(np.float32)
        if self.whole_caption is not None:
            arrays["whole_caption"] = np.asarray(self.whole_caption, dtype=str)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data) -> ImageFeatures:
        """ValueError for a file whose arrays disagree (another writer's, or edited): masks that are not
        RLEs of the image's size, one row per proposal missing, a NaN or inf."""
        from ..masks import check_rle

        size = tuple(int(v) for v in data["size"])
        if len(size) != 2:
            raise ValueError(f"size {size} is not (h, w)")
        masks = [{"size": [int(h), int(w)], "counts": str(c)} for (h, w), c in zip(data["mask_size"], data["mask_counts"])]
        for k, mask in enumerate(masks):
            check_rle(mask, *size, f"proposal {k}")
        n = len(data["mask_counts"])
        rows = {"mask_size": data["mask_size"], "crop_emb": data["crop_emb"], "centroids": data["centroids"]}
        if "captions" in data:
            rows.update(captions=data["captions"], caption_emb=data["caption_emb"])
        if any(a.ndim == 0 or a.shape[0] != n for a in rows.values()) or data["centroids"].shape[1:] != (2,):
            raise ValueError(f"{n} proposal masks but " + ", ".join(f"{k} {a.shape}" for k, a in rows.items()))
        floats = [data["crop_emb"], data["centroids"], data["image_emb"]] + ([data["caption_emb"]] if "captions" in data else [])
        if not all(np.issubdtype(a.dtype, np.floating) and np.isfinite(a).all() for a in floats):
            raise ValueError("an embedding or centroid that is not a finite float")
        return cls(
            size=size,
            masks=masks,
            crop_emb=data["crop_emb"],
            centroids=data["centroids"],
            image_emb=data["image_emb"],
            captions=[str(c) for c in data["captions"]] if "captions" in data else None,
            caption_emb=data["caption_emb"] if "caption_emb" in data else None,
            whole_caption=str(data["whole_caption"]) if "whole_caption" in data else None,
        )


def image_content(data: bytes | memoryview, objects: list[dict] | None = None) -> str:
    """What one image's features are computed from: its encoded bytes (and ``objects``, its instances, for a
    proposer that reads them), as a digest."""
    digest = hashlib.sha256(data)
    if objects is not None:
        digest.update(b"\0objects\0" + json.dumps(objects, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class FeatureCache:
    """``<directory>/<key digest>/<image_id>.npz``, one file per image, keyed by everything that changes it:
    the key (model, proposer, captioner) names the folder, and each file carries that key's digest and its
    image's `image_content`, both checked on read."""

    def __init__(self, directory: str | Path, key: dict):
        meta = {"format": CACHE_FORMAT, **key}
        self.key = key_digest(meta)
        self.directory = cache_directory(Path(directory) / self.key, meta)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.directory)!r})"

    def _path(self, image_id: int) -> Path:
        return self.directory / f"{int(image_id)}.npz"

    def get(self, image_id: int, content: str) -> ImageFeatures | None:
        """The features of ``image_id`` when its file was computed from ``content`` under this key; None when
        absent or stale (another image's, another folder build's, another cache's: recomputed by the caller)."""
        path = self._path(image_id)
        if not path.exists():
            return None
        if not is_regular_file(path, follow_symlinks=False):  # a FIFO or /dev/zero would block or fill memory
            warnings.warn(f"feature cache: {path} is not a regular file; ignored, its features are recomputed")
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if "key" not in data or "content" not in data:
                    raise ValueError("no key or content stamp")
                if str(data["key"]) != self.key or str(data["content"]) != content:
                    return None
                return ImageFeatures.from_npz(data)
        except UNREADABLE_NPZ as err:
            warnings.warn(f"feature cache: dropping unreadable {path} ({err}); it will be recomputed")
            path.unlink(missing_ok=True)
            return None

    def put(self, image_id: int, content: str, features: ImageFeatures) -> None:
        atomic_write(self._path(image_id), features.to_npz(key=self.key, content=content))
