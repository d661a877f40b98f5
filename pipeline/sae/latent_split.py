"""A top-k SAE split by latent range across Ray actors, for SAEs too big for one device.

16M latents x d=4096 in bf16 is 137 GB per matrix, so `W_enc`, `b_enc` and `W_dec` are cut
into contiguous latent ranges, one `LatentPartActor` per range, all in one placement group
(one bundle per part; PACK by default, STRICT_PACK to force a single node).

Encode (same result as `SAE.encode`, bit for bit):
  driver: x_n = normalize(x) - b_pre          (the SAE's own `normalize`, on CPU)
  actors: local top-k of x_n @ W_enc[range].T + b_enc[range], ids offset to global ids
  driver: `sae_harvest_kernels.merge.merge_topk` (exact tie rule), then ReLU and latent_scale[ids]
Each pre-activation is computed by the same kernel from the same row of weights as in the
unsplit SAE, so the merged top-k equals the unsplit one exactly, ties included.

Decode gathers on the driver: each actor returns the `W_dec` rows of the distinct ids that
fall in its range, and the driver runs `sae_harvest_kernels.sparse_decode` on those rows. That is bitwise
equal to `SAE.decode` (same rows, same summation order) and moves O(distinct ids x d) rows;
summing per-actor partial decodes would move n_parts x N x d floats and only match to
rounding. Decode is for reconstruction checks, not the harvest hot path.

`LatentPartActor` is a plain class (usable and testable without Ray); `LatentSplitSAE` wraps it with
`ray.remote(...).options(...)` inside its placement group.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import sae_harvest_kernels
import torch
from sae_harvest_kernels.merge import merge_topk

from pipeline.remote import sha256_of_files
from pipeline.sae.sae import OWN_FORMAT, SAE
from pipeline.sae.weights import kernel_matrix, safetensors_header, vector

if TYPE_CHECKING:  # annotations are strings (__future__), so 3.10 never imports this
    from typing import Self

PG_STRATEGIES = ("PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD")


def split_ranges(n_latents: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges covering [0, n_latents); sizes differ by at most one."""
    if not 1 <= n_parts <= n_latents:
        raise ValueError(f"n_parts={n_parts} must be between 1 and n_latents={n_latents}")
    base, extra = divmod(n_latents, n_parts)
    ranges, start = [], 0
    for i in range(n_parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


def load_slices(path: str | os.PathLike, start: int, stop: int, with_decoder: bool = True,
                dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Rows [start, stop) of W_enc, W_dec and b_enc from the project's own format.

    Rows of a row-major matrix are one byte range of the file (`TensorRef.rows`), read by the
    unsplit loader's `kernel_matrix`/`vector`: only those rows are read, in `dtype` (the
    unsplit SAE's `sae.dtype`; None keeps the file's), with the same casts, block by block, so
    a part's weights are bit for bit the unsplit SAE's rows. `with_decoder=False` skips W_dec.
    """
    refs = safetensors_header(Path(path) / "sae.safetensors")
    out = {"W_enc": kernel_matrix(refs["W_enc"].rows(start, stop), dtype, device)}
    if with_decoder:
        out["W_dec"] = kernel_matrix(refs["W_dec"].rows(start, stop), dtype, device)
    if "b_enc" in refs:
        out["b_enc"] = vector(refs["b_enc"].rows(start, stop), dtype, device)
    return out


class LatentPartActor:
    """Holds latents [start, stop) of one SAE and answers local top-k / decoder-row queries.

    Built from in-memory slices (`tensors`) or from a checkpoint `path` (loads its slice only).
    Inputs to `encode_part` are already normalized and b_pre-subtracted; outputs are on CPU.
    """

    def __init__(
        self,
        start: int,
        stop: int,
        tensors: dict[str, torch.Tensor] | None = None,
        path: str | None = None,
        device: str = "cpu",
        backend: str = "auto",
        torch_threads: int = 1,
        with_decoder: bool = True,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        from pipeline.sae.formats import resolve_dtype

        if (tensors is None) == (path is None):
            raise ValueError("give exactly one of tensors or path")
        torch.set_num_threads(max(1, torch_threads))
        # `sae.dtype` as the unsplit SAE resolves it on this part's device ("auto": bf16 on CUDA).
        dtype = resolve_dtype(dtype, device)
        if path is not None:
            tensors = load_slices(path, start, stop, with_decoder, dtype, device)
        if tensors["W_enc"].shape[0] != stop - start:
            raise ValueError(f"W_enc slice has {tensors['W_enc'].shape[0]} rows for range [{start}, {stop})")
        self.start, self.stop, self.device, self.backend = start, stop, torch.device(device), backend
        self.W_enc = kernel_matrix(tensors["W_enc"], dtype, self.device)
        # Without the decoder a meta tensor keeps the shape (info, checks) and holds no memory.
        w_dec = tensors.get("W_dec") if with_decoder else None
        self.W_dec = kernel_matrix(w_dec, dtype, self.device) if w_dec is not None else torch.empty(self.W_enc.shape, device="meta")
        self.b_enc = vector(tensors.get("b_enc"), dtype, self.device)

    def info(self) -> dict:
        return {"start": self.start, "stop": self.stop, "W_enc": tuple(self.W_enc.shape),
                "W_dec": tuple(self.W_dec.shape), "device": str(self.device), "dtype": str(self.W_enc.dtype)}

    def encode_part(self, x: torch.Tensor, k: int, bounds: list[int] | None = None,
                    crash_once: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Local top-k (values fp32 [N, k'], global ids int32 [N, k']), k' = min(k, range size).

        `bounds` (row offsets 0 = b_0 < ... < b_m = N) encodes rows [b_i, b_i+1) one call at a
        time: the harvest sends a whole shard at once but keeps the matmul shapes of its
        forward batches, so results equal the unsplit run's bit for bit.
        `crash_once`: fault injection for the exactly-once tests (the process dies while
        encoding, once: only while the marker file does not exist; "" = every time).
        """
        if crash_once is not None and not (crash_once and os.path.exists(crash_once)):
            if crash_once:
                open(crash_once, "w").close()
            os._exit(17)
        # A range narrower than k contributes all its latents; the merge still finds the global k.
        local_k = min(k, self.stop - self.start)
        bounds = [0, x.shape[0]] if bounds is None else bounds
        out = [sae_harvest_kernels.topk_encode(x[a:b].to(self.device), self.W_enc, self.b_enc, local_k, backend=self.backend)
               for a, b in zip(bounds[:-1], bounds[1:])]
        values = torch.cat([v for v, _ in out]) if out else torch.empty(0, local_k)
        ids = torch.cat([i for _, i in out]) if out else torch.empty(0, local_k, dtype=torch.int32)
        return values.cpu(), (ids + self.start).cpu()

    def decoder_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W_dec rows for global ids inside this range: [len(ids), d], on CPU."""
        if self.W_dec.is_meta:
            raise ValueError("this part was loaded without its decoder (with_decoder=False)")
        local = ids.long().to(self.device) - self.start
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= self.stop - self.start):
            raise ValueError(f"ids outside this part's range [{self.start}, {self.stop})")
        return self.W_dec[local].cpu()


def _driver_sae(sae: SAE) -> SAE:
    """The SAE as the driver keeps it: everything but the big matrices.

    W_enc/W_dec become meta tensors (shape only, no memory), so `d_in`, `n_latents`, the
    validation and `normalize` all come from `SAE` itself instead of being re-implemented.
    """
    meta = torch.empty(sae.n_latents, sae.d_in, device="meta")
    small = {name: None if getattr(sae, name) is None else getattr(sae, name).detach().cpu()
             for name in ("b_dec", "b_pre", "latent_scale")}
    return dataclasses.replace(sae, W_enc=meta, W_dec=meta, b_enc=None, **small)


class LatentSplitSAE:
    """Same interface as `SAE` (d_in, n_latents, k, encode, decode) over actors that each hold a latent range.

    `LatentSplitSAE(sae, n_parts)` slices an in-memory SAE; `LatentSplitSAE.from_path(path, n_parts)`
    lets every actor read only its own slice. The placement group is created here and removed
    by `close()` (or on leaving a `with` block). Needs `ray.init()` first.
    """

    def __init__(
        self,
        sae: SAE,
        n_parts: int,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        strategy: str = "PACK",
        ready_timeout_s: float = 600.0,
        with_decoder: bool = True,
        max_restarts: int = 0,
        name: str = "",
        dtype: str | torch.dtype | None = None,
    ) -> None:
        ranges = split_ranges(sae.n_latents, n_parts)
        sources = []
        for start, stop in ranges:
            tensors = {"W_enc": sae.W_enc[start:stop]}
            if with_decoder:
                tensors["W_dec"] = sae.W_dec[start:stop]
            if sae.b_enc is not None:
                tensors["b_enc"] = sae.b_enc[start:stop]
            # copies: pickling a view (even a contiguous row range) would ship the whole base storage.
            sources.append({"tensors": {n: t.detach().cpu().clone() for n, t in tensors.items()},
                            "with_decoder": with_decoder, "dtype": dtype})
        self._start(_driver_sae(sae), ranges, sources, num_cpus, num_gpus, strategy, ready_timeout_s, max_restarts,
                    name)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        n_parts: int,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        strategy: str = "PACK",
        ready_timeout_s: float = 600.0,
        hash_files: bool = True,
        with_decoder: bool = True,
        max_restarts: int = 0,
        backend: str = "auto",
        name: str = "",
        dtype: str | torch.dtype | None = None,
    ) -> LatentSplitSAE:
        """Project's own format (cfg.json + sae.safetensors); no process loads a whole matrix.

        `hash_files=False` skips the sha256 of the checkpoint (a streamed read of the whole
        file on the driver: minutes for a 16M-latent SAE). `with_decoder=False`: parts hold
        W_enc/b_enc only. `max_restarts`: Ray restarts of a dead part (it reloads its slice and
        reruns the call) before the caller sees `RayActorError`. `dtype`: `sae.dtype`, resolved as
        `load_sae` does on the parts' device (CUDA when `num_gpus > 0`).
        """
        from pipeline.sae.formats import resolve_dtype

        path = Path(path)
        cfg = json.loads((path / "cfg.json").read_text())
        if cfg.get("format") != OWN_FORMAT:
            raise ValueError(f"{path}: sliced loading supports the {OWN_FORMAT!r} format only, got {cfg.get('format')!r}")
        refs = safetensors_header(path / "sae.safetensors")
        n_latents, d_in = refs["W_enc"].shape
        # The small vectors as load_own reads them for this dtype (fp32 once a compute dtype is set).
        resolved = resolve_dtype(dtype, "cuda" if num_gpus > 0 else "cpu")
        small = {name: vector(refs.get(name), resolved) for name in ("b_dec", "b_pre", "latent_scale")}
        meta = torch.empty(n_latents, d_in, device="meta")
        # Same cfg fields as pipeline.sae.formats.load_own, minus the matrices.
        driver_sae = SAE(
            W_enc=meta, b_enc=None, W_dec=meta, **small, k=int(cfg["k"]),
            input_norm=cfg.get("input_norm", "none"), activation=cfg.get("activation", "topk_relu"),
            hookpoint=cfg.get("hookpoint"), format=OWN_FORMAT, source=str(path),
            sha256=sha256_of_files([path / "cfg.json", path / "sae.safetensors"]) if hash_files else "",
            meta=cfg.get("meta", {}), backend=backend,
            kind=cfg.get("kind", "sae"), inputs=list(cfg.get("inputs") or []), output=cfg.get("output"),
        )
        ranges = split_ranges(n_latents, n_parts)
        self = cls.__new__(cls)
        self._start(driver_sae, ranges, [{"path": str(path), "with_decoder": with_decoder, "dtype": dtype}] * n_parts,
                    num_cpus, num_gpus, strategy, ready_timeout_s, max_restarts, name)
        return self

    def _start(self, driver_sae: SAE, ranges: list[tuple[int, int]], sources: list[dict],
               num_cpus: float, num_gpus: float, strategy: str, ready_timeout_s: float,
               max_restarts: int = 0, name: str = "") -> None:
        import ray
        from ray.util.placement_group import get_placement_group, placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if strategy not in PG_STRATEGIES:
            raise ValueError(f"strategy {strategy!r} is not one of {PG_STRATEGIES}")
        bundle = {name: amount for name, amount in (("CPU", num_cpus), ("GPU", num_gpus)) if amount > 0}
        if not bundle:
            raise ValueError("each part needs num_cpus > 0 or num_gpus > 0")
        self.sae, self.ranges, self.actors, self._pg = driver_sae, ranges, [], None
        if name:
            # A restarted owner (a harvest actor that died and came back) removes the placement
            # group its earlier life reserved: Ray keeps it until the owner is dead for good.
            try:
                remove_placement_group(get_placement_group(name))
            except ValueError:
                pass
        self._pg = placement_group([dict(bundle) for _ in ranges], strategy=strategy, name=name)
        try:
            try:
                ray.get(self._pg.ready(), timeout=ready_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"the cluster could not place {len(ranges)} latent-split bundles of {bundle} ({strategy}) within "
                    f"{ready_timeout_s:.0f}s: lower sae.latent_splits, sae.split_cpus or sae.split_gpus, or add nodes"
                ) from None
            # A restarted part reruns its constructor (reloads its slice); the object store still
            # holds the call's input, so Ray retries the call there and nothing is recomputed elsewhere.
            actor_cls = ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts)(LatentPartActor)
            for i, ((start, stop), source) in enumerate(zip(ranges, sources)):
                options = actor_cls.options(
                    num_cpus=num_cpus, num_gpus=num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
                )
                self.actors.append(options.remote(
                    start, stop, **source, device="cuda" if num_gpus > 0 else "cpu",
                    backend=driver_sae.backend, torch_threads=max(1, int(num_cpus)),
                ))
            # Surface load errors (bad path, wrong shapes) here rather than at the first encode.
            ray.get([actor.info.remote() for actor in self.actors], timeout=ready_timeout_s)
        except BaseException:
            self.close()
            raise

    # -- SAE interface -------------------------------------------------------------------

    @property
    def d_in(self) -> int:
        return self.sae.d_in

    @property
    def n_latents(self) -> int:
        return self.sae.n_latents

    @property
    def k(self) -> int:
        return self.sae.k

    @k.setter
    def k(self, value: int) -> None:  # the harvest overrides k from config, as with SAE
        self.sae.k = value

    @property
    def backend(self) -> str:
        return self.sae.backend

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.normalize(x)

    # What it reads and reconstructs (issue 17): the worker and the FVU check ask every dictionary.
    @property
    def kind(self) -> str:
        return self.sae.kind

    @property
    def inputs(self) -> list[str]:
        return self.sae.inputs

    @property
    def output(self) -> str | None:
        return self.sae.output

    @property
    def n_blocks(self) -> int:
        return self.sae.n_blocks

    @property
    def n_parts(self) -> int:
        return len(self.ranges)

    def part_info(self) -> list[dict]:
        import ray

        return ray.get([actor.info.remote() for actor in self.actors])

    def encode(self, x: torch.Tensor, k: int | None = None, bounds: list[int] | None = None,
               crash_once: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (values fp32 [N, k] descending, latent ids int32 [N, k]), as `SAE.encode`.

        `bounds`: row offsets of the batches the unsplit SAE would have encoded one by one
        (see `LatentPartActor.encode_part`); `crash_once`: fault injection in part 0.
        """
        import ray

        k = self.k if k is None else k
        x_n = self.sae.encoder_input(x.cpu(), k)  # the SAE's own semantics around the top-k
        x_ref = ray.put(x_n)  # one copy in the object store, shared by every actor
        parts = ray.get([actor.encode_part.remote(x_ref, k, bounds, crash_once if i == 0 else None)
                         for i, actor in enumerate(self.actors)])
        values, ids = merge_topk(parts, k)
        values = self.sae.activate(values, ids)
        return values.to(x.device), ids.to(x.device)

    def decode(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Reconstruction (plus b_dec): [N, d] fp32, equal to `SAE.decode`."""
        import ray

        if values.shape != ids.shape:
            raise ValueError(f"values {tuple(values.shape)} and ids {tuple(ids.shape)} differ in shape")
        unique, inverse = torch.unique(ids.cpu().long(), sorted=True, return_inverse=True)
        if unique.numel() and (int(unique[0]) < 0 or int(unique[-1]) >= self.n_latents):
            raise ValueError(f"latent ids must be in [0, {self.n_latents})")
        # Sorted unique ids split by range boundary; concatenating in range order keeps them sorted.
        bounds = torch.searchsorted(unique, torch.tensor([stop for _, stop in self.ranges]))
        refs, lo = [], 0
        for actor, hi in zip(self.actors, bounds.tolist()):
            if hi > lo:
                refs.append(actor.decoder_rows.remote(unique[lo:hi]))
            lo = hi
        if refs:
            rows = torch.cat(ray.get(refs), dim=0)
        else:  # no ids at all (N == 0 or k == 0)
            rows = torch.empty(0, self.d_in)
        # The driver works on CPU, so the torch path (what SAE.decode runs on CPU too).
        out = sae_harvest_kernels.sparse_decode(values.cpu(), inverse.reshape(ids.shape), rows, backend="torch")
        if self.sae.b_dec is not None:  # as SAE.decode
            out = out + self.sae.b_dec.float()
        return out.to(values.device)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Kill the actors and remove the placement group (idempotent)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_split(path: str, hookpoint: str | None, n_parts: int, *, with_decoder: bool = True,
               backend: str = "auto", dtype: str | torch.dtype | None = None, **options) -> LatentSplitSAE:
    """The harvest's entry point (`sae.latent_splits`): a `LatentSplitSAE` for any SAE path.

    A local checkpoint in the project's own format is read slice by slice by the parts
    (`from_path`); any other format, or a remote path, is loaded once by the caller and its
    slices are shipped to the parts (the caller then needs the memory of the whole SAE once).
    `dtype`: `sae.dtype`, honoured exactly as the unsplit `load_sae` does on the parts' device.
    `options`: num_cpus, num_gpus, strategy, ready_timeout_s, max_restarts, name (of the
    placement group; a new one of the same name replaces it).
    """
    from pipeline.remote import is_remote
    from pipeline.sae.formats import detect_format, load_sae, resolve_dtype

    local = Path(str(path).removeprefix("file://"))
    if hookpoint is not None and local.is_dir() and (local / hookpoint).is_dir():
        local = local / hookpoint
    if not is_remote(str(path)) and local.is_dir() and detect_format(local) == OWN_FORMAT:
        # The driver's preflight already hashed the checkpoint for the manifest.
        return LatentSplitSAE.from_path(local, n_parts, hash_files=False, with_decoder=with_decoder,
                                        backend=backend, dtype=dtype, **options)
    # Cast here (CPU) as the parts' device would resolve it; the parts keep that dtype.
    part_device = "cuda" if options.get("num_gpus", 0) > 0 else "cpu"
    sae = load_sae(path, hookpoint=hookpoint, dtype=resolve_dtype(dtype, part_device), with_decoder=with_decoder)
    sae.backend = backend
    return LatentSplitSAE(sae, n_parts, with_decoder=with_decoder, **options)
