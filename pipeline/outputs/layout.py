"""The output layout: every key, schema and Parquet option of a run folder, in one place.

    {sink}/{run_id}/
      manifest.json                                   MANIFEST_KEY
      summary.json, _runs/<UTC stamp>.json            SUMMARY_KEY, run_history_key()
      _plan/ledger-NNNNNN.json                        ledger_snapshot_key()  compacted ledger (runtime/ledger.py)
      _plan/file=NNNNNN.json                          plan_key()      records changed since the snapshot (older runs)
      _plan/log=NNNNNN.json                           ledger_log_key() batches of records changed since the snapshot
      _tokens/<file key>.parquet, .json               tokens_key(), tokens_meta_key()  staged contexts
                                                      (TOKENS_SCHEMA; one row group per local shard)
      _commits/shard=NNNNNN.json                      commit_key()    written last per shard
      _quarantine/shard=NNNNNN.json                   quarantine_key() a shard that kills its worker
                                                      (cluster.on_poison_shard=quarantine): why, which
                                                      documents; removed once a retry commits it
      contexts/shard=NNNNNN/part-0.parquet            contexts_key()  CONTEXTS_SCHEMA
      latents/hookpoint=H/shard=NNNNNN/part-0.parquet latents_key()   latents_schema(k), LATENTS_PARQUET
      latents/crosscoder=NAME/shard=NNNNNN/...        crosscoder_latents_key()  the same schema
      latent_stats/hookpoint=H/part-0.parquet         stats_key()     STATS_SCHEMA
      by_latent/hookpoint=H/bucket=B/part-0.parquet   by_latent_key() BY_LATENT_SCHEMA
      examples/hookpoint=H/bucket=B/part-0.parquet    examples_key()  EXAMPLES_SCHEMA (by reference; windows.py)
      logit_effects/hookpoint=H/bucket=B/part-0.parquet  logit_effects_key()  LOGIT_EFFECTS_SCHEMA
      _post/...                                       post-processing's own markers and spill files

Writers and readers import keys from here only, so the README's "Output layout" block and
docs/DESIGN.md describe this file.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:  # tensors come in; this module itself never needs torch
    import torch

MANIFEST_KEY = "manifest.json"
SUMMARY_KEY = "summary.json"
COMMITS_DIR = "_commits"
QUARANTINE_DIR = "_quarantine"
PLAN_DIR = "_plan"

# -- harvest: contexts and latents ---------------------------------------------------------------
CONTEXTS_SCHEMA = pa.schema(
    [
        ("seq_id", pa.int64()),
        ("doc_id", pa.string()),
        ("doc_offset", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
    ]
)


# `output.acts_dtype`: fp16 by default (2 bytes a pair); float32 for SAEs whose activations
# exceed fp16's range. In fp16 a value beyond FP16_MAX is stored as +-FP16_MAX (never inf) and
# counted: the commit marker, the run summary and the manifest report it (`acts_overflow`).
ACTS_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
FP16_MAX = 65504.0


def latents_schema(k: int, acts_dtype: str = "float16") -> pa.Schema:
    if acts_dtype not in ACTS_DTYPES:
        raise ValueError(f"output.acts_dtype={acts_dtype!r} is not one of {sorted(ACTS_DTYPES)}")
    return pa.schema(
        [
            ("seq_id", pa.int64()),
            ("pos", pa.int32()),
            ("latent_ids", pa.list_(pa.int32(), k)),
            ("acts", pa.list_(ACTS_DTYPES[acts_dtype], k)),
        ]
    )


def acts_overflow(values: torch.Tensor, acts_dtype: str = "float16") -> int:
    """How many activations are beyond what `acts_dtype` stores (0 for float32)."""
    if acts_dtype != "float16":
        return 0
    return int((values.abs() > FP16_MAX).sum())


# Dictionary encoding (plain where a dictionary outgrows its page) under zstd. Not
# byte-stream-split for the fp16 acts: DuckDB reads that only for FLOAT/DOUBLE/INT32/INT64
# ("BYTE_STREAM_SPLIT encoding is only supported for ..."). It cost ~10% in size: 2.96 -> 3.25
# bytes per pair on bench/storage.py's synthetic latents (L=65536, k=32); target <= 5.
LATENTS_PARQUET = {"use_dictionary": True, "row_group_size": 1 << 17}


def latents_table(seq_ids: np.ndarray, positions: np.ndarray, values: torch.Tensor, ids: torch.Tensor,
                  acts_dtype: str = "float16") -> pa.Table:
    """One row per token: its k latent ids and activations (fixed-size lists; fp16 saturates at +-FP16_MAX)."""
    k = ids.shape[1]
    ids_flat = pa.array(ids.cpu().numpy().reshape(-1), type=pa.int32())
    if acts_dtype == "float16":
        acts = values.float().clamp(-FP16_MAX, FP16_MAX).half()  # never inf; counted by acts_overflow
    else:
        acts = values.float()
    acts_flat = pa.array(acts.cpu().numpy().reshape(-1), type=ACTS_DTYPES[acts_dtype])
    return pa.Table.from_arrays(
        [
            pa.array(seq_ids, type=pa.int64()),
            pa.array(positions, type=pa.int32()),
            pa.FixedSizeListArray.from_arrays(ids_flat, k),
            pa.FixedSizeListArray.from_arrays(acts_flat, k),
        ],
        schema=latents_schema(k, acts_dtype),
    )


def shard_name(shard_id: int) -> str:
    return f"shard={shard_id:06d}"


def contexts_key(shard_id: int) -> str:
    return f"contexts/{shard_name(shard_id)}/part-0.parquet"


# -- dictionaries: SAEs, transcoders, crosscoders (issue 17) ---------------------------------------
# Every per-dictionary key below takes a *dictionary id*: an SAE's or a transcoder's is the hookpoint
# it reads (`layers.6`, folder `hookpoint=layers.6`); a crosscoder's is `crosscoder=NAME` (folder
# `crosscoder=NAME`), since it reads several hookpoints. The manifest lists the ids ("dictionaries").
CROSSCODER_PREFIX = "crosscoder="


def crosscoder_id(name: str) -> str:
    return f"{CROSSCODER_PREFIX}{name}"


def is_crosscoder_id(dict_id: str) -> bool:
    return dict_id.startswith(CROSSCODER_PREFIX)


def partition(dict_id: str) -> str:
    """The folder level of a dictionary's outputs: `hookpoint=H` or `crosscoder=NAME`."""
    return dict_id if is_crosscoder_id(dict_id) else f"hookpoint={dict_id}"


def dictionary_ids(manifest: dict) -> list[str]:
    """Every dictionary of a run: the hookpoints' (SAEs, transcoders) in config order, then the
    crosscoders' by name (manifest.json is written with sorted keys; runs before issue 17 have
    no "dictionaries")."""
    return list(manifest["hookpoints"]) + sorted(d for d in manifest.get("dictionaries") or {} if is_crosscoder_id(d))


def latents_key(hookpoint: str, shard_id: int) -> str:
    """`hookpoint`: a dictionary id (a hookpoint, or `crosscoder=NAME`)."""
    return f"latents/{partition(hookpoint)}/{shard_name(shard_id)}/part-0.parquet"


def crosscoder_latents_key(name: str, shard_id: int) -> str:
    return latents_key(crosscoder_id(name), shard_id)


def commit_key(shard_id: int) -> str:
    return f"{COMMITS_DIR}/{shard_name(shard_id)}.json"


def quarantine_key(shard_id: int) -> str:
    return f"{QUARANTINE_DIR}/{shard_name(shard_id)}.json"


def plan_key(ordinal: int) -> str:
    return f"{PLAN_DIR}/file={ordinal:06d}.json"


LEDGER_LOG_PREFIX = "log="


def ledger_log_key(seq: int) -> str:
    """One durable write of a batch of ledger records (runtime/ledger.py)."""
    return f"{PLAN_DIR}/{LEDGER_LOG_PREFIX}{seq:06d}.json"


# -- token staging: what the tokenize tasks hand the harvest workers (runtime/staging.py) --------
# One Parquet file per corpus file (one row group per local shard of `shard_size` contexts) and a
# meta JSON written after it. Keyed by the file's token-cache key (fingerprint, reading settings,
# tokenizer, ctx_len, shard_size), so a resumed run reuses it; deleted when a run ends cleanly.
TOKENS_DIR = "_tokens"
TOKENS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("doc_offset", pa.int32()),
        ("token_ids", pa.list_(pa.int32())),
    ]
)


def tokens_key(file_key: str) -> str:
    return f"{TOKENS_DIR}/{file_key}.parquet"


def tokens_meta_key(file_key: str) -> str:
    return f"{TOKENS_DIR}/{file_key}.json"


LEDGER_SNAPSHOT_PREFIX = "ledger-"


def ledger_snapshot_key(seq: int) -> str:
    return f"{PLAN_DIR}/{LEDGER_SNAPSHOT_PREFIX}{seq:06d}.json"


def run_history_key(stamp: str) -> str:
    return f"_runs/{stamp}.json"


# -- post-processing --------------------------------------------------------------------------------
def by_latent_schema(acts_dtype: str = "float16") -> pa.Schema:
    """by_latent keeps the run's `output.acts_dtype`: a float32 run's acts beyond 65504 stay exact."""
    return pa.schema([("latent_id", pa.int32()), ("seq_id", pa.int64()), ("pos", pa.int32()),
                      ("act", ACTS_DTYPES[acts_dtype])])


BY_LATENT_SCHEMA = by_latent_schema("float16")


def run_acts_dtype(manifest: dict) -> str:
    """The run's `output.acts_dtype` from its manifest (runs written before the setting: float16)."""
    return ((manifest.get("config") or {}).get("output") or {}).get("acts_dtype", "float16")
# Examples are stored by reference (issue 23): which activations were chosen, nothing cut from the
# contexts. `act` is the chosen activation (0 for kind=random). The window rule is recorded once, in
# the part's schema metadata (EXAMPLES_WINDOW_KEYS; pipeline/outputs/windows.py cuts the windows).
# Parts written before issue 23 have `token_ids` list<int32> and `acts` list<float32> instead of
# `act`: windows.read_windows detects and returns them as stored.
EXAMPLES_SCHEMA = pa.schema(
    [
        ("latent_id", pa.int32()),
        ("kind", pa.string()),
        ("rank", pa.int32()),
        ("seq_id", pa.int64()),
        ("pos", pa.int32()),
        ("act", pa.float32()),
    ]
)
EXAMPLES_WINDOW_KEYS = (b"window", b"window_before", b"window_after", b"window_rule")
STATS_SCHEMA = pa.schema(
    [
        ("latent_id", pa.int32()),
        ("n_active", pa.int64()),
        ("density", pa.float64()),
        ("max_act", pa.float32()),
        ("mean_act", pa.float32()),
        ("sum_act", pa.float64()),
        ("sum_sq_act", pa.float64()),
        ("quantiles", pa.list_(pa.float32())),
        ("histogram", pa.list_(pa.int64())),
        ("is_dead", pa.bool_()),
    ]
)


# Crosscoders' latent_stats add one list column: per latent, the share of its decoder norm in each
# input block, ||W_dec[l, block_i]|| / sum_j ||W_dec[l, block_j]||, in the order of the schema
# metadata's DEC_NORM_INPUTS (a JSON list of the crosscoder's inputs). Users sort by it to find
# latents that are born or die across checkpoints (or live in one layer).
DEC_NORM_FRAC = "dec_norm_frac"
DEC_NORM_INPUTS = b"dec_norm_inputs"


def stats_schema(n_inputs: int = 0) -> pa.Schema:
    """STATS_SCHEMA, plus `dec_norm_frac` list<float32> for a crosscoder over `n_inputs` inputs."""
    return STATS_SCHEMA.append(pa.field(DEC_NORM_FRAC, pa.list_(pa.float32()))) if n_inputs else STATS_SCHEMA


def spill_dir(hook: str) -> str:
    return f"_post/spill/{partition(hook)}"


def spill_key(hook: str, bucket: int, shard: int) -> str:
    return f"{spill_dir(hook)}/bucket={bucket:06d}/shard={shard:06d}.parquet"


def scatter_dir(hook: str) -> str:
    return f"_post/scatter/{partition(hook)}"


def scatter_marker_key(hook: str, shard: int) -> str:
    return f"{scatter_dir(hook)}/shard={shard:06d}.json"


def bucket_marker_key(hook: str, bucket: int) -> str:
    return f"_post/{partition(hook)}/bucket={bucket:06d}.json"


def bucket_stats_key(hook: str, bucket: int) -> str:
    return f"_post/stats/{partition(hook)}/bucket={bucket:06d}.parquet"


def stats_state_key(hook: str) -> str:
    """What latent_stats was last built from (tokens, shards, settings): unchanged means no rewrite."""
    return f"_post/{partition(hook)}/stats.json"


def by_latent_key(hook: str, bucket: int) -> str:
    return f"by_latent/{partition(hook)}/bucket={bucket:06d}/part-0.parquet"


def examples_key(hook: str, bucket: int) -> str:
    return f"examples/{partition(hook)}/bucket={bucket:06d}/part-0.parquet"


def stats_dir(hook: str) -> str:
    return f"latent_stats/{partition(hook)}"


def stats_key(hook: str) -> str:
    return f"{stats_dir(hook)}/part-0.parquet"


# -- logit effects (pipeline/outputs/logit_effects.py) ---------------------------------------------
# Per latent with a page: the vocabulary tokens its decoder direction promotes / suppresses most
# through the final norm's gain and the unembedding (ids and logit values, best first).
LOGIT_EFFECTS_SCHEMA = pa.schema(
    [
        ("latent_id", pa.int32()),
        ("top_ids", pa.list_(pa.int32())),
        ("top_logits", pa.list_(pa.float32())),
        ("bottom_ids", pa.list_(pa.int32())),
        ("bottom_logits", pa.list_(pa.float32())),
    ]
)


def logit_effects_key(hook: str, bucket: int) -> str:
    return f"logit_effects/{partition(hook)}/bucket={bucket:06d}/part-0.parquet"


def logit_effects_state_key(hook: str) -> str:
    """Which latents / SAE / model the logit effects were computed for, or why they were skipped."""
    return f"_post/{partition(hook)}/logit_effects.json"
