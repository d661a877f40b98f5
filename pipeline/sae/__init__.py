"""Top-k SAEs: one in-memory type (`sae.py`), the format readers and `load_sae` (`formats.py`),
latent-split SAEs over Ray actors (`latent_split.py`), and the demo SAE trainer (`train.py`, `demo.py`).

`pipeline.sae.load_sae(path) -> SAE` is public surface (docs/DESIGN.md, "Public Python surface").
"""
from pipeline.sae.formats import load_sae
from pipeline.sae.sae import SAE, random_sae

__all__ = ["SAE", "load_sae", "random_sae"]
