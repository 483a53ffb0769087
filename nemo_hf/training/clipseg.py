"""A tiny untrained CLIPSeg for tests and demos that must run offline on a CPU in seconds."""

from __future__ import annotations

import string

import torch


def tiny_random_clipseg(image_size: int = 64, seed: int = 0):
    """An untrained CLIPSeg a few MB large + its processor (character-level tokenizer built in code),
    for tests and demos that must run offline on a CPU in seconds. Returns ``(model, processor)``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        PreTrainedTokenizerFast,
        ViTImageProcessorPil,
    )

    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(string.ascii_lowercase + string.digits + " .,'-*")))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|unk|>",
        model_max_length=77,
    )
    processor = CLIPSegProcessor(
        image_processor=ViTImageProcessorPil(size={"height": image_size, "width": image_size}), tokenizer=tokenizer
    )
    config = CLIPSegConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=32, extract_layers=(0, 1, 2), reduce_dim=16,
        decoder_num_attention_heads=2, decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    return CLIPSegForImageSegmentation(config), processor
