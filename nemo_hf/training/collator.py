"""Transform rows -> model inputs for any text-conditioned mask model: a plain ``DataLoader`` ``collate_fn``.

:class:`RISCollator` takes `NeMoMosaic` / `EvalTransform` rows through a ``transformers`` processor
(CLIPSeg's) or a tokenizer and an image processor (models with their own loop: LAVT, CRIS, CARIS), with
``labels`` = float masks (B, H, W) at the processed image size. Evaluation rows also carry, under
:data:`TARGETS_KEY`, what scoring at the ORIGINAL image resolution needs (see `nemo_hf.training.trainer`
for why under their own key and not in ``labels``). Needs torch, not ``transformers.Trainer``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..masks import decode_rle

TARGETS_KEY = "ris_targets"
ORIGINAL_MASK_KEY = "orig_mask"  # COCO RLE {"size": [h, w], "counts": str} of the ground truth at original size


class RISCollator:
    """Transform rows -> model inputs + ``labels`` (+ evaluation targets, or MaskRIS views).

    Text and images go through one ``processor`` (CLIPSeg's), or through a separate ``tokenizer`` and
    ``image_processor`` (any ``AutoTokenizer`` / ``AutoImageProcessor``: models with their own training
    loop, such as LAVT, CRIS or CARIS); either way it is a plain ``DataLoader`` ``collate_fn``.
    ``labels``: each row's uint8 mask resized to the processed image size with the same bilinear
    filter image processors use (antialiased when shrinking), then thresholded at 0.5, as float32
    (B, H, W), so label pixels line up with ``pixel_values`` and CLIPSeg's BCE loss takes them as is.
    Rows with ``orig_size`` and ``content_box`` (evaluation rows) add :data:`TARGETS_KEY`: the ground
    truth at original size (decoded from ``orig_mask``), the content box as fractions of the image
    and the ``sent_id``s. The mapping assumes the processor resizes the square transform image
    onto the whole of ``pixel_values`` (resize, no crop of a non-square image): CLIPSeg's does.
    With ``maskris`` (a :class:`~nemo_hf.transforms.maskris.MaskRIS`), training batches (never evaluation batches)
    also carry ``masked_pixels`` (bool (B, H, W)) and ``input_ids_masked``, drawn from the rows' ``sent_id``s.
    """

    def __init__(
        self, processor=None, max_length: int | None = None, *, tokenizer=None, image_processor=None, maskris=None
    ):
        if (processor is None) == (tokenizer is None or image_processor is None):
            raise ValueError(
                "RISCollator takes a processor, or a tokenizer and an image_processor (AutoTokenizer / "
                "AutoImageProcessor), not both"
            )
        if processor is not None and not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
            raise ValueError(
                f"processor {type(processor).__name__} has no tokenizer and image_processor (is it a tokenizer?): "
                "pass tokenizer= and image_processor= instead"
            )
        self.processor = processor
        self.tokenizer = tokenizer if processor is None else processor.tokenizer
        self.image_processor = image_processor if processor is None else processor.image_processor
        self.max_length = check_max_length(max_length, self.tokenizer)
        if maskris is not None and not callable(maskris):
            raise ValueError(f"maskris must be a nemo_hf MaskRIS (or None), got {type(maskris).__name__}")
        self.maskris = maskris

    def __repr__(self) -> str:
        parts = (
            f"processor={type(self.processor).__name__}"
            if self.processor is not None
            else f"tokenizer={type(self.tokenizer).__name__}, image_processor={type(self.image_processor).__name__}"
        )
        return f"RISCollator({parts}, max_length={self.max_length}, maskris={self.maskris!r})"

    def __call__(self, rows: list[dict]) -> dict:
        check_rows(rows, "RISCollator")
        texts, images = [row["sentence"] for row in rows], [row["image"] for row in rows]
        text_kwargs = dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.processor is not None:
            batch = dict(self.processor(text=texts, images=images, **text_kwargs))
        else:
            batch = dict(self.tokenizer(texts, **text_kwargs)) | dict(self.image_processor(images, return_tensors="pt"))
        height, width = batch["pixel_values"].shape[-2:]
        batch["labels"] = torch.from_numpy(np.stack([resize_mask(row["mask"], (height, width)) for row in rows]))
        is_eval = ["content_box" in row for row in rows]
        if all(is_eval):
            batch[TARGETS_KEY] = eval_targets(rows)
        elif any(is_eval):
            raise ValueError("a batch mixes evaluation rows (with content_box) and training rows")
        elif self.maskris is not None:
            keys = [row.get("sent_id") for row in rows]
            batch = self.maskris(batch, self.tokenizer, None if None in keys else keys)
        return batch


def check_rows(rows, collator: str) -> None:
    """A collator's batch: not empty, its rows rendered by a nemo_hf transform (image, mask, sentence)."""
    if not rows:
        raise ValueError(f"{collator} got an empty batch")
    missing = {"image", "mask", "sentence"} - set(rows[0])
    if missing:
        raise KeyError(
            f"rows lack {sorted(missing)} (got {sorted(rows[0])}): the dataset needs a nemo_hf transform "
            "(NeMoMosaic / EvalTransform) set with set_transform, and the Trainer must keep raw columns "
            "(RISTrainer and Florence2Trainer do)"
        )


def check_max_length(max_length, tokenizer) -> int | None:
    """None (the tokenizer's own limit) or a token count from 1 to the tokenizer's ``model_max_length``: a text
    model has no position embedding beyond it, so a longer sequence would fail only at the first forward."""
    if max_length is None:
        return None
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be None or a positive number of tokens, got {max_length!r}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < 10**6 and max_length > limit:  # transformers' "no limit" is ~1e30
        raise ValueError(f"max_length {max_length} exceeds the tokenizer's model_max_length {limit}")
    return max_length


def resize_mask(mask, size: tuple[int, int]) -> np.ndarray:
    """uint8 0/1 mask -> float32 0/1 mask of ``size`` (h, w): bilinear, then >= 0.5."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-d (h, w), got shape {mask.shape}")
    height, width = size
    image = Image.fromarray((mask > 0).astype(np.uint8) * 255)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return (resized >= 128).astype(np.float32)


def eval_targets(rows: list[dict]) -> dict:
    """What scoring at original resolution needs, per row: decoded ground truth, content box, sent_id."""
    gt_masks, boxes = [], []
    for row in rows:
        if ORIGINAL_MASK_KEY not in row:
            raise KeyError(
                f"evaluation row sent_id={row.get('sent_id')} has no {ORIGINAL_MASK_KEY!r} (the ground truth "
                "at original size); render evaluation rows with nemo_hf.EvalTransform"
            )
        height, width = (int(v) for v in row["orig_size"])
        gt = decode_rle(row[ORIGINAL_MASK_KEY]).astype(bool)
        if gt.shape != (height, width):
            raise ValueError(
                f"sent_id={row.get('sent_id')}: ground truth is {gt.shape[0]}x{gt.shape[1]} but orig_size is "
                f"{height}x{width}"
            )
        out_h, out_w = _image_hw(row["image"])
        x0, y0, x1, y1 = (float(v) for v in row["content_box"])
        if not (0 <= x0 < x1 <= out_w and 0 <= y0 < y1 <= out_h):
            raise ValueError(
                f"sent_id={row.get('sent_id')}: content_box {row['content_box']} is not inside the "
                f"{out_w}x{out_h} image"
            )
        gt_masks.append(torch.from_numpy(gt))
        boxes.append([x0 / out_w, y0 / out_h, x1 / out_w, y1 / out_h])
    return {
        "gt_masks": gt_masks,
        "content_boxes": torch.tensor(boxes, dtype=torch.float32),
        "sent_ids": torch.tensor([int(row.get("sent_id", -1)) for row in rows], dtype=torch.int64),
    }


def _image_hw(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(np.asarray(image).shape[:2])
