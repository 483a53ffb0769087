import numpy as np
import pytest

from nemo_hf.evaluation.metrics import RISMetrics, intersection_union, ris_metrics


def masks(shape, *cells):
    """A bool mask with the given (row, col) cells set."""
    m = np.zeros(shape, bool)
    for r, c in cells:
        m[r, c] = True
    return m


def known_expressions():
    """Four expressions whose counts are worked out by hand in the comments."""
    # A: pred = top-left 2x2 (4 px), gt = top row (4 px): I = 2, U = 6, IoU = 1/3.
    a = (masks((4, 4), (0, 0), (0, 1), (1, 0), (1, 1)), masks((4, 4), (0, 0), (0, 1), (0, 2), (0, 3)))
    # B: identical 3 px masks: I = 3, U = 3, IoU = 1.
    b_mask = masks((3, 5), (0, 0), (1, 2), (2, 4))
    b = (b_mask, b_mask.copy())
    # C: empty prediction, 2 px ground truth: I = 0, U = 2, IoU = 0.
    c = (np.zeros((2, 2), np.uint8), masks((2, 2), (0, 0), (1, 1)).astype(np.uint8))
    # D: pred = 10 px row, gt = its first 7 px: I = 7, U = 10, IoU = 0.7 exactly.
    d_pred = np.zeros((1, 12), np.uint8)
    d_pred[0, :10] = 1
    d_gt = np.zeros((1, 12), np.uint8)
    d_gt[0, :7] = 1
    return [a, b, c, (d_pred, d_gt)]


def test_intersection_union_by_hand():
    assert [intersection_union(p, g) for p, g in known_expressions()] == [(2, 6), (3, 3), (0, 2), (7, 10)]


def test_metrics_match_hand_computation_inclusive():
    metrics = RISMetrics()
    for pred, gt in known_expressions():
        metrics.add(pred, gt)
    result = metrics.compute()
    assert result["oIoU"] == pytest.approx(12 / 21)  # (2+3+0+7) / (6+3+2+10)
    assert result["mIoU"] == pytest.approx((1 / 3 + 1 + 0 + 0.7) / 4)
    assert result["Prec@0.5"] == 0.5  # B, D
    assert result["Prec@0.7"] == 0.5  # B, D (0.7 >= 0.7)
    assert result["Prec@0.9"] == 0.25  # B
    assert result["n_expressions"] == 4


def test_strict_convention_excludes_iou_equal_to_threshold():
    metrics = RISMetrics(strict=True)
    for pred, gt in known_expressions():
        metrics.add(pred, gt)
    result = metrics.compute()
    assert result["Prec@0.5"] == 0.5  # B, D
    assert result["Prec@0.7"] == 0.25  # only B: D's 0.7 is not > 0.7
    assert result["Prec@0.9"] == 0.25
    assert result["oIoU"] == pytest.approx(12 / 21)  # the convention only touches Prec@X


def test_empty_prediction_and_ground_truth_default_counts_as_zero():
    metrics = RISMetrics()
    for pred, gt in known_expressions():
        metrics.add(pred, gt)
    metrics.add(np.zeros((3, 3)), np.zeros((3, 3)))
    result = metrics.compute()
    assert result["oIoU"] == pytest.approx(12 / 21)  # adds 0 / 0 to the sums
    assert result["mIoU"] == pytest.approx((1 / 3 + 1 + 0 + 0.7 + 0) / 5)
    assert result["Prec@0.9"] == pytest.approx(1 / 5)


def test_empty_iou_option_counts_empty_match_as_perfect():
    metrics = RISMetrics(empty_iou=1.0)
    for pred, gt in known_expressions():
        metrics.add(pred, gt)
    metrics.add(np.zeros((3, 3)), np.zeros((3, 3)))
    result = metrics.compute()
    assert result["oIoU"] == pytest.approx(12 / 21)
    assert result["mIoU"] == pytest.approx((1 / 3 + 1 + 0 + 0.7 + 1) / 5)
    assert result["Prec@0.9"] == pytest.approx(2 / 5)


def test_all_empty_split_gives_empty_iou():
    assert ris_metrics([0, 0], [0, 0])["oIoU"] == 0.0
    assert ris_metrics([0, 0], [0, 0], empty_iou=1.0)["oIoU"] == 1.0


def test_streaming_equals_batch():
    rng = np.random.default_rng(0)
    pairs = [(rng.random((9, 7)) < p, rng.random((9, 7)) < 0.4) for p in rng.uniform(0, 0.8, size=60)]
    counts = np.array([intersection_union(p, g) for p, g in pairs])
    batch = ris_metrics(counts[:, 0], counts[:, 1], thresholds=(0.1, 0.2, 0.3))
    streamed = RISMetrics(thresholds=(0.1, 0.2, 0.3))
    for pred, gt in pairs[:25]:
        streamed.add(pred, gt)
    for chunk in np.array_split(counts[25:], 4):
        streamed.add_counts(chunk[:, 0], chunk[:, 1])
    assert streamed.compute() == pytest.approx(batch)
    assert 0 < batch["Prec@0.3"] < batch["Prec@0.1"] < 1  # the thresholds split this sample


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="intersection <= union"):
        RISMetrics().add_counts([3], [2])
    with pytest.raises(ValueError, match="no expression"):
        RISMetrics().compute()
    with pytest.raises(ValueError, match="thresholds"):
        RISMetrics(thresholds=(1.5,))
