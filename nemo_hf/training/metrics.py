"""Scoring during ``Trainer.evaluate`` at each image's original resolution, in O(expressions) memory.

:class:`CountsAtOriginalSize` reduces a batch's logits to per-expression ``[intersection, union]`` at the
original size as they come; :class:`RISComputeMetrics` turns those counts into oIoU / mIoU / Prec@X (and
the difficulty breakdowns of `nemo-hf eval`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.metrics import DEFAULT_THRESHOLDS, RISMetrics


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
    (then it streams into one :class:`~nemo_hf.evaluation.metrics.RISMetrics` and reports on the last batch).
    With ``expressions`` (`nemo_hf.evaluation.scoring.Expressions` of the evaluated split) it adds the difficulty
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
        from ..evaluation.scoring import breakdown_scores

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
