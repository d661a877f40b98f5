"""Corpus -> shards: reading files (`corpus.py`), tokenizing and packing contexts (`packing.py`),
and a per-file cache of packed contexts shared by sweep members and nightly runs (`token_cache.py`)."""
