"""Stage 3, the merged checkpoint: streaming key-level merge / add / remove / extract (`surgery.py`), inspection,
verification and the baselines' writers, all without transformers or training code; `load.py` builds the model."""
