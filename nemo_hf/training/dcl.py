"""MaskRIS's Distortion-aware Contextual Learning (DCL): the clean view learns from the labels, the masked
view from the clean view's own detached prediction.

:func:`dcl_loss` / :func:`dcl_terms` score two passes' logits; :func:`dcl_two_pass` runs both passes of one
model on a batch that `MaskRIS` (``nemo_hf.transforms.maskris``) masked; ``RISTrainer(..., maskris=...)``
uses it, and a hand-written loop can too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ..transforms.maskris import MASKED_KEYS, apply_pixel_mask


def dcl_terms(clean_logits: torch.Tensor, masked_logits: torch.Tensor, labels: torch.Tensor):
    """(clean term, masked term), both unweighted means.

    Binary logits (B, H, W) or (B, 1, H, W): BCE(clean, labels) and BCE(masked, sigmoid(clean).detach()).
    Class logits (B, C, H, W), C >= 2: cross-entropy with ``labels`` as class indices, and soft
    cross-entropy of the masked logits against softmax(clean).detach()."""
    if clean_logits.shape != masked_logits.shape:
        raise ValueError(
            f"clean logits {tuple(clean_logits.shape)} and masked logits {tuple(masked_logits.shape)} differ"
        )
    return supervised_term(clean_logits, labels), distillation_term(masked_logits, clean_logits)


def supervised_term(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE (binary logits) or cross-entropy (class logits) against the labels."""
    if _is_class(logits):
        if labels.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"class logits {tuple(logits.shape)} need labels (B, H, W) of class indices, got {tuple(labels.shape)}"
            )
        return F.cross_entropy(logits, labels.long())
    logits, labels = _binary(logits), _binary(labels)
    if logits.ndim != 3 or labels.shape != logits.shape:
        raise ValueError(
            f"binary logits must be (B, H, W) or (B, 1, H, W) with labels of the same size; got logits "
            f"{tuple(logits.shape)} and labels {tuple(labels.shape)} (resize the logits to the labels first)"
        )
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def distillation_term(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """The masked view against the clean view's prediction, which is detached here: no gradient ever
    reaches the clean logits through the target."""
    target_logits = target_logits.detach()
    if _is_class(logits):
        return -(target_logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()
    return F.binary_cross_entropy_with_logits(_binary(logits), _binary(target_logits).sigmoid())


def _is_class(logits: torch.Tensor) -> bool:
    return logits.ndim == 4 and logits.shape[1] >= 2


def _binary(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, 0] if tensor.ndim == 4 and tensor.shape[1] == 1 else tensor


def dcl_loss(clean_logits: torch.Tensor, masked_logits: torch.Tensor, labels: torch.Tensor, clean_weight: float = 0.5):
    """``clean_weight * clean term + (1 - clean_weight) * masked term`` (see :func:`dcl_terms`); no gradient
    reaches the clean logits through the masked term's target."""
    clean, masked = dcl_terms(clean_logits, masked_logits, labels)
    return clean_weight * clean + (1 - clean_weight) * masked


def dcl_two_pass(
    model, inputs: Mapping, clean_weight: float = 0.5, backward_clean: Callable[[torch.Tensor], None] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both DCL passes of ``model`` on a batch with masked views -> (loss, clean term, masked term).

    Pass 1 sees the clean inputs, pass 2 the same inputs with ``pixel_values`` and ``input_ids`` replaced
    by their masked views (the image one made here, on the batch's device, once pass 1 is done); the model
    never gets ``labels`` (it would compute a loss we do not use). With ``backward_clean``, the weighted
    clean term goes to it right after pass 1, so pass 1's activations are freed before pass 2 runs; the
    returned loss then carries gradient for the masked term only (its value still being the whole loss),
    ready for the caller's backward."""
    missing = [key for key in ("labels", *MASKED_KEYS) if key not in inputs]
    if missing:
        raise KeyError(
            f"a DCL batch needs {missing} (got {sorted(inputs)}): collate training rows with "
            "RISCollator(..., maskris=MaskRIS())"
        )
    clean_inputs = {k: v for k, v in inputs.items() if k != "labels" and k not in MASKED_KEYS}
    clean_logits = _logits(model(**clean_inputs))
    clean = supervised_term(clean_logits, inputs["labels"])
    target_logits = clean_logits.detach()
    del clean_logits
    if backward_clean is not None:
        backward_clean(clean_weight * clean)
        clean = clean.detach()
    masked_inputs = clean_inputs | {
        "pixel_values": apply_pixel_mask(inputs["pixel_values"], inputs["masked_pixels"]),
        "input_ids": inputs["input_ids_masked"],
    }
    masked = distillation_term(_logits(model(**masked_inputs)), target_logits)
    return clean_weight * clean + (1 - clean_weight) * masked, clean.detach(), masked.detach()


def _logits(outputs) -> torch.Tensor:
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]
