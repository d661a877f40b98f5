"""The language model: offline loading (`loader.py`), hookpoint names (`hookpoints.py`), and the
forward that stops after the deepest requested hookpoint (`harvest.py`)."""
