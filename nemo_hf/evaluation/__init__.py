"""Scoring referring segmentation: metrics, the predictions file, scores and their breakdowns, the report.

Modules: `metrics` (oIoU / mIoU / Prec@X), `predictions` (the predictions file: sent_id + RLE at original
size), `scoring` (`Expressions` of a split, scoring in RLE space, difficulty breakdowns), `report` (the
printed table and the bar charts of `nemo-hf eval`).
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".metrics": ["RISMetrics", "ris_metrics", "intersection_union"],
        ".predictions": ["PredictionWriter", "PredictionsFormatError", "read_predictions", "write_predictions"],
        ".scoring": ["EvaluationError", "Expressions", "score_predictions", "breakdown_scores", "evaluate_predictions", "split_tables"],
        ".report": ["format_report", "plot_breakdowns"],
    },
)
