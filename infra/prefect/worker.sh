#!/usr/bin/env bash
# Start the Prefect process worker that runs dogflow's deployments on this (login) node.
#
#   infra/prefect/worker.sh [extra `prefect worker start` options]
#
# Settings come from the environment, after reading the env file
# ${DOGFLOW_WORKER_ENV:-~/.config/dogflow/worker.env} (KEY=value lines; see
# deployments/README.md):
#   PREFECT_API_URL          required, e.g. http://prefect.example.org:4200/api
#   PREFECT_API_AUTH_STRING  optional, user:password when the server sets
#                            PREFECT_SERVER_API_AUTH_STRING
#   DOGFLOW_HOME             the checkout whose venv runs the worker (default: this checkout);
#                            flow runs start in the checkout `prefect deploy` ran in (pull step)
#   DOGFLOW_VENV             its virtual environment (default: $DOGFLOW_HOME/.venv)
#   DOGFLOW_WORK_POOL        the process work pool to serve (default: hpc)
#   DOGFLOW_WORKER_NAME      worker name shown in the UI (default: dogflow-<host>)
#   SLURM_CONF               optional, exported for sbatch/squeue of the SLURM cluster profile
# Flow runs are child processes of the worker and inherit this environment.
set -euo pipefail

env_file="${DOGFLOW_WORKER_ENV:-$HOME/.config/dogflow/worker.env}"
if [ -f "$env_file" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$env_file"
  set +a
fi

DOGFLOW_HOME="${DOGFLOW_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
DOGFLOW_VENV="${DOGFLOW_VENV:-$DOGFLOW_HOME/.venv}"
DOGFLOW_WORK_POOL="${DOGFLOW_WORK_POOL:-hpc}"
DOGFLOW_WORKER_NAME="${DOGFLOW_WORKER_NAME:-dogflow-$(hostname -s 2>/dev/null || hostname)}"
export DOGFLOW_HOME DOGFLOW_VENV DOGFLOW_WORK_POOL

if [ ! -x "$DOGFLOW_VENV/bin/prefect" ]; then
  echo "worker.sh: no prefect in $DOGFLOW_VENV (run \`make venv\` in $DOGFLOW_HOME)" >&2
  exit 2
fi
if [ -z "${PREFECT_API_URL:-}" ]; then
  echo "worker.sh: PREFECT_API_URL is not set (put it in $env_file)" >&2
  exit 2
fi
# shellcheck disable=SC1091
. "$DOGFLOW_VENV/bin/activate"
export PREFECT_API_URL
if [ -n "${PREFECT_API_AUTH_STRING:-}" ]; then export PREFECT_API_AUTH_STRING; fi
if [ -n "${SLURM_CONF:-}" ]; then export SLURM_CONF; fi
export PREFECT_SERVER_ANALYTICS_ENABLED="${PREFECT_SERVER_ANALYTICS_ENABLED:-false}"
cd "$DOGFLOW_HOME"

echo "worker.sh: pool $DOGFLOW_WORK_POOL, API $PREFECT_API_URL, checkout $DOGFLOW_HOME, venv $DOGFLOW_VENV"
exec prefect worker start --pool "$DOGFLOW_WORK_POOL" --type process --name "$DOGFLOW_WORKER_NAME" "$@"
