"""Train and evaluate text-conditioned mask models (CLIPSeg) on NeMo rows with ``transformers.Trainer``.

:class:`RISTrainer` is a ``Trainer`` that keeps the raw columns a ``set_transform`` needs, reduces
each evaluation batch's logits to per-expression intersection/union counts at original
resolution as they come (memory stays O(expressions), never O(pixels); `nemo_hf.training.metrics`), and
runs MaskRIS's two passes when given a ``MaskRIS`` (`nemo_hf.training.dcl`). Batches come from
:class:`~nemo_hf.training.collator.RISCollator`.

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
import warnings

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import nested_gather

from .collator import TARGETS_KEY, RISCollator
from .dcl import dcl_two_pass
from .metrics import CountsAtOriginalSize, RISComputeMetrics


class RISTrainer(Trainer):
    """``Trainer`` for NeMo rows and CLIPSeg-like models (``labels`` (B, H, W) floats, logits (B, h, w)).

    - Sets ``remove_unused_columns=False`` (with a warning): the default drops the raw columns a
      ``set_transform`` dataset needs before the transform runs (transformers issue #22119).
    - Evaluation scores at original resolution: see the module docstring. Predictions are
      ``[intersection, union]`` per expression and label ids the ``sent_id``; ``compute_metrics``
      defaults to :class:`RISComputeMetrics`, ``data_collator`` to ``RISCollator(processing_class)``.
    - The model's loss is a per-batch mean (CLIPSeg's BCE ignores ``num_items_in_batch``), so it is
      divided by the gradient accumulation steps like any mean loss.
    - ``eval_expressions`` (`nemo_hf.evaluation.scoring.Expressions` of the eval split) adds the difficulty breakdowns
      to the metrics; ``predictions_path`` (``.jsonl`` / ``.parquet``) saves each ``evaluate()``'s
      predictions in `nemo_hf.evaluation.predictions`' format, for `nemo-hf eval` (one file per process, the rank
      inserted before the suffix, when there are several).
    - ``maskris=MaskRIS(...)``: each training step runs MaskRIS's two passes and optimises the DCL loss
      (:func:`~nemo_hf.training.dcl.dcl_two_pass`, the official criterion by default); the default collator gets the same object, whose epoch
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
            from ..evaluation.predictions import predictions_format

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

        from ..evaluation.predictions import PredictionWriter

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
        loss, clean, masked = dcl_two_pass(model, inputs, backward_clean=backward, **self.maskris.dcl_options())
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


