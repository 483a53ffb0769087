"""Tiny randomly initialised SAM and captioner, and a "perfect" CLIP stand-in, built in code for the zero-shot
tests (no download, a few MB, CPU seconds)."""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def tiny_sam(seed: int = 0):
    """(SamModel, SamImageProcessorPil) with a 64-px input and 32-d features."""
    from transformers import SamConfig, SamImageProcessorPil, SamModel

    config = SamConfig(
        vision_config=dict(
            hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=8, window_size=4, global_attn_indexes=(1,), mlp_dim=64, num_pos_feats=16,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SamModel(config).eval()
    return model, SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})


def tiny_captioner(seed: int = 0):
    """A VisionEncoderDecoder (ViT + GPT-2) with a word-level tokenizer: random captions, real generate()."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        GPT2Config,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessorPil,
    )

    words = ["<pad>", "<s>", "</s>", "<unk>"] + "a man woman dog cat red blue car on left right the".split()
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    encoder = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=8)  # fmt: skip
    decoder = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionEncoderDecoderModel(config).eval()
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model, ViTImageProcessorPil(size={"height": 32, "width": 32}), tokenizer


def _key(values) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


class PerfectClip(torch.nn.Module):
    """A CLIP stand-in whose embeddings know the answer: the crop of object k and every expression that refers
    to k embed to the same one-hot vector; any other image or text embeds to dimension 0.

    Built from the crops (as pixel values after the real image processor) and the token ids of the
    expressions, so it checks the plumbing (proposals, crops, caching, mapping the mask back, the file),
    not CLIP. An expression used for several objects embeds to the normalised sum of their vectors.
    """

    def __init__(self, image_processor, tokenizer, crops_by_object: dict[int, np.ndarray], texts: dict[str, list[int]]):
        super().__init__()
        from transformers import CLIPConfig

        ids = sorted(crops_by_object)
        self.dim = len(ids) + 1
        self.config = CLIPConfig(projection_dim=self.dim)
        self.name_or_path = "perfect-clip-stub"
        self.register_buffer("anchor", torch.zeros(1))  # something for .to() and the identity hash
        slot = {ann: i + 1 for i, ann in enumerate(ids)}
        pixels = image_processor(images=[crops_by_object[a] for a in ids], return_tensors="np")["pixel_values"]
        self.images = {_key(p.astype(np.float32)): slot[a] for p, a in zip(pixels, ids)}
        self.texts: dict[str, list[int]] = {}
        for text, anns in texts.items():
            self.texts[_key(np.asarray(tokenizer(text, truncation=True)["input_ids"], np.int64))] = [slot[a] for a in anns]

    def _one_hot(self, slots_per_row) -> torch.Tensor:
        out = torch.zeros(len(slots_per_row), self.dim)
        for row, slots in enumerate(slots_per_row):
            out[row, slots] = 1.0
        return out

    def get_image_features(self, pixel_values):
        keys = [_key(p.float().cpu().numpy()) for p in pixel_values]
        return self._one_hot([[self.images.get(k, 0)] for k in keys])

    def get_text_features(self, input_ids, attention_mask=None):
        rows = []
        for ids, mask in zip(input_ids, attention_mask if attention_mask is not None else torch.ones_like(input_ids)):
            rows.append(self.texts.get(_key(ids[mask.bool()].cpu().numpy().astype(np.int64)), [0]))
        return self._one_hot(rows)
