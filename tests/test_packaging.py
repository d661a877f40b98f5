"""Import names. `kernels` belongs to Hugging Face's hub-kernels package, which transformers (>= 5.25)
requires and imports; ours are `pipeline` and `sae_harvest_kernels` (the code in kernels/, a source
root with no __init__.py). Each test here fails when the collision comes back: a `kernels/__init__.py`
at the repository root, a wheel that ships a top-level `kernels`, or another distribution shipping
one of our names."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import distribution, distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_IMPORT_NAMES = {"pipeline", "sae_harvest_kernels"}

# What transformers does when it imports (transformers/integrations/hub_kernels.py runs
# `from kernels import ...` whenever the hub package is installed), then where each name resolves.
PROBE = """
import json, kernels, sae_harvest_kernels, transformers.activations
from importlib.metadata import distribution
hub = distribution("kernels")
print(json.dumps({"kernels": kernels.__file__, "hub_files": [str(hub.locate_file(f)) for f in hub.files or []
                  if str(f).endswith("kernels/__init__.py")], "ours": sae_harvest_kernels.__file__,
                  "has_api": hasattr(sae_harvest_kernels, "topk_encode") and hasattr(sae_harvest_kernels, "sparse_decode")}))
"""


def _probe(cwd: Path, *args: str) -> dict:
    out = subprocess.run([sys.executable, *args, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("where", ["repo root", "another folder"])
def test_kernels_is_hugging_faces_package_and_ours_is_sae_harvest_kernels(where, tmp_path):
    # `python -m pipeline` and `python -m pytest` put the working directory first on sys.path:
    # from the repository root, a kernels/__init__.py of ours would win over the hub package.
    cwd = ROOT if where == "repo root" else tmp_path
    seen = _probe(cwd)
    assert Path(seen["kernels"]).resolve() in {Path(f).resolve() for f in seen["hub_files"]}, seen
    assert Path(seen["ours"]).resolve() == ROOT / "kernels" / "sae_harvest_kernels" / "__init__.py"
    assert seen["has_api"]


def test_kernels_folder_is_a_source_root_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/__init__.py shadows Hugging Face's `kernels`"
    assert (ROOT / "kernels" / "sae_harvest_kernels" / "__init__.py").is_file()


def test_this_process_sees_the_hub_package_too():
    # pytest's own sys.path (rootdir, tests/) must not shadow it either.
    import sae_harvest_kernels

    import kernels

    assert "site-packages" in Path(kernels.__file__).parts
    assert sae_harvest_kernels.topk_encode.__module__ == "sae_harvest_kernels"


def test_readme_shows_the_public_import_and_it_runs(tmp_path):
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    imports = [ln for ln in lines if re.fullmatch(r"from \w+ import topk_encode, sparse_decode", ln)]
    assert imports == ["from sae_harvest_kernels import topk_encode, sparse_decode"], imports
    code = imports[0] + "\nimport torch\nv, i = topk_encode(torch.eye(3), torch.eye(3), None, 1)\n" \
        "print(sparse_decode(v, i, torch.eye(3)).tolist())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_wheel_ships_our_import_names_only(tmp_path):
    # What the container image or a `pip install` of the project gets: top-level packages of the wheel.
    # Built from a copy of the sources, so setuptools' build/ folder stays out of the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "pipeline", "kernels"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("sae_harvest-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == OUR_IMPORT_NAMES, top
    assert "sae_harvest_kernels/topk_encode_triton.py" in names and "pipeline/__main__.py" in names


def _top_level_names(dist) -> set[str]:
    text = dist.read_text("top_level.txt")
    if text:
        return set(text.split())
    return {str(f).split("/")[0].removesuffix(".py") for f in dist.files or []
            if "/" in str(f) or str(f).endswith(".py")}


def test_no_other_installed_distribution_ships_our_import_names():
    # The audit of issue 22 as a test: `pipeline` is a generic name (PyPI has a distribution called
    # `pipeline`); none of what this environment installs may ship it or `sae_harvest_kernels`.
    ours = distribution("sae-harvest")
    clashes = {}
    for dist in distributions():
        if dist.metadata["Name"] in (None, ours.metadata["Name"]):
            continue
        if hit := _top_level_names(dist) & OUR_IMPORT_NAMES:
            clashes[dist.metadata["Name"]] = sorted(hit)
    assert not clashes, clashes
