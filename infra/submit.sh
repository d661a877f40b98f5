#!/usr/bin/env bash
# Run the pipeline as a Ray job on an existing cluster:
#
#   infra/submit.sh http://127.0.0.1:8265 experiment=none cluster=gpu corpus=files 'corpus.paths=[s3://b/web/*.jsonl]' sink=s3
#
# Argument 1 is the cluster's dashboard address; the rest are Hydra overrides for `python -m pipeline`.
# The job's `python` is the cluster's (the image's venv on KubeRay; whatever `ray start` ran from
# locally), so the project and its dependencies must be installed there; only the code is uploaded.
#
# Environment knobs:
#   SAE_HARVEST_WORKING_DIR  folder uploaded as the job's working dir (default: the repository
#                            root); empty: upload nothing and run the code installed on the cluster
#   RAY_JOB_ARGS             extra `ray job submit` flags, e.g. "--no-wait --submission-id nightly-20261125"
#   RAY                      the ray CLI to use (default: ray)
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
fi
runtime_env+="}"

# shellcheck disable=SC2086  # RAY_JOB_ARGS is a list of flags on purpose
exec "${RAY:-ray}" job submit --address "$address" --runtime-env-json "$runtime_env" ${RAY_JOB_ARGS:-} \
  -- python -m pipeline "$@"
