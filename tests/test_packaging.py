"""Our import package is called `kernels`, like Hugging Face's hub-kernels package, which
transformers probes for. With this project installed, transformers must not take ours for it."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import distribution


def test_distribution_is_not_named_kernels():
    dist = distribution("sae-harvest")
    assert dist.metadata["Name"] == "sae-harvest"
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("kernels")
        raise AssertionError("a distribution named 'kernels' is installed")
    except PackageNotFoundError:
        pass


def test_transformers_does_not_see_hub_kernels(tmp_path):
    # A fresh interpreter from a neutral folder sees the installed project only.
    code = (
        "import kernels, transformers.utils as u;"
        "assert kernels.__file__, 'our kernels package must be importable';"
        "print(u.is_kernels_available())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_our_kernels_package_is_the_one_imported():
    import kernels

    assert hasattr(kernels, "topk_encode") and hasattr(kernels, "sparse_decode")
    assert not hasattr(kernels, "__version__")
