"""Dataset card templates, installed as the ``nemo_hf_cards`` package so they are found after ``pip install .``."""
