#!/usr/bin/env bash
# Deploy prefect.yaml's two deployments with this site's values (`make deploy`).
#
#   bash deployments/deploy.sh [SITE_ENV]
#
# `prefect --no-prompt deploy --all` alone deploys prefect.yaml's literal defaults. This
# script adds the site values as optional overrides:
# 1. reads SITE_ENV (default: $DOGFLOW_SITE_ENV, else ~/.config/dogflow/site.env if it
#    exists; see deployments/sites/example.env). DOGFLOW_* variables already exported in
#    the environment win over the file;
# 2. writes a copy of prefect.yaml with those values (deployments/site.py; a bad value is
#    refused there, before anything is deployed);
# 3. creates the process work pool (default hpc) if it is missing, with the base job
#    template $DOGFLOW_JOB_TEMPLATE if that is set;
# 4. runs `prefect --no-prompt deploy --all --prefect-file <that copy>` from the repository root.
#
# The Prefect API is the one of the environment or the active Prefect profile
# (PREFECT_API_URL, and PREFECT_API_AUTH_STRING if the server needs it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

site_env="${1:-${DOGFLOW_SITE_ENV:-}}"
if [ -z "$site_env" ] && [ -f "$HOME/.config/dogflow/site.env" ]; then
  site_env="$HOME/.config/dogflow/site.env"
fi
if [ -n "$site_env" ]; then
  [ -f "$site_env" ] || { echo "deploy.sh: site env file $site_env not found" >&2; exit 2; }
  echo "deploy.sh: site settings from $site_env"
  exported="$(declare -px | grep -E '^declare -x DOGFLOW_[A-Z_]*=' || true)"
  set -a
  # shellcheck disable=SC1090
  . "$site_env"
  set +a
  eval "$exported"   # the environment wins over the file
fi

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"

site_yaml="$(mktemp "${TMPDIR:-/tmp}/dogflow-site-XXXXXX.yaml")"
trap 'rm -f "$site_yaml"' EXIT
python "$ROOT/deployments/site.py" "$site_yaml"

DOGFLOW_WORK_POOL="${DOGFLOW_WORK_POOL:-hpc}" python - <<'PY'
import json
import os
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

api = get_current_settings().api.url
if not api:
    sys.exit("deploy.sh: no Prefect API: set PREFECT_API_URL (or `prefect config set PREFECT_API_URL=...`)")
pool = os.environ["DOGFLOW_WORK_POOL"]
with get_client(sync_client=True) as client:
    try:
        existing = client.read_work_pool(pool)
        if existing.type != "process":
            sys.exit(f"deploy.sh: work pool {pool!r} exists with type {existing.type!r}, expected 'process'")
        print(f"deploy.sh: work pool {pool!r} exists")
    except ObjectNotFound:
        template_file = os.environ.get("DOGFLOW_JOB_TEMPLATE", "").strip()
        if template_file:
            template = json.loads(Path(template_file).read_text())
        else:
            from prefect.workers.process import ProcessWorker

            template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(
            WorkPoolCreate(name=pool, type="process", base_job_template=template,
                           description="dogflow: runs flows as processes on the login node")
        )
        print(f"deploy.sh: created process work pool {pool!r}")
print(f"deploy.sh: Prefect API {api}")
PY

prefect --no-prompt deploy --all --prefect-file "$site_yaml"
