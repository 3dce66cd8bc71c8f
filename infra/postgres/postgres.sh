#!/usr/bin/env bash
# dogflow: a PostgreSQL 15 (Debian's postgresql) for the Prefect server, for development and CI.
#
#   bash infra/postgres/postgres.sh start          install if missing, initdb, start, create role and database
#   bash infra/postgres/postgres.sh stop           stop this cluster (fast shutdown)
#   bash infra/postgres/postgres.sh status         exit 0 when it accepts connections, 1 otherwise
#   bash infra/postgres/postgres.sh url [DB]       print the Prefect database URL (postgresql+asyncpg://...)
#   bash infra/postgres/postgres.sh env            print `export PREFECT_SERVER_DATABASE_CONNECTION_URL=...`
#   bash infra/postgres/postgres.sh createdb NAME  create an empty database NAME owned by the role (tests)
#   bash infra/postgres/postgres.sh dropdb NAME    drop it
#
# Environment:
#   DOGFLOW_PG_DIR       state folder (default /tmp/dogflow-postgres): data/, postgres.log, socket
#   DOGFLOW_PG_PORT      TCP port on 127.0.0.1 (default 5433; Debian's own cluster would take 5432)
#   DOGFLOW_PG_USER      role of the Prefect server (default prefect; may create databases)
#   DOGFLOW_PG_PASSWORD  its password (default prefect; scram-sha-256 over TCP)
#   DOGFLOW_PG_DB        its database (default prefect)
#   DOGFLOW_PG_TIMEOUT   seconds to wait for start/stop (default 60)
#
# initdb refuses to run as root, so the cluster is owned by, and runs as, the system user postgres.
# Only 127.0.0.1 is listened on. See infra/postgres/README.md for a production server.
set -euo pipefail

STATE_DIR="${DOGFLOW_PG_DIR:-/tmp/dogflow-postgres}"
DATA="$STATE_DIR/data"
LOG="$STATE_DIR/postgres.log"
PORT="${DOGFLOW_PG_PORT:-5433}"
PGUSER_="${DOGFLOW_PG_USER:-prefect}"
PGPASS_="${DOGFLOW_PG_PASSWORD:-prefect}"
PGDB_="${DOGFLOW_PG_DB:-prefect}"
TIMEOUT="${DOGFLOW_PG_TIMEOUT:-60}"
PACKAGES=(postgresql-15 postgresql-client-15)

log() { printf '[postgres.sh] %s\n' "$*" >&2; }
die() { printf '[postgres.sh] ERROR: %s\n' "$*" >&2; exit 1; }

bindir() {
    local d
    for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb ]] && { echo "$d"; return; }
    done
    return 1
}

as_postgres() { su -s /bin/bash postgres -c "$*"; }

ensure_packages() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" != "install ok installed" ]]; then
            missing+=("$p")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get to install them"
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

# Accepting connections? (pg_isready asks the server itself: an exited postmaster that stays <defunct>
# under this machine's init still passes `kill -0`, so its pid file cannot tell.)
ready() { "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -t 2 >/dev/null 2>&1; }

psql_admin() {  # psql as the superuser over the cluster's socket
    as_postgres "$BIN/psql -X -q -v ON_ERROR_STOP=1 -h '$STATE_DIR' -p $PORT -d postgres $(printf '%q ' "$@")"
}

sql_literal() { printf "'%s'" "${1//\'/\'\'}"; }

start() {
    ensure_packages
    BIN=$(bindir) || die "no PostgreSQL binaries under /usr/lib/postgresql"
    id postgres >/dev/null 2>&1 || die "no system user postgres (the postgresql package creates it)"
    mkdir -p "$STATE_DIR"
    chown postgres:postgres "$STATE_DIR"
    chmod 0755 "$STATE_DIR"
    if [[ ! -s $DATA/PG_VERSION ]]; then
        log "initdb $DATA"
        as_postgres "$BIN/initdb -D '$DATA' -U postgres -A peer --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >'$STATE_DIR/initdb.log' 2>&1" \
            || { tail -n 20 "$STATE_DIR/initdb.log" >&2; die "initdb failed"; }
    fi
    if ! ready; then
        rm -f "$DATA/postmaster.pid"  # left by a postmaster that is gone (or a zombie)
        log "starting PostgreSQL on 127.0.0.1:$PORT"
        as_postgres "$BIN/pg_ctl -D '$DATA' -l '$LOG' -w -t $TIMEOUT \
            -o \"-p $PORT -k '$STATE_DIR' -c listen_addresses=127.0.0.1 -c max_connections=200\" start >/dev/null" \
            || { tail -n 30 "$LOG" >&2; die "PostgreSQL did not start"; }
    fi
    local deadline=$((SECONDS + TIMEOUT))
    until ready; do
        ((SECONDS < deadline)) || { tail -n 30 "$LOG" >&2; die "PostgreSQL not accepting connections within ${TIMEOUT} s"; }
        sleep 0.3
    done
    # the server's role (may create databases: one per test server) and database, idempotently
    psql_admin -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = $(sql_literal "$PGUSER_")) THEN
          CREATE ROLE \"$PGUSER_\" LOGIN CREATEDB;
        END IF; END \$\$;" \
        -c "ALTER ROLE \"$PGUSER_\" LOGIN CREATEDB PASSWORD $(sql_literal "$PGPASS_");"
    if [[ -z "$(psql_admin -tA -c "SELECT 1 FROM pg_database WHERE datname = $(sql_literal "$PGDB_")")" ]]; then
        psql_admin -c "CREATE DATABASE \"$PGDB_\" OWNER \"$PGUSER_\""
    fi
    log "ready: $(url "$PGDB_" | sed -E 's#://([^:]*):[^@]*@#://\1:***@#')"
}

stop() {
    BIN=$(bindir) || die "no PostgreSQL binaries"
    [[ -s $DATA/PG_VERSION ]] || { log "no cluster in $DATA"; return 0; }
    if ready; then
        as_postgres "$BIN/pg_ctl -D '$DATA' -m fast -w -t $TIMEOUT stop >/dev/null" || die "pg_ctl stop failed"
    fi
    log "stopped"
}

url() { printf 'postgresql+asyncpg://%s:%s@127.0.0.1:%s/%s\n' "$PGUSER_" "$PGPASS_" "$PORT" "${1:-$PGDB_}"; }

db_cmd() {  # db_cmd CREATE|DROP NAME
    BIN=$(bindir) || die "no PostgreSQL binaries"
    [[ $2 =~ ^[A-Za-z0-9_]+$ ]] || die "database name must be letters, digits, _: $2"
    ready || die "PostgreSQL is not running (bash infra/postgres/postgres.sh start)"
    if [[ $1 == CREATE ]]; then
        psql_admin -c "CREATE DATABASE \"$2\" OWNER \"$PGUSER_\""
    else
        psql_admin -c "DROP DATABASE IF EXISTS \"$2\" WITH (FORCE)"
    fi
}

if [[ $(id -u) -ne 0 ]]; then
    exec sudo -E bash "$0" "$@"
fi

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) BIN=$(bindir) || exit 1; ready ;;
    url) url "${2:-}" ;;
    env) printf 'export PREFECT_SERVER_DATABASE_CONNECTION_URL=%q\n' "$(url)" ;;
    createdb) db_cmd CREATE "${2:?database name}" ;;
    dropdb) db_cmd DROP "${2:?database name}" ;;
    *) echo "usage: $0 {start|stop|status|url [DB]|env|createdb NAME|dropdb NAME}" >&2; exit 2 ;;
esac
