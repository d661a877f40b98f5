"""The sink's retry rule: transient S3 / I/O errors are retried with backoff, others are not."""
from __future__ import annotations

import socket
import threading

import pytest
from botocore.exceptions import ClientError

from pipeline.outputs.sink import is_transient, with_retries


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


@pytest.mark.parametrize("err,expected", [
    (client_error("SlowDown", 503), True),
    (client_error("InternalError", 500), True),
    (client_error("NoSuchBucket", 404), False),
    (client_error("AccessDenied", 403), False),
    (OSError("connection reset"), True),
    (TimeoutError(), True),
    (FileNotFoundError("gone"), False),
    (PermissionError("no"), False),
    (ValueError("bug"), False),
])
def test_is_transient(err, expected):
    assert is_transient(err) is expected


def test_with_retries_retries_transient_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "ok"

    assert with_retries("put", flaky, retries=3, base_delay=0.001) == "ok"
    assert len(calls) == 3


def test_with_retries_gives_up_and_does_not_retry_permanent_errors():
    calls = []

    def denied():
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        with_retries("put", denied, retries=5, base_delay=0.001)
    assert len(calls) == 1
    with pytest.raises(OSError):
        with_retries("put", lambda: (_ for _ in ()).throw(OSError("down")), retries=2, base_delay=0.001)


class DroppingServer:
    """A TCP endpoint that accepts and hangs up: what a restarting S3 gateway looks like. The
    current (async) s3fs raises botocore's EndpointConnectionError for it, not an OSError."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(1024)
            conn.close()


def test_connection_errors_from_the_real_s3fs_are_transient(monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    server = DroppingServer()
    # botocore's own retries off, so the error reaches us after one try.
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.url}, config_kwargs={"retries": {"max_attempts": 1}},
                           skip_instance_cache=True)
    with pytest.raises(Exception) as info:
        fs.pipe_file("bucket/key", b"x")
    server.sock.close()
    assert not isinstance(info.value, OSError), type(info.value)  # the case the old rule missed
    assert is_transient(info.value), repr(info.value)
