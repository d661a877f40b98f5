"""Requests and time of `resolve_corpus` over N objects on a real moto_server (issue 14).

    python bench/resolve_corpus_requests.py 2000
    PYTHONPATH=<checkout of an older version> python bench/resolve_corpus_requests.py 2000   (compare)

Counts HTTP requests from moto_server's access log (one line per request).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# moto accepts any credentials; dummy ones so boto signs its requests (never real ones)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto-bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto-bench")


def main() -> None:
    import s3fs

    from pipeline.config import CorpusConfig
    from pipeline.data.corpus import resolve_corpus

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(tempfile.mkdtemp()) / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url})
                fs.mkdir("bench")
                break
            except Exception:
                time.sleep(0.1)
        fs.pipe({f"bench/c/part-{i:07d}.jsonl": b'{"text": "x"}\n' for i in range(n)})
        opts = {"client_kwargs": {"endpoint_url": url}}
        for path in ("s3://bench/c", "s3://bench/c/*.jsonl"):
            mark = sum(1 for _ in open(log, "rb"))
            t = time.perf_counter()
            files = resolve_corpus(CorpusConfig(paths=[path]), storage_options=opts)
            print(f"{path}: {len(files)} files, {sum(1 for _ in open(log, 'rb')) - mark} requests, "
                  f"{time.perf_counter() - t:.2f} s")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
