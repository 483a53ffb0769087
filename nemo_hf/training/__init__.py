"""Training on NeMo rows: a collator for any model, `transformers.Trainer` integration, MaskRIS's DCL.

Modules: `collator` (`RISCollator`: rows -> model inputs, a plain ``collate_fn``; no ``Trainer``
needed), `trainer` (`RISTrainer`), `metrics` (scoring at original size during ``evaluate``), `dcl`
(MaskRIS's two-pass loss), `clipseg` (a tiny random CLIPSeg for tests and demos), `florence2` (Florence-2:
collator, trainer, generation and scoring; ``from nemo_hf import florence2``) and `florence2_targets` (a mask
<-> Florence-2's polygon text).
"""

from ..lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".collator": ["RISCollator", "TARGETS_KEY", "ORIGINAL_MASK_KEY", "resize_mask", "eval_targets"],
        ".trainer": ["RISTrainer", "DCLLog"],
        ".metrics": ["CountsAtOriginalSize", "RISComputeMetrics"],
        ".dcl": ["dcl_loss", "dcl_terms", "dcl_two_pass", "supervised_term", "distillation_term"],
        ".clipseg": ["tiny_random_clipseg"],
        ".florence2": ["Florence2Collator", "Florence2Trainer", "evaluate_florence2", "tiny_random_florence2"],
        ".florence2_targets": ["mask_to_target", "target_to_mask"],
    },
)
