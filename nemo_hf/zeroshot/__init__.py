"""TAS zero-shot referring segmentation on any CLIP-like checkpoint, and the NeMo difficulty meter.

Modules: `scoring` (TAS's score and spatial rectifier on embeddings), `crops` (TAS's proposal crops),
`proposals` (COCO instances as an oracle, SAM automatic masks, TAS's filter), `phrases` (negative
phrases), `gate` (TAS's spaCy parse: which rectifier branch a sentence takes), `captioner`, `encode`
(batched CLIP features and the per-image cache), `predict` (the per-image / per-expression predictor),
`run` (``nemo-hf zeroshot``), `difficulty` (``nemo-hf difficulty``).
"""

from .scoring import spatial_rectify, tas_scores

__all__ = ["spatial_rectify", "tas_scores"]
