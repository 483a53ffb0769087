"""nemo_hf: NeMo hard-negative mosaics for referring image segmentation on the Hugging Face stack.

Importing nemo_hf makes ``datasets.load_dataset("nemo_refcoco", config, source=ROOT)`` available.
Heavy parts (torch, transformers, FAISS) are imported only when used.
"""

__version__ = "0.1.0"

from .registry import register as _register

_register()

_LAZY = {
    "build_folder": ".folder",
    "NeMoMosaic": ".mosaic",
    "EvalTransform": ".mosaic",
    "MosaicEpochCallback": ".mosaic",
    "explode_sentences": ".mosaic",
    "render_preview": ".preview",
    "show_ref": ".show",
    "decode_mask": ".refer",
    "RISMetrics": ".metrics",
    "PredictionWriter": ".predictions",
    "MaskRIS": ".maskris",
    "push_folder": ".hub",
    "make_refer_source": ".synthetic",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'nemo_hf' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
