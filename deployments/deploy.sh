#!/usr/bin/env bash
# Deploy the dog-filter deployments of prefect.yaml (`make deploy`).
#
#   bash deployments/deploy.sh [SITE_ENV]
#
# 1. reads SITE_ENV (default: $DOGFLOW_SITE_ENV, else ~/.config/dogflow/site.env if it
#    exists; see deployments/sites/example.env) into the environment;
# 2. stores the per-site parameter values given as DOGFLOW_* environment variables as
#    Prefect variables (dogflow_input_path, ...); variables already on the server are
#    kept when the environment does not set them; missing optional ones get defaults;
# 3. creates the process work pool $DOGFLOW_WORK_POOL (default hpc) if it is missing,
#    with the base job template $DOGFLOW_JOB_TEMPLATE if that is set;
# 4. runs `prefect --no-prompt deploy --all` from the repository root.
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
  set -a
  # shellcheck disable=SC1090
  . "$site_env"
  set +a
fi

# Prefect's {{ $VAR }} templating has no defaults: export them here.
export DOGFLOW_WORK_POOL="${DOGFLOW_WORK_POOL:-hpc}"
export DOGFLOW_TIMEZONE="${DOGFLOW_TIMEZONE:-Europe/Berlin}"

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"

python - <<'PY'
import json
import os
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate, WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

api = get_current_settings().api.url
if not api:
    sys.exit("deploy.sh: no Prefect API: set PREFECT_API_URL (or `prefect config set PREFECT_API_URL=...`)")


def parse(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


# variable -> (environment variable, default when neither env nor server has it; None = required)
VARIABLES = {
    "dogflow_input_path": ("DOGFLOW_INPUT_PATH", None),
    "dogflow_output_path": ("DOGFLOW_OUTPUT_PATH", None),
    "dogflow_cluster": ("DOGFLOW_CLUSTER", "local"),
    "dogflow_channel": ("DOGFLOW_CHANNEL", 0),
    "dogflow_sigma_small": ("DOGFLOW_SIGMA_SMALL", 50 / 2.35),
    "dogflow_sigma_large": ("DOGFLOW_SIGMA_LARGE", 200 / 2.35),
}

missing = []
with get_client(sync_client=True) as client:
    for name, (env, default) in VARIABLES.items():
        current = client.read_variable_by_name(name)
        raw = os.environ.get(env, "").strip()
        if raw:
            value = parse(raw)
            if current is None:
                client.create_variable(VariableCreate(name=name, value=value, tags=["dogflow"]))
            elif current.value != value:
                client.update_variable(VariableUpdate(name=name, value=value))
            print(f"deploy.sh: variable {name} = {value!r} (from {env})")
        elif current is not None:
            print(f"deploy.sh: variable {name} = {current.value!r} (kept)")
        elif default is not None:
            client.create_variable(VariableCreate(name=name, value=default, tags=["dogflow"]))
            print(f"deploy.sh: variable {name} = {default!r} (default)")
        else:
            missing.append((name, env))
    if missing:
        sys.exit(
            "deploy.sh: the nightly deployment needs "
            + ", ".join(f"{n} (set {e} in the site env file, or `prefect variable set {n} ...`)" for n, e in missing)
        )

    pool = os.environ["DOGFLOW_WORK_POOL"]
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

exec prefect --no-prompt deploy --all
