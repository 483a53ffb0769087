"""MaskRIS (naver-ai/maskris) for any model on the HF stack: image-patch and text-token masking.

- :func:`mask_image_patches` and :func:`mask_text_tokens` make the masked view of a collated batch.
- :class:`MaskRIS` holds the parameters (defaults: the paper's) and draws both masks for a batch from a
  seed, the epoch and the batch's ``sent_id``s, so a run is reproducible whatever the DataLoader workers.
  ``RISCollator(..., maskris=MaskRIS())`` calls it on training batches.
- The loss that uses both views, Distortion-aware Contextual Learning (DCL), is `nemo_hf.training.dcl`.

Text masking with tokenizers that have no mask token (CLIP, hence CLIPSeg): the obvious stand-in
``<|endoftext|>`` is CLIP's eos *and* pad token, and HF's CLIP text model pools the sentence feature at
the eos position (the first eos, or the highest id for configs with the legacy ``eos_token_id=2``).
An eos mid-sentence would move the pooled feature to the masked word. We use :data:`MASK_STAND_IN` ("*")
instead: an ordinary vocabulary token (CLIP saw it mid-caption in pre-training), nearly free of meaning,
not special (so nothing that skips special tokens treats it as structure), and with an id (265) far below
eos, so neither pooling rule can pick it. Set ``tokenizer.mask_token`` to choose another.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .sampling import check_seed

MASK_STAND_IN = "*"
MASKED_KEYS = ("masked_pixels", "input_ids_masked")  # what MaskRIS adds to a collated batch
BACKWARD_STRATEGIES = ("per_pass", "combined")
OFFICIAL_CLASS_WEIGHTS = (0.9, 1.1)  # background, foreground: naver-ai/maskris criterion.py:8
DISTIL_AT = ("logits", "labels")  # where DCL's masked term is computed: the official decoder resolution, or the labels'


def mask_image_patches(
    pixel_values: torch.Tensor, patch_size: int = 32, ratio: float = 0.75, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised (B, C, H, W) -> (masked copy, patch_mask (B, ceil(H/p), ceil(W/p)) bool, True = masked).

    Masked pixels become 0, the mean colour in normalised space. See :func:`random_patch_mask`."""
    if pixel_values.ndim != 4:
        raise ValueError(f"expected pixel_values (B, C, H, W), got shape {tuple(pixel_values.shape)}")
    batch, _, height, width = pixel_values.shape
    patch_mask = random_patch_mask(batch, (height, width), patch_size, ratio, generator).to(pixel_values.device)
    return apply_pixel_mask(pixel_values, patch_pixels(patch_mask, patch_size, (height, width))), patch_mask


def random_patch_mask(
    batch_size: int, size: tuple[int, int], patch_size: int = 32, ratio: float = 0.75, generator=None
) -> torch.Tensor:
    """Bool (B, ceil(H/p), ceil(W/p)), True = masked. MAE-style, as the official code: per sample, random
    noise over the ``L`` patches, argsort, keep the first ``int(L * (1 - ratio))``, mask the rest. Edge
    patches of a size ``patch_size`` does not divide are clipped by :func:`patch_pixels`."""
    _check_patch(patch_size, ratio)
    grid_h, grid_w = (math.ceil(side / patch_size) for side in size)
    n_patches = grid_h * grid_w
    order = torch.rand(batch_size, n_patches, generator=generator, device=_device(generator)).argsort(dim=1)
    patch_mask = torch.zeros(batch_size, n_patches, dtype=torch.bool, device=order.device)
    patch_mask.scatter_(1, order[:, int(n_patches * (1 - ratio)) :], True)
    return patch_mask.view(batch_size, grid_h, grid_w)


def patch_pixels(patch_mask: torch.Tensor, patch_size: int, size: tuple[int, int]) -> torch.Tensor:
    """Patch grid (B, gh, gw) -> pixel mask (B, H, W), edge patches clipped to ``size``."""
    height, width = size
    return patch_mask.repeat_interleave(patch_size, 1)[:, :height].repeat_interleave(patch_size, 2)[..., :width]


def apply_pixel_mask(pixel_values: torch.Tensor, masked_pixels: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) pixels with (B, H, W) ``masked_pixels`` set to 0: MaskRIS's masked image view."""
    return pixel_values.masked_fill(masked_pixels.to(pixel_values.device)[:, None], 0)


def mask_text_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer,
    ratio: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """BERT-style masking of (B, T) ids; returns a masked copy (the attention mask stays as it is).

    Each real token is chosen with probability ``ratio``; of those, ``mask_fraction`` become the mask token
    (:func:`text_mask_token_id`), ``random_fraction`` a random non-special vocabulary id, the rest stay.
    Special tokens (hence padding) and positions whose ``attention_mask`` is 0 are never touched."""
    _check_text(ratio, mask_fraction, random_fraction)
    if input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ")
    device = input_ids.device
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype, device=device)
    chosen = attention_mask.bool() & ~torch.isin(input_ids, special) & (_uniform(input_ids, generator) < ratio)
    kind = _uniform(input_ids, generator)
    to_mask = chosen & (kind < mask_fraction)
    to_random = chosen & (kind >= mask_fraction) & (kind < mask_fraction + random_fraction)
    vocabulary = replacement_vocabulary(tokenizer).to(device)
    picks = torch.randint(len(vocabulary), input_ids.shape, generator=generator, device=_device(generator))
    masked = input_ids.masked_fill(to_mask, text_mask_token_id(tokenizer))
    return torch.where(to_random, vocabulary[picks.to(device)].to(input_ids.dtype), masked)


def _device(generator: torch.Generator | None):
    return generator.device if generator is not None else "cpu"


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(like.shape, generator=generator, device=_device(generator)).to(like.device)


def text_mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, or :data:`MASK_STAND_IN` for tokenizers without one (see the module
    docstring); never eos or pad, and below eos where eos is the vocabulary's last id (CLIP)."""
    if tokenizer.mask_token_id is not None:
        token_id, what = int(tokenizer.mask_token_id), f"mask token {tokenizer.mask_token!r}"
    else:
        ids = tokenizer(MASK_STAND_IN, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or ids[0] in tokenizer.all_special_ids:
            raise ValueError(
                f"{type(tokenizer).__name__} has no mask token and {MASK_STAND_IN!r} is not one plain token of its "
                "vocabulary: set tokenizer.mask_token to a token the text model may see mid-sentence"
            )
        token_id, what = int(ids[0]), f"stand-in {MASK_STAND_IN!r}"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if token_id in (eos, pad):
        raise ValueError(f"the {what} is the eos or pad token: the text model would pool or stop at it")
    if eos is not None and eos == tokenizer.vocab_size - 1 and token_id > eos:
        raise ValueError(
            f"the {what} (id {token_id}) lies above eos (id {eos}): CLIP configs with the legacy eos_token_id=2 "
            "pool at the highest id, which would then be the masked word"
        )
    return token_id


def replacement_vocabulary(tokenizer) -> torch.Tensor:
    """Ids a random replacement may take: the base vocabulary without special tokens."""
    return _vocabulary_without(tokenizer.vocab_size, frozenset(tokenizer.all_special_ids))


@functools.lru_cache(maxsize=8)
def _vocabulary_without(vocab_size: int, special_ids: frozenset) -> torch.Tensor:
    ids = torch.arange(vocab_size)
    return ids[~torch.isin(ids, torch.tensor(sorted(special_ids), dtype=ids.dtype))]


def _fraction(value, name: str) -> float:
    """``value`` as a float in [0, 1]; a string ("0.5"), a bool or NaN is refused, never coerced or compared."""
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_patch(patch_size, ratio) -> None:
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    _fraction(ratio, "image_ratio")


def _check_text(ratio, mask_fraction, random_fraction) -> None:
    _fraction(ratio, "text_ratio")
    _fraction(mask_fraction, "mask_fraction")
    _fraction(random_fraction, "random_fraction")
    if mask_fraction + random_fraction > 1.0 + 1e-9:
        raise ValueError(
            f"mask_fraction ({mask_fraction}) and random_fraction ({random_fraction}) must be >= 0 and sum to <= 1"
        )


def _check_class_weights(class_weights) -> tuple[float, ...] | None:
    if class_weights is None:
        return None
    try:
        weights = tuple(float(w) for w in class_weights if not isinstance(w, (bool, str)))
    except TypeError:
        weights = ()
    if len(weights) < 2 or len(weights) != len(class_weights) or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(
            f"class_weights must be None or one finite weight >= 0 per class (background, foreground, ...), "
            f"got {class_weights!r}"
        )
    return weights


class MaskRIS:
    """MaskRIS's parameters and its draws; defaults from the paper (patch 32, image ratio 0.75, text 0.15
    with 80/10/10, DCL 0.5 clean + 0.5 masked) and the official code's (``class_weights`` (0.9, 1.1) for
    background and foreground, ``None`` for unweighted; ``distil_at="logits"``: the masked term at the
    decoder's resolution, ``"labels"`` at the labels'; see `nemo_hf.training.dcl`).

    ``backward``: ``"per_pass"`` (the official loop: backward after each pass, so the two passes never hold
    activations together) or ``"combined"`` (one backward of the summed loss). ``set_epoch`` changes the
    draws every epoch, as ``NeMoMosaic.set_epoch`` does; ``RISTrainer`` calls it at each epoch begin.
    """

    def __init__(
        self,
        patch_size: int = 32,
        image_ratio: float = 0.75,
        text_ratio: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        clean_weight: float = 0.5,
        backward: str = "per_pass",
        seed: int = 0,
        class_weights: Sequence[float] | None = OFFICIAL_CLASS_WEIGHTS,
        distil_at: str = "logits",
    ):
        _check_patch(patch_size, image_ratio)
        _check_text(text_ratio, mask_fraction, random_fraction)
        _fraction(clean_weight, "clean_weight")
        if backward not in BACKWARD_STRATEGIES:
            raise ValueError(f"backward must be one of {BACKWARD_STRATEGIES}, got {backward!r}")
        self.patch_size = int(patch_size)
        self.image_ratio = float(image_ratio)
        self.text_ratio = float(text_ratio)
        self.mask_fraction = float(mask_fraction)
        self.random_fraction = float(random_fraction)
        self.clean_weight = float(clean_weight)
        self.backward = backward
        self.class_weights = _check_class_weights(class_weights)
        if distil_at not in DISTIL_AT:
            raise ValueError(f"distil_at must be one of {DISTIL_AT}, got {distil_at!r}")
        self.distil_at = distil_at
        self.seed = check_seed(seed, "seed")
        self.epoch = 0
        self._unkeyed_batches = 0

    def __repr__(self) -> str:
        return (
            f"MaskRIS(patch_size={self.patch_size}, image_ratio={self.image_ratio}, text_ratio={self.text_ratio}, "
            f"mask_fraction={self.mask_fraction}, random_fraction={self.random_fraction}, "
            f"clean_weight={self.clean_weight}, backward={self.backward!r}, seed={self.seed}, "
            f"class_weights={self.class_weights}, distil_at={self.distil_at!r}, epoch={self.epoch})"
        )

    def dcl_options(self) -> dict:
        """The keyword arguments of ``dcl_two_pass`` / ``dcl_loss`` for this MaskRIS's loss."""
        return {"clean_weight": self.clean_weight, "class_weights": self.class_weights, "distil_at": self.distil_at}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_seed(epoch, "epoch")

    def generator(self, keys: Sequence[int] | None) -> torch.Generator:
        """A generator seeded from (seed, epoch, keys). ``keys`` are the batch's ``sent_id``s; without them
        a per-process batch counter (and the DataLoader worker id) stand in, reproducible for a fixed
        number of workers only."""
        if keys is None:
            info = torch.utils.data.get_worker_info()
            keys = [-1, info.id if info is not None else 0, self._unkeyed_batches]
            self._unkeyed_batches += 1
        entropy = [self.seed, self.epoch, *(int(k) & 0xFFFFFFFFFFFFFFFF for k in keys)]
        state = np.random.SeedSequence(entropy).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def __call__(self, batch: Mapping, tokenizer, keys: Sequence[int] | None = None) -> dict:
        """A collated batch -> the same batch plus ``masked_pixels`` (bool (B, H, W), True where the masked
        view is 0) and ``input_ids_masked``. The masked image itself is made where the model runs
        (:func:`apply_pixel_mask`, in :func:`dcl_two_pass`): a second float copy of ``pixel_values``
        would cost a DataLoader worker more than all of the masking (see ``bench/bench_maskris.py``)."""
        generator = self.generator(keys)
        batch_size, _, height, width = batch["pixel_values"].shape
        patch_mask = random_patch_mask(batch_size, (height, width), self.patch_size, self.image_ratio, generator)
        out = dict(batch)
        out["masked_pixels"] = patch_pixels(patch_mask, self.patch_size, (height, width))
        out["input_ids_masked"] = mask_text_tokens(
            batch["input_ids"], batch["attention_mask"], tokenizer,
            self.text_ratio, self.mask_fraction, self.random_fraction, generator,
        )  # fmt: skip
        return out


