"""Corpus reading: any set of text / JSONL / Parquet files, local or fsspec, as a stream.

    files = resolve_corpus(cfg)                 # cheap listing + validation, before any work
    for item in read_documents(files[0], cfg):  # TextPiece | Quarantined, streamed
        ...

- `resolve_corpus` expands `corpus.paths` (files, folders, globs, fsspec URLs such as
  `s3://bucket/prefix/*.jsonl`, and `pkg:pydoc`, the embedded default corpus) into a sorted,
  de-duplicated list of `CorpusFile`s. Local files are named by absolute path, everything else
  by full URL (`s3://...`, `memory:///...`), so the same file listed twice is read once.
- `read_documents` never holds a whole text file or a whole huge document: text is cut into
  pieces of at most `corpus.read_chars` characters, preferably at the start of a whitespace run
  (byte-level BPE tokenizers attach a space to the *following* word, so a cut there tokenizes
  like the whole document in almost every case).
- Bad input never raises mid-run: a text file with invalid UTF-8, or a JSONL line that is not a
  JSON object with a string text field, becomes a `Quarantined` record naming file and location.
  Configuration mistakes (missing path, missing column) are `CorpusError`s raised up front.
- JSONL memory is bounded by the longest line (a document is a line), capped at
  `corpus.max_doc_bytes`; a longer line is quarantined, never held whole, and the rest kept.
- Parquet: every file's footer and columns are checked in `resolve_corpus`, before any work (a
  corrupt file or a missing/non-string text column is a CorpusError naming file and setting). A
  file that breaks while being read (a corrupt page) has its remaining rows quarantined.
"""
from __future__ import annotations

import ast
import codecs
import glob as globlib
import hashlib
import json
import logging
import os
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from pipeline.config import CorpusConfig

log = logging.getLogger(__name__)

DEFAULT_CORPUS = "pkg:pydoc"
DEFAULT_CACHE_DIR = ".cache/corpus"
FORMATS = ("text", "jsonl", "parquet")
EXTENSIONS = {
    ".txt": "text", ".md": "text", ".rst": "text", ".text": "text",
    ".jsonl": "jsonl", ".json": "jsonl",
    ".parquet": "parquet",
}
_CHUNK_BYTES = 1 << 20  # raw read size; independent of read_chars


class CorpusError(ValueError):
    """A corpus that cannot be read as configured; the message names the file or setting."""


@dataclass(frozen=True)
class CorpusFile:
    url: str
    format: str  # text | jsonl | parquet
    size: int
    # size + ETag/mtime (or a content hash for the embedded corpus): a changed value on an
    # incremental run means the file changed under an existing run.
    fingerprint: str
    # Per-file id field; None means "use corpus.id_field". The embedded corpus sets "id".
    id_field: str | None = None


@dataclass
class TextPiece:
    doc_id: str
    text: str
    first: bool  # first piece of its document
    last: bool  # last piece of its document


@dataclass
class Quarantined:
    file: str
    location: str  # "line 17", "row 3", "byte 123456"
    reason: str


# ----------------------------------------------------------------------------------------------
# resolving paths


def _is_url(path: str) -> bool:
    return "://" in path


def _fs(path: str, storage_options: dict | None):
    # storage_options are meant for remote stores; the local filesystem does not need them.
    opts = storage_options if _is_url(path) and not path.startswith("file://") else None
    return fsspec.core.url_to_fs(path, **(opts or {}))


def _url(fs, path: str) -> str:
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return os.path.abspath(path)
    return fs.unstrip_protocol(path)


def _format_of(path: str, cfg_format: str, where: str) -> str:
    if cfg_format != "auto":
        return cfg_format
    fmt = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise CorpusError(f"cannot tell the format of {path} from its extension ({where}); "
                          f"set corpus.format to one of {FORMATS}")
    return fmt


def _fingerprint(info: dict) -> str:
    size = int(info.get("size") or 0)
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return f"size={size};{key.lower()}={info[key]}"
    return f"size={size}"


def _wanted_in_folder(name: str, cfg_format: str) -> bool:
    base = os.path.basename(name)
    if base.startswith((".", "_")):  # .DS_Store, _SUCCESS, .crc files
        return False
    fmt = EXTENSIONS.get(os.path.splitext(base)[1].lower())
    return fmt is not None and (cfg_format == "auto" or fmt == cfg_format)


def resolve_corpus(cfg: CorpusConfig, storage_options: dict | None = None,
                   cache_dir: str = DEFAULT_CACHE_DIR) -> list[CorpusFile]:
    """Expand corpus.paths into a deterministic list of files; raise CorpusError on bad config."""
    if cfg.format not in ("auto",) + FORMATS:
        raise CorpusError(f"corpus.format={cfg.format!r} is not one of auto, {', '.join(FORMATS)}")
    if cfg.read_chars <= 0:
        raise CorpusError(f"corpus.read_chars={cfg.read_chars} must be positive")
    if cfg.max_doc_bytes <= 0:
        raise CorpusError(f"corpus.max_doc_bytes={cfg.max_doc_bytes} must be positive")
    if not cfg.paths:
        raise CorpusError("corpus.paths is empty")

    found: dict[str, CorpusFile] = {}
    for i, entry in enumerate(cfg.paths):
        where = f"corpus.paths[{i}]"
        if entry == DEFAULT_CORPUS:
            f = _default_corpus_file(cache_dir)
            found.setdefault(f.url, f)
            continue
        if entry.startswith("pkg:"):
            raise CorpusError(f"unknown embedded corpus {entry!r} ({where}); known: {DEFAULT_CORPUS}")
        fs, root = _fs(entry, storage_options)
        # One listing per entry (glob / find with detail=True): sizes and fingerprints come from
        # the listing itself, never from a per-object isfile/info request (issue 14).
        if globlib.has_magic(root):
            # Like the shell, a wildcard does not match hidden files unless the pattern says so.
            hidden_ok = os.path.basename(root).startswith(".")
            listed = fs.glob(root, detail=True)
            matches = [(p, listed[p]) for p in sorted(listed)
                       if (hidden_ok or not os.path.basename(p).startswith(".")) and listed[p].get("type") == "file"]
            if not matches:
                raise CorpusError(f"corpus glob {entry} matches no files ({where})")
        else:
            try:
                info = fs.info(root)
            except FileNotFoundError:
                raise CorpusError(f"corpus path {entry} does not exist ({where})") from None
            if info.get("type") == "directory":
                listed = fs.find(root, detail=True)
                matches = [(p, listed[p]) for p in sorted(listed) if _wanted_in_folder(p, cfg.format)]
                if not matches:
                    exts = sorted(e for e, f in EXTENSIONS.items() if cfg.format in ("auto", f))
                    raise CorpusError(f"corpus folder {entry} has no files with extension {exts} ({where})")
            else:
                matches = [(root, info)]
        for p, info in matches:
            f = _make_file(fs, p, _format_of(p, cfg.format, where), info)
            found.setdefault(f.url, f)

    files = [found[u] for u in sorted(found)]
    if all(f.size == 0 for f in files):
        raise CorpusError(f"empty corpus: every file is empty (corpus.paths={list(cfg.paths)})")
    for f in files:
        if f.format == "parquet":  # a footer read per file: a bad one stops the run before work
            with _open(f, storage_options) as raw:
                _parquet_columns(f, cfg, raw)
    return files


def _make_file(fs, path: str, fmt: str, info: dict) -> CorpusFile:
    return CorpusFile(url=_url(fs, path), format=fmt, size=int(info.get("size") or 0),
                      fingerprint=_fingerprint(info))


# ----------------------------------------------------------------------------------------------
# reading documents


def read_documents(file: CorpusFile, cfg: CorpusConfig,
                   storage_options: dict | None = None) -> Iterator[TextPiece | Quarantined]:
    """Stream one file as document pieces (in file order) and quarantine records."""
    if cfg.read_chars <= 0:
        raise CorpusError(f"corpus.read_chars={cfg.read_chars} must be positive")
    reader = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}.get(file.format)
    if reader is None:
        raise CorpusError(f"{file.url}: unknown format {file.format!r} (corpus.format)")
    yield from reader(file, cfg, storage_options)


def _open(file: CorpusFile, storage_options: dict | None):
    opts = storage_options if _is_url(file.url) and not file.url.startswith("file://") else None
    return fsspec.open(file.url, "rb", **(opts or {}))


def split_text(text: str, read_chars: int) -> tuple[list[str], str]:
    """Cut full pieces of <= read_chars chars off `text`; return (pieces, remainder).

    A cut goes at the start of the last whitespace run in the second half of the window, so
    words stay whole; with no whitespace there, it is a hard cut at read_chars.
    """
    pieces = []
    start = 0
    while len(text) - start > read_chars:
        end = start + read_chars
        lo = start + read_chars // 2
        cut = max(text.rfind(c, lo, end) for c in " \n\t\r")
        if cut > lo:
            while cut > lo and text[cut - 1].isspace():
                cut -= 1  # back to the start of the whitespace run
        if cut <= start:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    return pieces, text[start:]


def _pieces(doc_id: str, text: str, read_chars: int) -> Iterator[TextPiece]:
    parts, rest = split_text(text, read_chars)
    parts.append(rest)
    for i, p in enumerate(parts):
        yield TextPiece(doc_id, p, first=i == 0, last=i == len(parts) - 1)


def _first_bad_utf8(f) -> tuple[int, str] | None:
    """Streaming strict UTF-8 check: (byte offset, reason) of the first bad byte, or None."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    pos = 0
    while True:
        chunk = f.read(_CHUNK_BYTES)
        pending = len(dec.getstate()[0])
        try:
            dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            return pos - pending + e.start, e.reason
        if not chunk:
            return None
        pos += len(chunk)


def _read_text(file: CorpusFile, cfg: CorpusConfig, storage_options) -> Iterator[TextPiece | Quarantined]:
    # Pass 1 validates the whole file, so a bad byte late in a file never leaves a partial
    # document behind in the output; pass 2 streams pieces.
    with _open(file, storage_options) as f:
        bad = _first_bad_utf8(f)
    if bad is not None:
        yield Quarantined(file.url, f"byte {bad[0]}", f"invalid UTF-8 ({bad[1]}); file skipped")
        return
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    buf, first = "", True
    with _open(file, storage_options) as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            buf += dec.decode(chunk, final=not chunk)
            pieces, buf = split_text(buf, cfg.read_chars)
            for p in pieces:
                yield TextPiece(file.url, p, first=first, last=False)
                first = False
            if not chunk:
                break
    if buf or not first:
        yield TextPiece(file.url, buf, first=first, last=True)


def _lines(f, max_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number from 1, bytes without newline, too_long) with at most max_bytes held per line."""
    line_no, parts, size, too_long = 1, [], 0, False
    while True:
        chunk = f.read(_CHUNK_BYTES)
        if not chunk:
            break
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            seg = chunk[start:] if nl < 0 else chunk[start:nl]
            if not too_long:
                size += len(seg)
                if size > max_bytes:
                    parts, too_long = [], True  # drop what we hold; skip to the newline
                else:
                    parts.append(seg)
            if nl < 0:
                break
            yield line_no, b"".join(parts), too_long
            line_no, parts, size, too_long = line_no + 1, [], 0, False
            start = nl + 1
    if parts or too_long:
        yield line_no, b"".join(parts), too_long


def _doc_id(value, field: str) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _read_jsonl(file: CorpusFile, cfg: CorpusConfig, storage_options) -> Iterator[TextPiece | Quarantined]:
    id_field = file.id_field if file.id_field is not None else cfg.id_field
    tf = cfg.text_field
    with _open(file, storage_options) as f:
        for n, raw, too_long in _lines(f, cfg.max_doc_bytes):
            loc = f"line {n}"
            if too_long:
                yield Quarantined(file.url, loc, f"line longer than {cfg.max_doc_bytes} bytes (corpus.max_doc_bytes)")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Quarantined(file.url, loc, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Quarantined(file.url, loc, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield Quarantined(file.url, loc, f"not a JSON object but {type(obj).__name__}")
                continue
            if tf not in obj:
                yield Quarantined(file.url, loc, f"no field {tf!r} (corpus.text_field)")
                continue
            text = obj[tf]
            if not isinstance(text, str):
                yield Quarantined(file.url, loc, f"field {tf!r} is {type(text).__name__}, not a string")
                continue
            if not text:
                continue  # empty documents are skipped, not quarantined
            if id_field is None:
                doc_id = f"{file.url}:{n}"
            else:
                doc_id = _doc_id(obj.get(id_field), id_field)
                if doc_id is None:
                    yield Quarantined(file.url, loc, f"id field {id_field!r} (corpus.id_field) missing "
                                                     f"or not a string/int: {obj.get(id_field)!r}")
                    continue
            yield from _pieces(doc_id, text, cfg.read_chars)


def _parquet_columns(file: CorpusFile, cfg: CorpusConfig, raw):
    """Open a Parquet file and check its columns: (ParquetFile, columns to read, id field)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(raw)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{file.url} is not a readable Parquet file: {e}") from None
    id_field = file.id_field if file.id_field is not None else cfg.id_field
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise CorpusError(f"{file.url} has no column {cfg.text_field!r} (corpus.text_field); "
                          f"columns: {names}")
    t = pf.schema_arrow.field(cfg.text_field).type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise CorpusError(f"{file.url}: column {cfg.text_field!r} (corpus.text_field) is {t}, not string")
    cols = [cfg.text_field]
    if id_field is not None:
        if id_field not in names:
            raise CorpusError(f"{file.url} has no column {id_field!r} (corpus.id_field); columns: {names}")
        cols.append(id_field)
    return pf, cols, id_field


def _read_parquet(file: CorpusFile, cfg: CorpusConfig, storage_options) -> Iterator[TextPiece | Quarantined]:
    import pyarrow as pa

    with _open(file, storage_options) as raw:
        try:
            pf, cols, id_field = _parquet_columns(file, cfg, raw)
        except CorpusError as e:  # checked before work; this file changed since: skip it whole
            yield Quarantined(file.url, "file", f"{e}; file skipped")
            return
        row = 0  # rows are numbered from 0, as pyarrow/pandas index them
        batches = pf.iter_batches(batch_size=1024, columns=cols)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:  # a corrupt page: what is left is unreadable
                yield Quarantined(file.url, f"rows {row}-{pf.metadata.num_rows - 1}",
                                  f"unreadable Parquet data: {e}; rows skipped")
                return
            if batch is None:
                return
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if id_field is not None else None
            for i, text in enumerate(texts):
                r = row + i
                if text is None:
                    yield Quarantined(file.url, f"row {r}", f"null {cfg.text_field!r} (corpus.text_field)")
                    continue
                if ids is None:
                    doc_id = f"{file.url}:{r}"
                else:
                    doc_id = _doc_id(ids[i], id_field)
                    if doc_id is None:
                        yield Quarantined(file.url, f"row {r}", f"id {id_field!r} (corpus.id_field) is {ids[i]!r}")
                        continue
                if text:
                    yield from _pieces(doc_id, text, cfg.read_chars)
            row += len(texts)


# ----------------------------------------------------------------------------------------------
# the embedded default corpus: Python's own documentation


_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_MIN_DOCSTRING = 200


def _stdlib_docstrings(root: str) -> Iterator[tuple[str, str]]:
    """(id, docstring) for modules, classes and functions of the stdlib, in a fixed order."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    for path in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        try:
            with open(path, "rb") as fh:
                tree = ast.parse(fh.read(), filename=rel)
        except (SyntaxError, ValueError, OSError):
            continue  # e.g. files in a newer/older syntax: not our problem
        stack = [(tree, "")]
        while stack:  # depth-first in source order
            node, qual = stack.pop()
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= _MIN_DOCSTRING:
                yield f"stdlib:{rel}:{qual or '<module>'}", doc
            kids = [n for n in ast.iter_child_nodes(node)
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
            stack += [(k, f"{qual}.{k.name}" if qual else k.name) for k in reversed(kids)]


def _default_records() -> Iterator[dict]:
    import pydoc_data.topics

    seen = set()  # drop verbatim duplicates (overridden methods copying a docstring)
    for name in sorted(pydoc_data.topics.topics):
        text = pydoc_data.topics.topics[name]
        if text.strip() and text not in seen:
            seen.add(text)
            yield {"id": f"pydoc:{name}", "text": text, "source": "pydoc_data.topics"}
    for doc_id, text in _stdlib_docstrings(sysconfig.get_paths()["stdlib"]):
        if text not in seen:
            seen.add(text)
            yield {"id": doc_id, "text": text, "source": "stdlib docstring"}


def ensure_default_corpus(cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """Write `{cache_dir}/pydoc.jsonl` once (atomically) and return its absolute path.

    The content is a deterministic function of the running Python's standard library.
    """
    path = os.path.abspath(os.path.join(cache_dir, "pydoc.jsonl"))
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".pydoc.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
            for rec in _default_records():
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)  # concurrent builders write identical bytes; last rename wins
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _default_corpus_file(cache_dir: str) -> CorpusFile:
    path = ensure_default_corpus(cache_dir)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK_BYTES), b""):
            h.update(block)
    size = os.path.getsize(path)
    # A content hash, not mtime: rebuilding the cache must not look like a changed file.
    return CorpusFile(url=path, format="jsonl", size=size,
                      fingerprint=f"size={size};sha256={h.hexdigest()[:16]}", id_field="id")
