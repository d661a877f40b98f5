#!/usr/bin/env bash
# Run the pipeline as a Ray job on an existing cluster:
#
#   infra/submit.sh http://127.0.0.1:8265 experiment=none cluster=gpu corpus=files 'corpus.paths=[s3://b/web/*.jsonl]' sink=s3
#
# Argument 1 is the cluster's dashboard address; the rest are Hydra overrides for `python -m pipeline`.
# The job's interpreter is explicit: this checkout's .venv/bin/python (by absolute path) when the
# head can see it (a local `.venv/bin/ray start`, venv activated or not), else `python` on the
# head's PATH (the image's /opt/venv on KubeRay). Only the code is uploaded, never the venv.
#
# Environment knobs:
#   SAE_HARVEST_PYTHON       the job's interpreter on the cluster (default: as above)
#   SAE_HARVEST_WORKING_DIR  folder uploaded as the job's working dir (default: the repository
#                            root); empty: upload nothing and run the code installed on the cluster
#   RAY_JOB_ARGS             extra `ray job submit` flags, e.g. "--no-wait --submission-id nightly-20261125"
#   RAY                      the ray CLI to use (default: this checkout's .venv/bin/ray, else ray)
# Ray token authentication: any local `ray.init()` (`make demo` included) writes ~/.ray/auth_token,
# and a later `ray start --head` then turns token auth on. So when a token exists (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is unset, the client sends it.
# Credentials are never put into the runtime environment (it is visible in the dashboard and the
# job table): cluster pods get them from their own Secret or IAM role. Only the non-secret S3
# location settings below are forwarded when set.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
address="$1"
shift

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
workdir="${SAE_HARVEST_WORKING_DIR-$repo}"
venv_python="$repo/.venv/bin/python"
ray_cli="${RAY:-}"
if [[ -z "$ray_cli" ]]; then
  if [[ -x "$repo/.venv/bin/ray" ]]; then ray_cli="$repo/.venv/bin/ray"; else ray_cli=ray; fi
fi

if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] ||
    [[ -n "${RAY_AUTH_TOKEN_PATH:-}" && -f "${RAY_AUTH_TOKEN_PATH}" ]] || [[ -f "$HOME/.ray/auth_token" ]]; }; then
  export RAY_AUTH_MODE=token
fi

json_str() {  # a JSON string literal (quotes and backslashes escaped)
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

env_vars='"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"'
for name in AWS_ENDPOINT_URL SAE_HARVEST_S3_ROOT AWS_REGION AWS_DEFAULT_REGION; do
  if [[ -n "${!name:-}" ]]; then
    env_vars+=", \"$name\": $(json_str "${!name}")"
  fi
done

runtime_env="{\"env_vars\": {$env_vars}"
if [[ -n "$workdir" ]]; then
  # Never upload the venv, outputs, caches or git history (Ray caps uploads at a few hundred MB).
  runtime_env+=", \"working_dir\": $(json_str "$workdir"), \"excludes\": [\".venv\", \"out\", \".cache\", \".git\","
  runtime_env+=" \"**/__pycache__\", \"*.egg-info\", \".pytest_cache\", \".ruff_cache\", \"bench/results\"]"
  # The kernels' import package lives in kernels/ (a source root, not on the working dir's sys.path):
  # upload it as a module too, so the job runs the kernels of this checkout beside its pipeline/.
  runtime_env+=", \"py_modules\": [$(json_str "$workdir/kernels/sae_harvest_kernels")]"
fi
runtime_env+="}"

# The entrypoint runs in a shell on the head: it picks the interpreter there (see the top) and says
# which one in the job's log.
if [[ -n "${SAE_HARVEST_PYTHON:-}" ]]; then
  pick='py=$1'
  py_arg="$SAE_HARVEST_PYTHON"
else
  pick='if [ -x "$1" ]; then py=$1; else py=python; fi'
  py_arg="$venv_python"
fi
entry="$pick"'; shift; echo "[submit] job python: $py"; exec "$py" -m pipeline "$@"'

# shellcheck disable=SC2086  # RAY_JOB_ARGS is a list of flags on purpose
exec "$ray_cli" job submit --address "$address" --runtime-env-json "$runtime_env" ${RAY_JOB_ARGS:-} \
  -- sh -c "$entry" sae-harvest-job "$py_arg" "$@"
