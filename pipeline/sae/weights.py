"""Weights straight from the checkpoint file into the layout the kernels want.

A 16M x 4096 encoder is 128 GB in bf16: the driver must learn its shape without reading it,
and a worker must not hold it twice. Two tools:

- `safetensors_header(path)`: every tensor's dtype, shape and byte offset, from the file's JSON
  header alone (the first 8 + n bytes). No tensor is read.
- `kernel_matrix(src, dtype, device, transpose)`: an `[L, d]` contiguous matrix in `dtype`.
  When the stored tensor already is that (same dtype, row-major, CPU) it is the memory-mapped
  file itself (pages are read on first use and are page cache, not a copy). Otherwise the
  output is allocated once and filled in row blocks of about `BLOCK_BYTES`, each read and cast
  on its own: never a full-precision or a transposed copy of the whole matrix.
"""
from __future__ import annotations

import json
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
    """A small tensor (a bias) read into memory."""
    return mmap_tensor(ref).clone()


def _rows(src: TensorRef | torch.Tensor, start: int, stop: int, transpose: bool) -> torch.Tensor:
    """Rows start:stop of the [L, d] matrix (columns start:stop of a stored [d, L] one)."""
    if isinstance(src, TensorRef):
        src = mmap_tensor(src)  # a fresh map per block: its pages are dropped with it
    return src[:, start:stop].T if transpose else src[start:stop]


def kernel_matrix(src: TensorRef | torch.Tensor, dtype: torch.dtype | None = None,
                  device: torch.device | str = "cpu", transpose: bool = False) -> torch.Tensor:
    """`src` (stored [L, d], or [d, L] with `transpose`) as an [L, d] contiguous `dtype` matrix on `device`."""
    shape = tuple(src.shape)
    stored = src.dtype
    dtype = dtype or stored
    device = torch.device(device)
    if not transpose and dtype == stored and device.type == "cpu":
        t = mmap_tensor(src) if isinstance(src, TensorRef) else src
        if t.is_contiguous():
            return t  # already the kernel's layout: the file's pages, no copy
    n_rows, width = (shape[1], shape[0]) if transpose else shape
    out = torch.empty((n_rows, width), dtype=dtype, device=device)
    row_bytes = max(1, width * max(torch.empty(0, dtype=stored).element_size(), out.element_size()))
    block = max(1, BLOCK_BYTES // row_bytes)
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        out[start:stop].copy_(_rows(src, start, stop, transpose))
    return out


def vector(src: TensorRef | torch.Tensor | None, dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """A 1-D tensor (bias, scale): small, read whole; kept at >= fp32 when a compute dtype is set."""
    if src is None:
        return None
    t = read_tensor(src) if isinstance(src, TensorRef) else src
    if dtype is not None and t.is_floating_point():
        t = t.float()  # the kernels add biases in fp32; a bf16 bias would round them
    return t.to(device)
