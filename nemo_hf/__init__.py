"""nemo_hf: NeMo hard-negative mosaics for referring image segmentation on the Hugging Face stack."""

__version__ = "0.1.0"
