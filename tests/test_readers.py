"""Every reader the README names (pyarrow, pandas, polars, DuckDB) reads every column of every
output table of a real tiny run plus post-processing, with values equal to pyarrow's."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_pipeline_e2e import HOOKS, make_cfg

pytestmark = pytest.mark.slow


def plain(v):
    """One Python value per cell, whatever container or scalar type the reader returns."""
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)) or type(v).__name__ == "Series":
        return [plain(x) for x in list(v)]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return v


def rows(columns: dict) -> list[dict]:
    names = list(columns)
    return [{n: plain(columns[n][i]) for n in names} for i in range(len(columns[names[0]]))] if names else []


@pytest.fixture(scope="module")
def tables(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path_factory, ray_local):
    from pipeline.config import PostprocessConfig
    from pipeline.outputs.postprocess import postprocess
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.driver import run

    out = tmp_path_factory.mktemp("readers")
    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, out, run_id="readers")
    run(cfg)
    postprocess(RunStore(cfg.sink, cfg.run_id),
                PostprocessConfig(run_id="readers", bucket_size=32, top_n=3, n_quantiles=2, per_quantile=2,
                                  n_random=2, window=8))
    root = out / "readers"
    folders = {"contexts": root / "contexts"}
    for kind in ("latents", "latent_stats", "by_latent", "examples"):
        for hook in HOOKS:
            folders[f"{kind}/{hook}"] = root / kind / f"hookpoint={hook}"
    files = {name: sorted(f.rglob("*.parquet")) for name, f in folders.items()}
    assert all(files.values()), {k: len(v) for k, v in files.items()}
    return files


@pytest.mark.parametrize("reader", ["pandas", "polars", "duckdb"])
def test_every_reader_reads_every_column_of_every_table(tables, reader):
    import duckdb
    import pandas as pd
    import polars as pl

    for name, files in tables.items():
        for path in files:
            want = pq.read_table(path)
            assert want.num_rows > 0 or name.startswith("examples"), path
            expected = rows({c: want.column(c).to_pylist() for c in want.column_names})
            if reader == "pandas":
                df = pd.read_parquet(path)
                got = rows({c: list(df[c]) for c in df.columns})
            elif reader == "polars":
                df = pl.read_parquet(path)
                got = rows({c: df[c].to_list() for c in df.columns})
            else:
                rel = duckdb.sql(f"select * from read_parquet('{path}', hive_partitioning = false)")
                data = rel.fetchall()
                got = rows({c: [r[i] for r in data] for i, c in enumerate(rel.columns)})
            assert list(got[0]) == want.column_names if got else True, (reader, path)
            assert got == expected, (reader, name, path)
