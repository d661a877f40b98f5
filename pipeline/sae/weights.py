"""Weights straight from the checkpoint file into the layout the kernels want.

A 16M x 4096 encoder is 128 GB in bf16: the driver must learn its shape without reading it,
and a worker must not hold it twice. Two tools:

- `safetensors_header(path)`: every tensor's dtype, shape and byte offset, from the file's JSON
  header alone (the first 8 + n bytes). No tensor is read.
- `kernel_matrix(src, dtype, device, transpose)`: an `[L, d]` contiguous matrix in `dtype`.
  When the stored tensor already is that (same dtype, row-major, CPU) it is the memory-mapped
  file itself (pages are read on first use and are page cache, not a copy). Otherwise the
  output is allocated once and filled in row blocks of about `BLOCK_BYTES`, each read and cast
  on its own: never a full-precision or a transposed copy of the whole matrix. A cast to float16
  is range-checked block by block as it is written (a weight beyond 65504 stops the load).

Load time (bench/sae_scale.py): reading a page-cache block through a fresh map costs page faults
at 64 KiB fault-around, less than a `read` copy; what dominates a cast is the first touch of the
fresh output (one fault per 4 KiB page). A CPU output is therefore pre-faulted by the kernel in
one call (`MAP_POPULATE`), which cuts that part by about a third on the benchmark's VM.
"""
from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BLOCK_BYTES = 64 << 20  # one row block read + cast at a time

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored in a file, not read: where it is and what it is."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the first element

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * torch.empty(0, dtype=self.dtype).element_size()

    def rows(self, start: int, stop: int) -> TensorRef:
        """Rows [start, stop) of a row-major tensor: a contiguous byte range of the same file."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise ValueError(f"{self.file}: rows [{start}, {stop}) outside tensor {self.name!r} of shape {self.shape}")
        row = self.nbytes // self.shape[0] if self.shape[0] else 0
        return TensorRef(self.file, self.name, self.dtype, (stop - start, *self.shape[1:]), self.offset + start * row)


def safetensors_header(path: str | Path) -> dict[str, TensorRef]:
    """Name -> TensorRef from a .safetensors header (8-byte little-endian length, then JSON)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    refs = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {t['dtype']}")
        refs[name] = TensorRef(path, name, _ST_DTYPES[t["dtype"]], tuple(int(s) for s in t["shape"]),
                               8 + n + int(t["data_offsets"][0]))
    return refs


def mmap_tensor(ref: TensorRef) -> torch.Tensor:
    """The stored tensor as a copy-on-write memory map of the file: no read until used."""
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=ref.dtype)
    raw = np.memmap(ref.file, dtype=np.uint8, mode="c", offset=ref.offset, shape=(ref.nbytes,))
    return torch.from_numpy(raw).view(ref.dtype).view(ref.shape)


def read_tensor(ref: TensorRef) -> torch.Tensor:
    """A small tensor (a bias; 64 MB at 16M latents) read into memory."""
    return _cpu_empty(ref.shape, ref.dtype).copy_(mmap_tensor(ref))


def _rows(src: TensorRef | torch.Tensor, start: int, stop: int, transpose: bool) -> torch.Tensor:
    """Rows start:stop of the [L, d] matrix (columns start:stop of a stored [d, L] one)."""
    if isinstance(src, TensorRef):
        src = mmap_tensor(src)  # a fresh map per block: its pages are dropped with it
    return src[:, start:stop].T if transpose else src[start:stop]


def _cpu_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose pages the kernel has already mapped (`MAP_POPULATE`):
    one call instead of a page fault per 4 KiB on first write, the larger part of a cast's time."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    if nbytes < BLOCK_BYTES or not hasattr(mmap, "MAP_POPULATE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps `buf` alive


def _check_fp16_block(out: torch.Tensor, src: torch.Tensor, label: str, start: int) -> None:
    """A finite weight beyond float16's range became inf in this block: stop, naming it."""
    lo, hi = out.aminmax()
    if not (torch.isinf(lo) or torch.isinf(hi)):
        return
    src = src.to(out.device)
    bad = torch.isinf(out) & torch.isfinite(src)
    if not bool(bad.any()):
        return  # the checkpoint itself holds inf: not the cast's doing
    row = start + int(bad.any(dim=-1).nonzero()[0, 0])
    worst = float(src.float().abs().masked_fill(~bad, 0).max())
    raise ValueError(
        f"{label}: a weight of magnitude {worst:.6g} (row {row}) is beyond the float16 range (max 65504); "
        f"sae.dtype=float16 would make it inf. Use sae.dtype=bfloat16 or float32 (or auto)."
    )


def kernel_matrix(src: TensorRef | torch.Tensor, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu", transpose: bool = False, label: str = "") -> torch.Tensor:
    """`src` (stored [L, d], or [d, L] with `transpose`) as an [L, d] contiguous `dtype` matrix on `device`.

    `label` names the tensor in errors (a TensorRef names itself: "file: tensor 'W_enc'")."""
    shape = tuple(src.shape)
    stored = src.dtype
    dtype = dtype or stored
    device = torch.device(device)
    if isinstance(src, TensorRef):
        label = label or f"{src.file}: tensor {src.name!r}"
    if not transpose and dtype == stored and device.type == "cpu":
        t = mmap_tensor(src) if isinstance(src, TensorRef) else src
        if t.is_contiguous():
            return t  # already the kernel's layout: the file's pages, no copy
    n_rows, width = (shape[1], shape[0]) if transpose else shape
    out = _cpu_empty((n_rows, width), dtype) if device.type == "cpu" else torch.empty((n_rows, width), dtype=dtype, device=device)
    check = dtype == torch.float16 and stored != torch.float16 and stored.is_floating_point
    row_bytes = max(1, width * max(torch.empty(0, dtype=stored).element_size(), out.element_size()))
    block = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        rows = _rows(src, start, stop, transpose)
        out[start:stop].copy_(rows)
        if check:
            _check_fp16_block(out[start:stop], rows, label or "SAE weight matrix", start)
    return out


def vector(src: TensorRef | torch.Tensor | None, dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """A 1-D tensor (bias, scale): small, read whole; kept at >= fp32 when a compute dtype is set."""
    if src is None:
        return None
    t = read_tensor(src) if isinstance(src, TensorRef) else src
    if dtype is not None and t.is_floating_point():
        t = t.float()  # the kernels add biases in fp32; a bf16 bias would round them
    return t.to(device)
