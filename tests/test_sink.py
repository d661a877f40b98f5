"""The sink's retry rule: transient S3 / I/O errors are retried with backoff, others are not."""
from __future__ import annotations

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
