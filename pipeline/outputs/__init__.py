"""A run's files: the layout (`layout.py`, every key and schema), the sink with its commit protocol
(`sink.py`), and what reads committed output: post-processing, the delphi export, the latent
browser and the demo display."""
