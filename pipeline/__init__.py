"""sae-harvest: corpus -> model activations -> top-k SAE latents -> Parquet (docs/DESIGN.md).

Set before anything imports transformers or tqdm (`python -m pipeline` imports this package
first): tqdm reads TQDM_* once, when it is first imported, so a later setting would not hide
transformers' GGUF de-quantization bar. Ray workers get the same settings from `start_ray`.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")  # third-party progress bars; ours is one log line
