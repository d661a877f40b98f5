"""The installed environment is the one pyproject.toml asks for: the S3 stack resolved once to
s3fs 0.4.2 (2019) because nothing put a floor on it. The floors are read from pyproject.toml so
this test and the pins cannot drift apart. Also: the CI guard for real components."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
import tomllib
from conftest import require
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FLOORED = ("s3fs", "fsspec", "pyarrow")


def pinned_floors() -> dict[str, Version]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in map(Requirement, deps):
        lows = [Version(s.version) for s in dep.specifier if s.operator in (">=", "==", "~=")]
        if dep.name in FLOORED and lows:
            floors[dep.name] = max(lows)
    return floors


def test_s3_stack_is_at_least_the_pinned_floors():
    floors = pinned_floors()
    assert set(floors) == set(FLOORED), f"pyproject.toml must put a lower bound on each of {FLOORED}: {floors}"
    assert floors["s3fs"] >= Version("2025.1") and floors["fsspec"] >= Version("2025.1")
    for name, floor in floors.items():
        assert Version(version(name)) >= floor, f"{name} {version(name)} is older than the pinned floor {floor}"
    # s3fs is released in lockstep with fsspec and pins it: a mismatch means a broken install.
    assert Version(version("s3fs")).release[:2] == Version(version("fsspec")).release[:2]
    import s3fs

    assert s3fs.S3FileSystem.async_impl  # the aiobotocore-based s3fs, not the 2019 boto3 one


def test_require_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    require("present", True)
    with pytest.raises(pytest.skip.Exception, match="absent is not available"):
        require("absent", False, "install it")
    monkeypatch.setenv("CI", "true")
    require("present", True)
    with pytest.raises(pytest.fail.Exception, match="CI=true and absent is not available: install it"):
        require("absent", False, "install it")
