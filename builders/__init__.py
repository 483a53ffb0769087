"""`datasets` builders of nemo_hf, installed as the ``nemo_hf_builders`` package."""
