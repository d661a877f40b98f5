"""The installed environment is the one pyproject.toml and requirements.lock ask for: the S3 stack
resolved once to s3fs 0.4.2 (2019) because nothing put a floor on it, and a fresh clone broke when
transformers 5.25 came out, because nothing pinned it. The floors are read from pyproject.toml and
the pins from the lock, so these tests and the files cannot drift apart. Also: the CI guard for real
components."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

import pytest
import tomllib
from conftest import require
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
FLOORED = ("s3fs", "fsspec", "pyarrow")
LOCK = ROOT / "requirements.lock"
# `make test-latest` runs this suite on the newest versions, deliberately not the locked ones.
UNLOCKED = os.environ.get("SAE_HARVEST_UNLOCKED") == "1"


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def makefile_variable(name: str) -> list[str]:
    out = subprocess.run(["make", "-s", "-C", str(ROOT), "-p", "-n", "-f", "Makefile", "-f", "-"], input="",
                         capture_output=True, text=True, timeout=60)
    (value,) = re.findall(rf"^{name} :?= (.*)$", out.stdout, re.MULTILINE)
    return shlex.split(value)


def test_lock_pins_every_dependency_the_installs_name():
    pins = lock_pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]]
    missing = sorted(r.name for r in wanted if (r.marker is None or r.marker.evaluate())
                     and canonicalize_name(r.name) not in pins)
    assert not missing, f"not in requirements.lock (run `make lock`): {missing}"
    for req in wanted:  # the lock satisfies pyproject's own ranges
        if canonicalize_name(req.name) in pins:
            assert req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True), (req, pins[req.name])
    # What the Makefile installs without dependencies is pinned at the same versions.
    for pin in makefile_variable("REFERENCE_LIBS"):
        name, _, ver = pin.partition("==")
        assert pins.get(canonicalize_name(name)) == ver, f"{pin} (Makefile) vs requirements.lock"
    for name in makefile_variable("NO_DEPS"):
        assert canonicalize_name(name) in pins, name
    # torch without a local label, so both PyPI's CUDA build and the +cpu build satisfy it; the triton
    # pinned beside it is the one the CUDA build requires.
    assert "+" not in pins["torch"] and (makefile_variable("TORCH_SPEC") == [f"torch=={pins['torch']}"])


@pytest.mark.skipif(UNLOCKED, reason="make test-latest: the newest versions, not the lock's")
def test_installed_versions_are_the_locked_ones():
    pins = lock_pins()
    off = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name in pins and Version(dist.version).public != Version(pins[name]).public:
            off[name] = f"{dist.version} installed, {pins[name]} locked"
    assert not off, f"the venv is not the lock's (make test reinstalls it when the lock changes): {off}"
    for name in ("transformers", "kernels"):  # the pair whose upgrade broke fresh clones (issue 22)
        try:
            assert Version(version(name)) == Version(pins[name])
        except PackageNotFoundError:
            raise AssertionError(f"{name} is locked but not installed") from None


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


def test_readme_names_the_locked_versions():
    # The README says which versions a fresh clone gets; `make lock` must not leave it behind.
    readme = " ".join((ROOT / "README.md").read_text().split())
    said = dict(re.findall(r"(torch|transformers|ray|triton|`kernels`) (\d[\w.]*\d)", readme.split("## What it does")[0]))
    pins = lock_pins()
    assert said == {"torch": pins["torch"], "transformers": pins["transformers"], "`kernels`": pins["kernels"],
                    "ray": pins["ray"], "triton": pins["triton"]}, said
