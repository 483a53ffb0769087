"""Referring-segmentation metrics: oIoU (= cIoU), mIoU and Prec@X, streamed.

Per expression i, with P_i the predicted and G_i the ground-truth mask:
``I_i = |P_i ∩ G_i|``, ``U_i = |P_i ∪ G_i|``, ``IoU_i = I_i / U_i``.

- ``oIoU = Σ I_i / Σ U_i`` (overall or cumulative IoU; large objects weigh more),
- ``mIoU = mean IoU_i``,
- ``Prec@X`` = share of expressions with ``IoU_i >= X`` (LAVT, CARIS) or ``IoU_i > X``
  (CRIS, TAS: ``strict=True``).

Empty prediction and empty ground truth (``U_i = 0``): ``IoU_i = empty_iou``, 0.0 by default as in
the LAVT and CRIS evaluation code (``0 if U == 0`` / ``I / (U + eps)``); the expression adds 0 to
both sums of oIoU (and oIoU itself is ``empty_iou`` when every union is 0). RefCOCO ground truth is never empty, so this only matters for crafted inputs.

All values are fractions in [0, 1] (papers print percentages). The resolution the masks are compared
at is the caller's choice and must be stated with every number (CRIS/TAS: original image size).
"""

from __future__ import annotations

import numpy as np

DEFAULT_THRESHOLDS = (0.5, 0.7, 0.9)


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """``(|P ∩ G|, |P ∪ G|)`` of two same-shaped masks (any dtype: nonzero is foreground)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    pred = pred.astype(bool, copy=False)
    gt = gt.astype(bool, copy=False)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


class RISMetrics:
    """Streaming accumulator: memory stays constant however many expressions are added.

    ``add(pred, gt)`` per expression, or ``add_counts(intersections, unions)`` per batch of
    expressions; ``compute()`` gives ``{"oIoU", "mIoU", "Prec@X"..., "n_expressions"}``.
    """

    def __init__(self, thresholds=DEFAULT_THRESHOLDS, strict: bool = False, empty_iou: float = 0.0):
        self.thresholds = tuple(float(t) for t in thresholds)
        if not all(0.0 <= t <= 1.0 for t in self.thresholds):
            raise ValueError(f"thresholds must lie in [0, 1], got {self.thresholds}")
        self.strict = strict
        self.empty_iou = float(empty_iou)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"RISMetrics(thresholds={self.thresholds}, strict={self.strict}, "
            f"empty_iou={self.empty_iou}, n_expressions={self.n_expressions})"
        )

    def __len__(self) -> int:
        return self.n_expressions

    def reset(self) -> None:
        self.n_expressions = 0
        self.intersection_sum = 0
        self.union_sum = 0
        self.iou_sum = 0.0
        self.hits = np.zeros(len(self.thresholds), dtype=np.int64)

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """One expression's predicted and ground-truth masks."""
        self.add_counts(*intersection_union(pred, gt))

    def add_counts(self, intersections, unions) -> None:
        """Counts of one or many expressions (scalars or 1-d arrays of equal length)."""
        inter = np.atleast_1d(np.asarray(intersections, dtype=np.int64))
        union = np.atleast_1d(np.asarray(unions, dtype=np.int64))
        if inter.shape != union.shape or inter.ndim != 1:
            raise ValueError(f"intersections {inter.shape} and unions {union.shape} must be equal 1-d shapes")
        if (inter < 0).any() or (inter > union).any():
            raise ValueError("counts need 0 <= intersection <= union for every expression")
        iou = self.ious(inter, union)
        self.n_expressions += len(inter)
        self.intersection_sum += int(inter.sum())
        self.union_sum += int(union.sum())
        self.iou_sum += float(iou.sum())
        thresholds = np.asarray(self.thresholds)[:, None]
        passed = iou[None, :] > thresholds if self.strict else iou[None, :] >= thresholds
        self.hits += passed.sum(axis=1)

    def ious(self, intersections: np.ndarray, unions: np.ndarray) -> np.ndarray:
        """Per-expression IoU with the empty convention applied."""
        inter = np.asarray(intersections, dtype=np.float64)
        union = np.asarray(unions, dtype=np.float64)
        return np.divide(inter, union, out=np.full(inter.shape, self.empty_iou), where=union > 0)

    def compute(self) -> dict[str, float]:
        if self.n_expressions == 0:
            raise ValueError("no expression was added: nothing to compute")
        result = {
            "oIoU": self.intersection_sum / self.union_sum if self.union_sum else self.empty_iou,
            "mIoU": self.iou_sum / self.n_expressions,
        }
        for threshold, hits in zip(self.thresholds, self.hits):
            result[f"Prec@{threshold:g}"] = int(hits) / self.n_expressions
        result["n_expressions"] = self.n_expressions
        return result


def ris_metrics(intersections, unions, thresholds=DEFAULT_THRESHOLDS, strict: bool = False, empty_iou: float = 0.0):
    """All metrics at once from per-expression counts (the batch form of :class:`RISMetrics`)."""
    metrics = RISMetrics(thresholds=thresholds, strict=strict, empty_iou=empty_iou)
    metrics.add_counts(intersections, unions)
    return metrics.compute()
