"""nemo_hf: NeMo hard-negative mosaics for referring image segmentation on the Hugging Face stack.

The package is laid out by pillar: `source` (the refer toolkit's files), `folder` (the hub-ready folder:
build, card, push), `mining` (embeddings, the negative rule, ranks), `transforms` (geometry, mosaic,
MaskRIS masking), `training`, `evaluation`, `inspection` (stats, show, preview) and `zeroshot`; `masks`
is the one module for COCO RLE. DESIGN.md has the table.

Importing nemo_hf makes ``datasets.load_dataset("nemo_refcoco", config, source=ROOT)`` available.
Heavy parts (torch, transformers, FAISS) are imported only when used.
"""

__version__ = "0.1.0"

from .lazy import lazy_exports
from .registry import register as _register

_register()

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        ".folder.build": ["build_folder"],
        ".transforms.mosaic": ["NeMoMosaic", "EvalTransform", "MosaicEpochCallback", "explode_sentences"],
        ".inspection.preview": ["render_preview"],
        ".inspection.show": ["show_ref"],
        ".masks": ["decode_mask"],
        ".evaluation.metrics": ["RISMetrics"],
        ".evaluation.predictions": ["PredictionWriter"],
        ".transforms.maskris": ["MaskRIS"],
        ".folder.push": ["push_folder"],
        ".source.synthetic": ["make_refer_source"],
    },
    submodules={"florence2": ".training.florence2"},
)
__all__ = ["__version__", *__all__]
