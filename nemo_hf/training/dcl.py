"""MaskRIS's Distortion-aware Contextual Learning (DCL): the clean view learns from the labels, the masked
view from the clean view's own detached prediction.

The official rule (naver-ai/maskris ``criterion.py``, ``training.py``), nemo_hf's default:

- one criterion for both passes, ``nn.CrossEntropyLoss(weight=[0.9, 1.1])`` (background, foreground);
- the model's logits stay at the decoder's resolution; the clean term upsamples them to the labels' size
  (bilinear, ``align_corners=True``, only when the sizes differ) and scores them against the class indices;
- the masked term stays at the decoder's resolution, against ``softmax(clean_logits).detach()`` of that same
  resolution (cross-entropy with probability targets, the same weights: torch's semantics).

Binary logits z (CLIPSeg) are the two-class logits (0, z), so one rule serves both; with ``class_weights=None``
and logits at the labels' size that is plain BCE. ``distil_at="labels"`` distils at the labels' size instead.

:func:`dcl_loss` / :func:`dcl_terms` score two passes' logits; :func:`dcl_two_pass` runs both passes of one
model on a batch that `MaskRIS` (``nemo_hf.transforms.maskris``) masked; ``RISTrainer(..., maskris=...)``
uses it, and a hand-written loop can too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..transforms.maskris import DISTIL_AT, MASKED_KEYS, OFFICIAL_CLASS_WEIGHTS, apply_pixel_mask

IGNORE_INDEX = -100  # torch's default, as the official criterion leaves it

Weights = Sequence[float] | None


def dcl_terms(
    clean_logits: torch.Tensor, masked_logits: torch.Tensor, labels: torch.Tensor,
    class_weights: Weights = OFFICIAL_CLASS_WEIGHTS, distil_at: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(clean term, masked term): :func:`supervised_term` and :func:`distillation_term` with one set of weights.

    Logits (B, C, h, w) with C >= 2, or binary (B, h, w) / (B, 1, h, w), at any resolution; ``labels``
    (B, H, W) class indices (0/1 floats too) at theirs."""
    if clean_logits.shape != masked_logits.shape:
        raise ValueError(
            f"clean logits {tuple(clean_logits.shape)} and masked logits {tuple(masked_logits.shape)} differ"
        )
    size = _distil_size(distil_at, labels)
    return (
        supervised_term(clean_logits, labels, class_weights),
        distillation_term(masked_logits, clean_logits, class_weights, size),
    )


def dcl_loss(
    clean_logits: torch.Tensor, masked_logits: torch.Tensor, labels: torch.Tensor, clean_weight: float = 0.5,
    class_weights: Weights = OFFICIAL_CLASS_WEIGHTS, distil_at: str = "logits",
) -> torch.Tensor:  # fmt: skip
    """``clean_weight * clean term + (1 - clean_weight) * masked term`` (see :func:`dcl_terms`); no gradient
    reaches the clean logits through the masked term's target."""
    clean, masked = dcl_terms(clean_logits, masked_logits, labels, class_weights, distil_at)
    return clean_weight * clean + (1 - clean_weight) * masked


def supervised_term(logits: torch.Tensor, labels: torch.Tensor, class_weights: Weights = OFFICIAL_CLASS_WEIGHTS):
    """Weighted cross-entropy of the logits, upsampled to the labels' size, against the class indices."""
    logits = two_class_logits(logits)
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (B, H, W) class indices for logits {tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    _check_class_indices(labels, logits.shape[1])
    logits = resize_logits(logits, labels.shape[-2:])
    return F.cross_entropy(logits, labels.long(), weight=_weight_tensor(class_weights, logits))


def distillation_term(
    logits: torch.Tensor, target_logits: torch.Tensor, class_weights: Weights = OFFICIAL_CLASS_WEIGHTS,
    size: Sequence[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """The masked view against ``softmax(target_logits)``, detached here (no gradient ever reaches the clean
    logits through the target), at the logits' own resolution or, with ``size``, both upsampled to it."""
    logits, target_logits = two_class_logits(logits), two_class_logits(target_logits.detach())
    if logits.shape != target_logits.shape:
        raise ValueError(f"masked logits {tuple(logits.shape)} and their target {tuple(target_logits.shape)} differ")
    if size is not None:
        logits, target_logits = resize_logits(logits, size), resize_logits(target_logits, size)
    return F.cross_entropy(logits, target_logits.softmax(dim=1), weight=_weight_tensor(class_weights, logits))


def two_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) class logits as they are; binary z, (B, h, w) or (B, 1, h, w), as (B, 2, h, w) = (0, z),
    whose softmax is (1 - sigmoid(z), sigmoid(z))."""
    if logits.ndim == 4 and logits.shape[1] >= 2:
        return logits
    z = logits[:, 0] if logits.ndim == 4 and logits.shape[1] == 1 else logits
    if z.ndim != 3:
        raise ValueError(f"logits must be (B, C, h, w) with C >= 2, or binary (B, h, w) / (B, 1, h, w); got {tuple(logits.shape)}")
    return torch.stack([torch.zeros_like(z), z], dim=1)


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bilinear with ``align_corners=True`` as the official criterion, and only
    when the sizes differ."""
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _distil_size(distil_at: str, labels: torch.Tensor) -> tuple[int, int] | None:
    if distil_at not in DISTIL_AT:
        raise ValueError(f"distil_at must be one of {DISTIL_AT}, got {distil_at!r}")
    return tuple(labels.shape[-2:]) if distil_at == "labels" else None


def _weight_tensor(class_weights: Weights, logits: torch.Tensor) -> torch.Tensor | None:
    if class_weights is None:
        return None
    if len(class_weights) != logits.shape[1]:
        raise ValueError(f"{len(class_weights)} class weights for logits of {logits.shape[1]} classes")
    return torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)


def _check_class_indices(labels: torch.Tensor, classes: int) -> None:
    """torch would index out of range (a device assert on CUDA); a soft label would be truncated silently."""
    inside = (labels >= 0) & (labels < classes) & (labels == labels.floor())
    if not (inside | (labels == IGNORE_INDEX)).all():
        bad = labels[~(inside | (labels == IGNORE_INDEX))][0].item()
        raise ValueError(
            f"labels must be class indices in [0, {classes}) (or {IGNORE_INDEX} to ignore), found {bad}: "
            "binary masks as 0/1"
        )


def dcl_two_pass(
    model, inputs: Mapping, clean_weight: float = 0.5, backward_clean: Callable[[torch.Tensor], None] | None = None,
    *, class_weights: Weights = OFFICIAL_CLASS_WEIGHTS, distil_at: str = "logits",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Both DCL passes of ``model`` on a batch with masked views -> (loss, clean term, masked term).

    Pass 1 sees the clean inputs, pass 2 the same inputs with ``pixel_values`` and ``input_ids`` replaced
    by their masked views (the image one made here, on the batch's device, once pass 1 is done); the model
    never gets ``labels`` (it would compute a loss we do not use). With ``backward_clean``, the weighted
    clean term goes to it right after pass 1, so pass 1's activations are freed before pass 2 runs; the
    returned loss then carries gradient for the masked term only (its value still being the whole loss),
    ready for the caller's backward. ``MaskRIS.dcl_options()`` gives the keyword arguments of a MaskRIS."""
    missing = [key for key in ("labels", *MASKED_KEYS) if key not in inputs]
    if missing:
        raise KeyError(
            f"a DCL batch needs {missing} (got {sorted(inputs)}): collate training rows with "
            "RISCollator(..., maskris=MaskRIS())"
        )
    labels = inputs["labels"]
    size = _distil_size(distil_at, labels)
    clean_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in MASKED_KEYS}
    clean_logits = _logits(model(**clean_inputs))
    clean = supervised_term(clean_logits, labels, class_weights)
    target_logits = clean_logits.detach()
    del clean_logits
    if backward_clean is not None:
        backward_clean(clean_weight * clean)
        clean = clean.detach()
    masked_inputs = clean_inputs | {
        "pixel_values": apply_pixel_mask(inputs["pixel_values"], inputs["masked_pixels"]),
        "input_ids": inputs["input_ids_masked"],
    }
    masked = distillation_term(_logits(model(**masked_inputs)), target_logits, class_weights, size)
    return clean_weight * clean + (1 - clean_weight) * masked, clean.detach(), masked.detach()


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]
