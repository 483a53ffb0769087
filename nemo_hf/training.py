"""Train and evaluate text-conditioned mask models (CLIPSeg) on NeMo rows with ``transformers.Trainer``.

Three pieces:

- :class:`RISCollator` turns transform rows (``nemo_hf.mosaic`` output) into model inputs through a
  ``transformers`` processor, with ``labels`` = float masks (B, H, W) at the processed image size.
  Evaluation rows also carry what is needed to score at the ORIGINAL image resolution.
- :class:`RISTrainer` is a ``Trainer`` that keeps the raw columns a ``set_transform`` needs, reduces
  each evaluation batch's logits to per-expression intersection/union counts at original
  resolution as they come (memory stays O(expressions), never O(pixels)), and scores them with
  :class:`RISComputeMetrics`.
- :func:`tiny_random_clipseg`: an untrained, tiny CLIPSeg + processor for tests and demos.

Why the counting happens in ``prediction_step`` and not in ``preprocess_logits_for_metrics``: that hook
only sees ``(logits, labels)``, and whatever travels as ``labels`` is also gathered and kept for the
whole split by the evaluation loop. Ground truth at original resolution in ``labels`` would bring
back the gigabytes we avoid, and an index into a side table would tie the metric to one dataset
object. So the collator puts the evaluation targets under their own key (:data:`TARGETS_KEY`),
``prediction_step`` pops it before the model sees the batch, and returns per expression
``[intersection, union]`` as predictions and ``sent_id`` as label ids. Distributed evaluation
stays correct because the counts are computed per process before gathering.
"""

from __future__ import annotations

import math
import string
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from .maskris import dcl_two_pass
from .metrics import DEFAULT_THRESHOLDS, RISMetrics
from .refer import decode_rle

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
    With ``maskris`` (a :class:`~nemo_hf.maskris.MaskRIS`), training batches (never evaluation batches)
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
        self.processor = processor
        self.tokenizer = tokenizer if processor is None else processor.tokenizer
        self.image_processor = image_processor if processor is None else processor.image_processor
        self.max_length = max_length
        self.maskris = maskris

    def __repr__(self) -> str:
        parts = (
            f"processor={type(self.processor).__name__}"
            if self.processor is not None
            else f"tokenizer={type(self.tokenizer).__name__}, image_processor={type(self.image_processor).__name__}"
        )
        return f"RISCollator({parts}, max_length={self.max_length}, maskris={self.maskris!r})"

    def __call__(self, rows: list[dict]) -> dict:
        if not rows:
            raise ValueError("RISCollator got an empty batch")
        missing = {"image", "mask", "sentence"} - set(rows[0])
        if missing:
            raise KeyError(
                f"rows lack {sorted(missing)} (got {sorted(rows[0])}): the dataset needs a nemo_hf transform "
                "(NeMoMosaic / EvalTransform) set with set_transform, and the Trainer must keep raw columns "
                "(RISTrainer does)"
            )
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


class CountsAtOriginalSize:
    """Logits (B, h, w) at model resolution -> per-expression ``[intersection, union]`` (B, 2) at the
    original image resolution.

    Each original pixel centre is mapped into the content box of the logits and sampled bilinearly
    (point sampling, one interpolation, no intermediate resize, on the logits' device); samples are
    clamped to the content so letterbox padding never leaks into border pixels. For a squashed (full) content box and logits smaller than the original this is
    what ``EvalTransform.to_original`` gives. Foreground: sigmoid(logit) > ``threshold``.
    """

    def __init__(self, threshold: float = 0.5):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.threshold = threshold
        self.logit_threshold = math.log(threshold / (1.0 - threshold))

    def __repr__(self) -> str:
        return f"CountsAtOriginalSize(threshold={self.threshold})"

    def __call__(self, logits: torch.Tensor, targets: dict, on_mask=None) -> torch.Tensor:
        """``on_mask(i, pred)``, if given, receives each row's boolean prediction at original size."""
        if logits.ndim != 3:
            raise ValueError(f"expected logits (B, h, w), got shape {tuple(logits.shape)}")
        counts = torch.empty((len(logits), 2), dtype=torch.int64)
        for i, (row_logits, gt, box) in enumerate(zip(logits, targets["gt_masks"], targets["content_boxes"])):
            pred = self.resample(row_logits, box.tolist(), gt.shape) > self.logit_threshold
            if on_mask is not None:
                on_mask(i, pred)
            gt = gt.to(pred.device, torch.bool)
            counts[i, 0] = (pred & gt).sum()
            counts[i, 1] = (pred | gt).sum()
        return counts

    @staticmethod
    def resample(logits: torch.Tensor, box: list[float], size: tuple[int, int]) -> torch.Tensor:
        """Logits (h, w) -> (H, W) values at the original pixels that ``box`` (fractions x0, y0, x1, y1) holds."""
        h, w = logits.shape
        height, width = size
        x0, y0, x1, y1 = box
        xs = _pixel_centres(x0 * w, x1 * w, width, logits.device)
        ys = _pixel_centres(y0 * h, y1 * h, height, logits.device)
        # grid_sample with align_corners=False: -1 and 1 are the outer edges of the logits.
        grid = torch.stack(torch.meshgrid((xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1, indexing="xy"), dim=-1)
        sampled = F.grid_sample(logits[None, None].float(), grid[None], mode="bilinear", align_corners=False)
        return sampled[0, 0]


def _pixel_centres(start: float, stop: float, n: int, device) -> torch.Tensor:
    """Index-space coordinates (pixel k centred at k) of ``n`` original pixels spread over [start, stop),
    clamped to the centres of the first and last pixel inside the span."""
    centres = start + (torch.arange(n, dtype=torch.float32, device=device) + 0.5) * (stop - start) / n - 0.5
    low = start
    high = max(low, stop - 1.0)
    return centres.clamp(low, high)


class RISComputeMetrics:
    """``compute_metrics`` for :class:`RISTrainer`: predictions are ``[intersection, union]`` rows.

    Works on the whole split, or batch by batch with ``TrainingArguments(batch_eval_metrics=True)``
    (then it streams into one :class:`~nemo_hf.metrics.RISMetrics` and reports on the last batch).
    With ``expressions`` (`nemo_hf.evaluate.Expressions` of the evaluated split) it adds the difficulty
    breakdowns of `nemo-hf eval` as flat scalars ``"<breakdown>/<bucket>/{n,oIoU,mIoU}"``, computed from the
    same per-expression counts (the label ids are the sent_ids), so memory stays O(expressions).
    """

    def __init__(self, thresholds=DEFAULT_THRESHOLDS, strict: bool = False, empty_iou: float = 0.0, expressions=None):
        self.metrics = RISMetrics(thresholds=thresholds, strict=strict, empty_iou=empty_iou)
        self.expressions = expressions
        self._seen: list[tuple[np.ndarray, np.ndarray]] = []  # (sent_ids, counts) per batch, for the breakdowns

    def __repr__(self) -> str:
        m = self.metrics
        return f"RISComputeMetrics(thresholds={m.thresholds}, strict={m.strict}, empty_iou={m.empty_iou})"

    def __call__(self, eval_prediction, compute_result: bool | None = None) -> dict:
        counts = eval_prediction.predictions
        counts = counts.cpu().numpy() if isinstance(counts, torch.Tensor) else counts
        if not isinstance(counts, np.ndarray) or counts.ndim != 2 or counts.shape[1] != 2:
            raise ValueError(
                "predictions are not [intersection, union] rows: evaluate with RISTrainer on EvalTransform rows "
                "(they carry orig_size, content_box and the original mask)"
            )
        if compute_result is None:
            self.metrics.reset()
            self._seen = []
        self.metrics.add_counts(counts[:, 0], counts[:, 1])
        if self.expressions is not None:
            sent_ids = eval_prediction.label_ids
            sent_ids = sent_ids.cpu().numpy() if isinstance(sent_ids, torch.Tensor) else np.asarray(sent_ids)
            self._seen.append((sent_ids.reshape(-1), counts))
        if compute_result is False:
            return {}
        result = self.metrics.compute()
        if self.expressions is not None:
            result.update(self._breakdowns())
        self.metrics.reset()
        self._seen = []
        return result

    def _breakdowns(self) -> dict[str, float]:
        from .evaluate import breakdown_scores

        sent_ids = np.concatenate([ids for ids, _ in self._seen])
        counts = np.concatenate([c for _, c in self._seen])
        m = self.metrics
        options = {"thresholds": m.thresholds, "strict": m.strict, "empty_iou": m.empty_iou}
        positions = self.expressions.positions(sent_ids)
        flat = {}
        for key, rows in breakdown_scores(self.expressions, positions, counts[:, 0], counts[:, 1], **options).items():
            for row in rows:
                flat.update({f"{key}/{row['bucket']}/{name}": row[name] for name in ("n", "oIoU", "mIoU") if row[name] is not None})
        return flat


class RISTrainer(Trainer):
    """``Trainer`` for NeMo rows and CLIPSeg-like models (``labels`` (B, H, W) floats, logits (B, h, w)).

    - Sets ``remove_unused_columns=False`` (with a warning): the default drops the raw columns a
      ``set_transform`` dataset needs before the transform runs (transformers issue #22119).
    - Evaluation scores at original resolution: see the module docstring. Predictions are
      ``[intersection, union]`` per expression and label ids the ``sent_id``; ``compute_metrics``
      defaults to :class:`RISComputeMetrics`, ``data_collator`` to ``RISCollator(processing_class)``.
    - The model's loss is a per-batch mean (CLIPSeg's BCE ignores ``num_items_in_batch``), so it is
      divided by the gradient accumulation steps like any mean loss.
    - ``eval_expressions`` (`nemo_hf.evaluate.Expressions` of the eval split) adds the difficulty breakdowns
      to the metrics; ``predictions_path`` (``.jsonl`` / ``.parquet``) saves each ``evaluate()``'s
      predictions in `nemo_hf.predictions`' format, for `nemo-hf eval` (one file per process, the rank
      inserted before the suffix, when there are several).
    - ``maskris=MaskRIS(...)``: each training step runs MaskRIS's two passes and optimises the DCL loss
      (:func:`~nemo_hf.maskris.dcl_two_pass`); the default collator gets the same object, whose epoch
      is set at each epoch begin; logs add ``loss_clean`` and ``loss_masked`` (unweighted terms).
    """

    loss_is_scaled_for_ga = False

    def __init__(self, model=None, args=None, *, threshold: float = 0.5, eval_expressions=None,
                 predictions_path=None, maskris=None, **kwargs):  # fmt: skip
        if kwargs.get("data_collator") is None and kwargs.get("processing_class") is not None:
            kwargs["data_collator"] = RISCollator(kwargs["processing_class"], maskris=maskris)
        _check_maskris_collator(maskris, kwargs.get("data_collator"))
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = RISComputeMetrics(expressions=eval_expressions)
        elif eval_expressions is not None:
            raise ValueError("eval_expressions goes with the default compute_metrics; pass RISComputeMetrics(expressions=...)")
        if predictions_path is not None:
            from .predictions import predictions_format

            predictions_format(predictions_path)  # a bad suffix fails now, not after an evaluation
        self.predictions_path = predictions_path
        self._prediction_writer = None
        super().__init__(model=model, args=args, **kwargs)
        if self.args.remove_unused_columns:
            warnings.warn(
                "RISTrainer sets remove_unused_columns=False: NeMo transforms read raw columns "
                "(transformers issue #22119)",
                stacklevel=2,
            )
            self.args.remove_unused_columns = False
        if self.args.label_names is None:
            self.label_names = ["labels"]
        self.counts_at_original_size = CountsAtOriginalSize(threshold)
        # CLIPSeg's forward takes **kwargs, so the Trainer would pass it num_items_in_batch (which its
        # per-batch-mean BCE ignores) and then multiply the loss by the number of processes: gradients
        # N times too large under DDP. A mean loss must not take part in that.
        self.model_accepts_loss_kwargs = False
        self.maskris = maskris
        if maskris is not None:
            self._dcl_log = DCLLog(maskris)
            self.add_callback(self._dcl_log)
            if maskris.backward == "per_pass" and self.is_deepspeed_enabled:
                raise ValueError(
                    "MaskRIS(backward='per_pass') calls backward twice per step, which DeepSpeed's engine does "
                    "not allow; use MaskRIS(backward='combined')"
                )

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs = {k: v for k, v in inputs.items() if k != TARGETS_KEY}
        if self.maskris is not None and model.training:
            return self._dcl_loss(model, inputs, *args, **kwargs)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        if self.predictions_path is None:
            return super().evaluate(*args, **kwargs)
        from pathlib import Path

        from .predictions import PredictionWriter

        path = Path(self.predictions_path)
        if self.args.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{self.args.process_index}{path.suffix}")
        self._prediction_writer = PredictionWriter(path)
        try:
            metrics = super().evaluate(*args, **kwargs)
        except BaseException:
            self._prediction_writer.abort()
            raise
        else:
            self._prediction_writer.close()
        finally:
            self._prediction_writer = None
        return metrics

    def _dcl_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """MaskRIS's two passes. Like the model's own loss, each term is a per-batch mean, so the Trainer's
        division by the accumulation steps applies (``num_items_in_batch`` is not used); the clean
        term's early backward (``backward="per_pass"``) is divided the same way here."""
        backward = self._backward_clean_pass if self.maskris.backward == "per_pass" else None
        loss, clean, masked = dcl_two_pass(model, inputs, self.maskris.clean_weight, backward)
        self._dcl_log.add(clean, masked)
        return (loss, None) if return_outputs else loss

    def _backward_clean_pass(self, loss):
        self.accelerator.backward(loss / self.current_gradient_accumulation_steps)

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self.maskris is not None and "loss" in logs:
            logs = logs | self._dcl_log.pop(lambda t: nested_gather(t, self.args.parallel_mode))
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = dict(inputs)
        targets = inputs.pop(TARGETS_KEY, None)
        writer = self._prediction_writer
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only and writer is None, ignore_keys)
        if targets is None or (prediction_loss_only and writer is None):
            return loss, logits, labels
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        on_mask = None
        if writer is not None:
            sent_ids = targets["sent_ids"].tolist()

            def on_mask(i, pred):
                writer.add_mask(sent_ids[i], pred.cpu().numpy())

        counts = self.counts_at_original_size(logits.detach(), targets, on_mask).to(logits.device)
        if prediction_loss_only:
            return loss, None, None
        return loss, counts, targets["sent_ids"].to(logits.device)


def _check_maskris_collator(maskris, collator) -> None:
    """The Trainer's MaskRIS must be the collator's: the epoch reaches only the object it is given."""
    if not isinstance(collator, RISCollator) or collator.maskris is maskris:
        return
    if maskris is None:
        raise ValueError("the RISCollator masks batches (maskris=...) but RISTrainer has no maskris: pass the same one")
    raise ValueError(
        "RISTrainer(maskris=...) needs the same MaskRIS object in its RISCollator(..., maskris=...), "
        f"got {collator.maskris!r}"
    )


class DCLLog(TrainerCallback):
    """Sets the MaskRIS epoch at each epoch begin, and averages DCL's clean and masked terms between logs."""

    def __init__(self, maskris):
        self.maskris = maskris
        self.terms = []

    def __repr__(self) -> str:
        return f"DCLLog({self.maskris!r})"

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.maskris.set_epoch(math.floor((state.epoch or 0) + 1e-6))

    def add(self, clean: torch.Tensor, masked: torch.Tensor) -> None:
        self.terms.append(torch.stack([clean, masked]))

    def pop(self, gather) -> dict:
        if not self.terms:
            return {}
        mean = gather(torch.stack(self.terms).mean(dim=0)[None]).mean(dim=0).tolist()
        self.terms = []
        return {"loss_clean": mean[0], "loss_masked": mean[1]}


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
