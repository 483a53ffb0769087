"""Captions of proposal crops (TAS's P term) and of whole images, with any ``transformers`` image-to-text
model that ``generate``s from ``pixel_values`` (BLIP, BLIP-2, GIT, a VisionEncoderDecoder, ...)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..mining.identity import ModelIdentity, checkpoint_identity, module_identity
from .loading import load_pretrained

MAX_NEW_TOKENS = 30


class Captioner:
    """``model`` + ``image_processor`` + ``tokenizer``; fp16 on GPU like the embedder."""

    def __init__(self, model, image_processor, tokenizer, name: str, *, device=None, batch_size: int = 16,
                 identity: ModelIdentity | None = None):
        self.identity = identity or module_identity(model, name)  # a checkpoint rewritten at the same path is another
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.image_processor, self.tokenizer, self.name = image_processor, tokenizer, name
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"Captioner({self.name!r}, device={self.device.type})"

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, **kwargs) -> Captioner:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        name, (model, image_processor, tokenizer) = load_pretrained(
            "captioner", model_id_or_path,
            AutoModelForImageTextToText.from_pretrained, AutoImageProcessor.from_pretrained, AutoTokenizer.from_pretrained,
        )  # fmt: skip
        return cls(model, image_processor, tokenizer, name, identity=checkpoint_identity(name), **kwargs)

    def cache_key(self) -> dict:
        """What its captions depend on: the weights (not only the name), the dtype, the decoding."""
        return {"model": self.identity.as_dict(), "dtype": str(self.dtype), "max_new_tokens": MAX_NEW_TOKENS}

    def caption(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per uint8 HxWx3 image, greedy decoding."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [Image.fromarray(np.ascontiguousarray(a)) for a in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                ids = self.model.generate(
                    pixel_values=pixels.to(self.device, self.dtype), max_new_tokens=MAX_NEW_TOKENS, do_sample=False
                )
            captions += [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return captions
