"""Transient S3 errors: a flaky proxy in front of a real moto_server answers some writes with
503 ServiceUnavailable. botocore's own retries are turned off (sink.storage_options) and s3fs
retries only SlowDown by itself, so what recovers here is our backoff in pipeline.outputs.sink
(`with_retries`): without it the run fails. It ends with every (seq_id, pos) exactly once."""
from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_pipeline_e2e import make_cfg
from test_s3 import BUCKET, s3_server  # noqa: F401  (the moto_server fixture)

from pipeline.config import SinkConfig

pytestmark = pytest.mark.slow

UNAVAILABLE = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
               b"<Message>Service is unable to handle the request.</Message></Error>")
NO_BOTOCORE_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


class FlakyProxy(ThreadingHTTPServer):
    """Forwards to `upstream`; every `every`-th PUT gets a 503 instead, at most `budget` times."""

    def __init__(self, upstream_port: int, every: int = 3, budget: int = 12):
        self.upstream_port, self.every, self.budget = upstream_port, every, budget
        self.puts = self.failed = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":  # aiobotocore streams bodies
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        server: FlakyProxy = self.server  # type: ignore[assignment]
        body = self._read_body()
        if self.command == "PUT":
            with server.lock:
                server.puts += 1
                fail = server.puts % server.every == 0 and server.failed < server.budget
                server.failed += fail
            if fail:
                self.send_response(503)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(UNAVAILABLE)))
                self.end_headers()
                self.wfile.write(UNAVAILABLE)
                return
        conn = http.client.HTTPConnection("127.0.0.1", server.upstream_port, timeout=30)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("expect", "connection", "transfer-encoding", "content-length")}
        headers["Content-Length"] = str(len(body))
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            # HEAD answers carry the object's size in Content-Length: pass it through.
            if k.lower() not in ("transfer-encoding", "connection") and (
                    k.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


def test_transient_s3_errors_are_retried_without_loss_or_duplicates(
    s3_server, ray_local, tiny_model_dir, tiny_corpus, tiny_sae_dir  # noqa: F811
):
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.driver import run

    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{proxy.server_address[1]}"
        cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, f"s3://{BUCKET}/flaky", run_id="flaky")
        cfg.sink = SinkConfig(root=f"s3://{BUCKET}/flaky", endpoint_url=endpoint, retries=6,
                              storage_options=NO_BOTOCORE_RETRIES)
        summary = run(cfg)
    finally:
        proxy.shutdown()
    assert proxy.failed >= 5, f"only {proxy.failed} failures were injected"
    assert summary.shards_done > 0 and summary.retries == 0  # recovered by the sink's retries, not by redoing shards
    store = RunStore(SinkConfig(root=f"s3://{BUCKET}/flaky", endpoint_url=s3_server), "flaky")
    ctx = store.read_committed("contexts").to_pandas()
    expected = sorted((int(s), p) for s, toks in zip(ctx.seq_id, ctx.token_ids) for p in range(len(toks)))
    assert len(expected) == summary.tokens
    for hook in cfg.sae.hookpoints:
        lat = store.read_committed("latents", hook, columns=["seq_id", "pos"]).to_pandas()
        assert sorted(zip(lat.seq_id.astype(int), lat.pos.astype(int))) == expected
