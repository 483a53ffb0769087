"""Florence-2 on NeMo rows: collate, train with ``transformers.Trainer``, generate and score at original size.

``from nemo_hf import florence2`` gives this module: :func:`mask_to_target` / :func:`target_to_mask` (the
target text, `nemo_hf.training.florence2_targets`), :class:`Florence2Collator` (rows -> model inputs and
``labels``), :class:`Florence2Trainer`, :func:`evaluate_florence2` (generate, parse, map to each image's
original size, write the predictions file `nemo-hf eval` reads, report oIoU / mIoU / Prec@X) and
:func:`tiny_random_florence2`.

MaskRIS: image masking applies to ``pixel_values`` as for any model; text masking touches only the
expression's tokens (never the task prompt "Locate ... in the image with mask", never a special token).
DCL's masked pass learns from the clean pass's per-pixel prediction; a generative target has no such
prediction to distil, only the next-token distributions under teacher forcing, whose quality early in
fine-tuning is that of a model that cannot yet segment. nemo_hf trains the masked view on the same target
text instead (``clean_weight`` * clean loss + (1 - ``clean_weight``) * masked loss, both the model's own
token cross-entropy): the masked pass stays a second forward and backward per step, as in MaskRIS.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather

from ..masks import is_int
from ..transforms.maskris import mask_text_tokens, patch_pixels, random_patch_mask
from .collator import check_rows
from .florence2_targets import (
    MAX_TARGET_TOKENS,
    TASK,
    Florence2TargetWarning,
    check_florence2_processor,
    mask_to_target,
    polygons_to_mask,
    target_to_mask,
    target_to_polygons,
)
from .trainer import DCLLog

__all__ = [
    "TASK", "MAX_TARGET_TOKENS", "Florence2Collator", "Florence2Trainer", "Florence2TargetWarning",
    "evaluate_florence2", "mask_to_target", "target_to_mask", "polygons_to_original", "prediction_at_original",
    "tiny_random_florence2",
]  # fmt: skip

IGNORE_INDEX = -100


class Florence2Collator:
    """Rows of `NeMoMosaic` / `EvalTransform` (image, mask, sentence, sent_id) -> Florence-2 inputs.

    ``input_ids`` / ``attention_mask`` / ``pixel_values`` come from the processor (its 768 px image, its
    prompt "Locate {sentence} in the image with mask" from the task token); ``labels`` are the token ids of
    ``mask_to_target(row["mask"])`` with ``<s>`` and ``</s>``, padding -100. The mask is read at the row
    image's own size, so the locations are fractions of the square the model sees.
    With ``maskris`` (a :class:`~nemo_hf.transforms.maskris.MaskRIS`), training batches also carry
    ``masked_pixels`` (bool (B, H, W)) and ``input_ids_masked`` (only the expression's tokens masked).
    """

    def __init__(self, processor, maskris=None, max_target_tokens: int = MAX_TARGET_TOKENS):
        check_florence2_processor(processor)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.maskris = maskris
        if not (is_int(max_target_tokens) and 9 <= max_target_tokens <= MAX_TARGET_TOKENS):
            raise ValueError(
                f"max_target_tokens must be a whole number from 9 (one triangle with <s> and </s>) to "
                f"{MAX_TARGET_TOKENS} (Florence-2's decoder positions), got {max_target_tokens!r}"
            )
        self.max_target_tokens = int(max_target_tokens)
        prefix, _, suffix = processor.task_prompts_with_input[TASK].partition("{input}")
        self.prompt_parts = (prefix, suffix)

    def __repr__(self) -> str:
        return (
            f"Florence2Collator(processor={type(self.processor).__name__}, maskris={self.maskris!r}, "
            f"max_target_tokens={self.max_target_tokens})"
        )

    def model_inputs(self, rows: Sequence[dict]) -> dict:
        """``input_ids``, ``attention_mask``, ``pixel_values`` of the rows (what ``generate`` takes)."""
        check_rows(rows, "Florence2Collator")
        texts = [TASK + str(row["sentence"]) for row in rows]
        images = [row["image"] for row in rows]
        return dict(self.processor(text=texts, images=images, padding="longest", return_tensors="pt"))

    def labels(self, rows: Sequence[dict]) -> torch.Tensor:
        """(B, T) target token ids, padding -100."""
        targets = [mask_to_target(row["mask"], self.max_target_tokens) for row in rows]
        encoded = self.tokenizer(targets, padding="longest", return_tensors="pt")
        return encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.model_inputs(rows)
        batch["labels"] = self.labels(rows)
        is_eval = ["content_box" in row for row in rows]
        if self.maskris is not None and not any(is_eval):
            keys = [row.get("sent_id") for row in rows]
            batch = self.mask(batch, rows, None if None in keys else keys)
        return batch

    def expression_positions(self, input_ids: torch.Tensor, rows: Sequence[dict]) -> torch.Tensor:
        """Bool (B, T): the tokens of each row's sentence inside the prompt, found by character offsets."""
        out = torch.zeros(input_ids.shape, dtype=torch.bool)
        prefix, suffix = self.prompt_parts
        for i, row in enumerate(rows):
            sentence = str(row["sentence"]).strip()  # as the processor strips it
            encoded = self.tokenizer(prefix + sentence + suffix, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"]
            start = int((input_ids[i] == self.tokenizer.bos_token_id).nonzero()[0]) + 1
            if input_ids[i, start : start + len(ids)].tolist() != ids:
                raise ValueError(
                    f"sent_id {row.get('sent_id')}: the processor's prompt tokens differ from 'Locate {{input}} in the "
                    "image with mask' tokenized alone; cannot tell the expression's tokens from the prompt's"
                )
            low, high = len(prefix), len(prefix) + len(sentence)
            for j, (a, b) in enumerate(encoded["offset_mapping"]):
                out[i, start + j] = low <= a < b <= high
        return out

    def mask(self, batch: dict, rows: Sequence[dict], keys: Sequence[int] | None) -> dict:
        """MaskRIS's draws on a collated batch: image patches over ``pixel_values``, text tokens of the expression."""
        maskris = self.maskris
        generator = maskris.generator(keys)
        batch_size, _, height, width = batch["pixel_values"].shape
        patches = random_patch_mask(batch_size, (height, width), maskris.patch_size, maskris.image_ratio, generator)
        batch["masked_pixels"] = patch_pixels(patches, maskris.patch_size, (height, width))
        batch["input_ids_masked"] = mask_text_tokens(
            batch["input_ids"], self.expression_positions(batch["input_ids"], rows).long(), self.tokenizer,
            maskris.text_ratio, maskris.mask_fraction, maskris.random_fraction, generator,
        )  # fmt: skip
        return batch


class Florence2Trainer(Trainer):
    """``Trainer`` for Florence-2 on NeMo rows: keeps the raw columns a ``set_transform`` needs, collates with
    :class:`Florence2Collator` (``processing_class`` and ``maskris`` given to it by default) and, with a
    ``MaskRIS``, trains each step on the clean and the masked view against the same target (module
    docstring); logs add ``loss_clean`` and ``loss_masked``. Evaluate with :func:`evaluate_florence2`
    (generation), not ``Trainer.evaluate`` (teacher-forced loss only)."""

    def __init__(self, model=None, args=None, *, maskris=None, **kwargs):
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = Florence2Collator(kwargs["processing_class"], maskris=maskris)
        collator = kwargs.get("data_collator")
        if isinstance(collator, Florence2Collator) and collator.maskris is not maskris:
            raise ValueError("Florence2Trainer(maskris=...) needs the same MaskRIS object as its Florence2Collator")
        super().__init__(model=model, args=args, **kwargs)
        self.args.remove_unused_columns = False  # NeMo transforms read raw columns
        self.model_accepts_loss_kwargs = False  # per-batch mean losses, divided by accumulation steps
        self.maskris = maskris
        if maskris is not None:
            self._terms = DCLLog(maskris)
            self.add_callback(self._terms)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        masked_pixels, masked_ids = inputs.get("masked_pixels"), inputs.get("input_ids_masked")
        inputs = {k: v for k, v in inputs.items() if k not in ("masked_pixels", "input_ids_masked")}
        if self.maskris is None or not model.training or masked_pixels is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        weight = self.maskris.clean_weight
        clean = model(**inputs).loss
        if self.maskris.backward == "per_pass":  # the clean pass's activations go before the masked pass runs
            self.accelerator.backward(weight * clean / self.current_gradient_accumulation_steps)
            clean = clean.detach()
        pixels = inputs["pixel_values"].masked_fill(masked_pixels.to(inputs["pixel_values"].device)[:, None], 0)
        masked = model(**(inputs | {"pixel_values": pixels, "input_ids": masked_ids})).loss
        self._terms.add(clean.detach(), masked.detach())
        loss = weight * clean + (1 - weight) * masked
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.maskris is not None and "loss" in logs:
            logs = logs | self._terms.pop(lambda t: nested_gather(t, self.args.parallel_mode))
        super().log(logs, *args, **kwargs)


def polygons_to_original(polygons, orig_size: Sequence[int], content_box: Sequence[float]) -> list[list[float]]:
    """Flat polygons over an `EvalTransform` square -> the original image's pixels: the affine map of
    `EvalTransform.to_original` (the content box onto the whole original image)."""
    x0, y0, x1, y1 = (float(v) for v in content_box)
    height, width = (int(v) for v in orig_size)
    sx, sy = width / (x1 - x0), height / (y1 - y0)
    out = []
    for polygon in polygons:
        xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
        out.append(np.column_stack([(xy[:, 0] - x0) * sx, (xy[:, 1] - y0) * sy]).ravel().tolist())
    return out


def prediction_at_original(text: str, row: dict, processor, problems: Counter | None = None) -> np.ndarray:
    """Generated text for an `EvalTransform` row -> uint8 mask at the image's original size: parsed over the
    row's square, mapped with :func:`polygons_to_original`, rasterized there (not resized as a raster).
    Text that does not parse is an empty mask, warned or counted (``problems``) as in :func:`target_to_mask`."""
    image = row["image"]
    side = image.size[::-1] if isinstance(image, Image.Image) else np.asarray(image).shape[:2]
    polygons = target_to_polygons(text, side, processor, problems)
    return polygons_to_mask(polygons_to_original(polygons, row["orig_size"], row["content_box"]), row["orig_size"])


def evaluate_florence2(
    model, processor, rows, predictions_path, *, expressions=None, batch_size: int = 8,
    max_new_tokens: int = MAX_TARGET_TOKENS, num_beams: int = 1, collator: Florence2Collator | None = None,
) -> dict:  # fmt: skip
    """Generate for every `EvalTransform` row of ``rows`` (a Dataset with the transform set), parse, map each
    mask to its image's original size, write ``predictions_path`` (``.jsonl`` / ``.parquet``, what
    `nemo-hf eval` reads) and score it: ``{"metrics", "unparsed", "predictions"}``, plus ``"breakdowns"`` (and the
    metrics computed by `nemo-hf eval`'s own code) with ``expressions`` (`nemo_hf.evaluation.scoring.Expressions`
    of the split). Text that does not parse scores as an empty prediction and is counted under ``unparsed``."""
    from ..evaluation.metrics import RISMetrics
    from ..evaluation.predictions import PredictionWriter
    from ..masks import decode_rle

    collator = collator or Florence2Collator(processor)
    metrics, problems = RISMetrics(), Counter()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with PredictionWriter(predictions_path) as writer, torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = [dict(zip(chunk, values)) for values in zip(*chunk.values())]
                missing = {"orig_size", "content_box", "orig_mask", "sent_id"} - set(batch[0])
                if missing:
                    raise KeyError(f"rows lack {sorted(missing)}: evaluate on rows rendered by nemo_hf.EvalTransform")
                inputs = {k: v.to(device) for k, v in collator.model_inputs(batch).items()}
                generated = model.generate(
                    **inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False
                )
                for row, text in zip(batch, processor.batch_decode(generated, skip_special_tokens=False)):
                    pred = prediction_at_original(text, row, processor, problems)
                    writer.add_mask(row["sent_id"], pred)
                    metrics.add(pred.astype(bool), decode_rle(row["orig_mask"]).astype(bool))
    finally:
        model.train(was_training)
    if problems:
        warnings.warn(
            f"{sum(problems.values())} of {len(rows)} generated texts did not parse and score as empty predictions: "
            + "; ".join(f"{n} {why}" for why, n in problems.most_common()),
            Florence2TargetWarning,
            stacklevel=2,
        )
    report = {"predictions": str(predictions_path), "metrics": metrics.compute(), "unparsed": dict(problems)}
    if expressions is not None:
        from ..evaluation.scoring import evaluate_predictions

        scored = evaluate_predictions(expressions, predictions_path)
        report |= {"metrics": scored["metrics"], "breakdowns": scored["breakdowns"], "convention": scored["convention"]}
    return report


def tiny_random_florence2(processor, seed: int = 0):
    """An untrained Florence-2 with the real architecture and vocabulary, shrunk to ~2M parameters (mostly the
    51,290-token embedding), for tests and demos that must run offline on a CPU. Its DaViT has two stages
    instead of four, with the same total stride of 32 (768 px -> 24 x 24 + 1 = 577 image tokens, as the
    processor expects). No dropout, so a step is deterministic."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration

    check_florence2_processor(processor)
    tokenizer = processor.tokenizer
    config = Florence2Config(
        vision_config=dict(  # two stages, strides 16 and 2: 768 px -> 48 x 48 -> 24 x 24 tokens
            depths=(1, 1), patch_size=(17, 3), patch_stride=(16, 2), patch_padding=(8, 1), patch_prenorm=(False, True),
            embed_dim=(16, 32), num_heads=(1, 2), num_groups=(1, 2), window_size=6, projection_dim=32,
            drop_path_rate=0.0,
        ),
        text_config=dict(
            vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=MAX_TARGET_TOKENS,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.eos_token_id,
            forced_eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    torch.manual_seed(seed)
    return Florence2ForConditionalGeneration(config)
