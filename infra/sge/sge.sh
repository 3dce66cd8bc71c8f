#!/usr/bin/env bash
# dogflow: a live single-node Son of Grid Engine (sge_qmaster + sge_execd, Debian's gridengine 8.1.9)
# for development and CI.
#
#   bash infra/sge/sge.sh start    install if missing, configure, start, wait until all.q accepts jobs
#   bash infra/sge/sge.sh stop     delete this machine's jobs, stop sge_execd and sge_qmaster
#   bash infra/sge/sge.sh status   print qstat -f; exit 0 when all.q@localhost accepts jobs, 1 otherwise
#   bash infra/sge/sge.sh env      print `export SGE_ROOT=... SGE_CELL=...`
#
# Environment:
#   DOGFLOW_SGE_SLOTS     slots of all.q on this host (default 2)
#   DOGFLOW_SGE_TIMEOUT   seconds to wait for a daemon / the queue (default 60)
#
# Needs root; re-executes itself with sudo when not root. Idempotent: a second `start` with
# everything running only re-applies the configuration (cheap) and reports "ready".
set -euo pipefail

export SGE_ROOT="${SGE_ROOT:-/var/lib/gridengine}"
export SGE_CELL="${SGE_CELL:-default}"
SPOOL=/var/spool/gridengine
COMMON="$SGE_ROOT/$SGE_CELL/common"
SLOTS="${DOGFLOW_SGE_SLOTS:-2}"
TIMEOUT="${DOGFLOW_SGE_TIMEOUT:-60}"
PACKAGES=(gridengine-master gridengine-exec gridengine-client)
# qmaster compares the name a client connects from (reverse lookup of 127.0.0.1 = localhost) with
# the client's own host name ("not identical to client's host name"): every name of this host is
# an alias of localhost, so SGE knows it as `localhost` only.
HOST=localhost

log() { printf '[sge.sh] %s\n' "$*" >&2; }
die() { printf '[sge.sh] ERROR: %s\n' "$*" >&2; exit 1; }

# A pid file's process is alive: exists and is not a zombie (exited daemons stay <defunct> under
# this machine's init, and `kill -0` still succeeds on them).
pid_alive() {
    local f=$1 pid state
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) (.).*/\1/' "/proc/$pid/stat" 2>/dev/null || echo Z)
    [[ $state != Z && $state != X ]]
}

qmaster_pid() { echo "$SPOOL/qmaster/qmaster.pid"; }
execd_pid() { echo "$SPOOL/execd/$HOST/execd.pid"; }

show_logs() {
    local f
    for f in "$SPOOL/qmaster/messages" "$SPOOL/execd/$HOST/messages"; do
        [[ -r $f ]] || continue
        printf '\n----- tail -n 30 %s -----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
    done
}

fail() { log "ERROR: $*"; show_logs; exit 1; }

wait_for() {  # wait_for WHAT CMD...: poll CMD until it succeeds or TIMEOUT
    local what=$1 deadline=$((SECONDS + TIMEOUT))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "$what not within ${TIMEOUT} s"
        sleep 0.5
    done
}

# ---------------------------------------------------------------- install
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
    # Debian's questions, answered: configure a cell "default" with this host as master.
    printf '%s\n' \
        "gridengine-common shared/gridengineconfig boolean true" \
        "gridengine-common shared/gridenginecell string $SGE_CELL" \
        "gridengine-common shared/gridenginemaster string $(hostname)" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # the packages' init scripts may not start the daemons here (policy-rc.d); this script starts them
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
}

ensure_cell() {
    if [[ ! -e $SPOOL/spooldb/sge ]]; then
        log "initialising cell $SGE_CELL"
        mkdir -p "$SPOOL/qmaster/job_scripts" "$SPOOL/spooldb"
        chown -R sgeadmin:sgeadmin "$SPOOL"
        su -s /bin/sh -c "/usr/share/gridengine/scripts/init_cluster $SGE_ROOT $SGE_CELL $SPOOL/spooldb sgeadmin" sgeadmin
    fi
    local names n
    names="$HOST"
    for n in "$(hostname)" "$(hostname -s 2>/dev/null || true)" "$(hostname -f 2>/dev/null || true)"; do
        [[ -n $n && $n != "$HOST" && " $names " != *" $n "* ]] && names="$names $n"
    done
    ALIASES_CHANGED=0
    if [[ "$(cat "$COMMON/host_aliases" 2>/dev/null || true)" != "$names" ]]; then
        echo "$names" >"$COMMON/host_aliases"
        ALIASES_CHANGED=1
    fi
    echo "$HOST" >"$COMMON/act_qmaster"
}

restart_if_aliases_changed() {
    # daemons started before the aliases existed (an init script elsewhere) know this host by another name
    ((ALIASES_CHANGED)) || return 0
    local f i
    for f in "$(execd_pid)" "$(qmaster_pid)"; do
        if pid_alive "$f"; then
            log "restarting $(basename "$f" .pid) (host aliases changed)"
            kill "$(tr -dc '0-9' <"$f")" 2>/dev/null || true
            for ((i = 0; i < 40; i++)); do pid_alive "$f" || break; sleep 0.5; done
        fi
    done
}

# ---------------------------------------------------------------- configuration
qconf_apply() {  # qconf_apply OPTION NAME: load NAME (a file in a temporary folder) with qconf OPTION
    local out
    out=$(cd "$CFG" && qconf "$1" "$2" 2>&1) || fail "qconf $1 $2: $out"
}

configure() {
    CFG=$(mktemp -d)
    trap 'rm -rf "$CFG"' RETURN
    # jobs of root (uid/gid 0) may run; needed before sge_execd starts
    qconf -sconf global | sed -E 's/^(min_uid|min_gid)( +).*/\1\20/' >"$CFG/global"
    qconf_apply -Mconf global
    # a job starts within ~1 s of qsub (defaults: a scheduling run every 15 s)
    qconf -ssconf | sed -E 's/^(schedule_interval +).*/\10:0:1/; s/^(flush_submit_sec +).*/\11/; s/^(flush_finish_sec +).*/\11/' \
        >"$CFG/sched"
    qconf_apply -Msconf sched
    qconf -ss 2>/dev/null | grep -qx "$HOST" || qconf -as "$HOST" >/dev/null
    qconf -sh 2>/dev/null | grep -qx "$HOST" || qconf -ah "$HOST" >/dev/null
    if ! qconf -shgrpl 2>/dev/null | grep -qx '@allhosts'; then
        printf 'group_name @allhosts\nhostlist %s\n' "$HOST" >"$CFG/hg"
        qconf_apply -Ahgrp hg
    fi
}

configure_queue() {
    CFG=$(mktemp -d)
    trap 'rm -rf "$CFG"' RETURN
    if qconf -sql 2>/dev/null | grep -qx all.q; then
        qconf -sq all.q >"$CFG/q"
    else
        qconf -sq >"$CFG/q"  # the template
    fi
    sed -i -E "s/^(qname +).*/\1all.q/; s/^(hostlist +).*/\1@allhosts/; s/^(slots +).*/\1$SLOTS/; \
s/^(load_thresholds +).*/\1NONE/; s/^(pe_list +).*/\1NONE/" "$CFG/q"
    if qconf -sql 2>/dev/null | grep -qx all.q; then
        qconf_apply -Mq q
    else
        qconf_apply -Aq q
    fi
}

queue_ready() {  # all.q@localhost listed, with no alarm/unknown/disabled/error state
    local line states
    line=$(timeout 10 qstat -f -q "all.q@$HOST" 2>/dev/null | grep "^all.q@$HOST") || return 1
    states=$(awk '{print $6}' <<<"$line")
    [[ -z $states ]]
}

# ---------------------------------------------------------------- commands
start() {
    ensure_packages
    ensure_cell
    restart_if_aliases_changed
    if ! pid_alive "$(qmaster_pid)"; then
        log "starting sge_qmaster"
        /usr/sbin/sge_qmaster || fail "sge_qmaster did not start"
    fi
    wait_for "sge_qmaster answering" qconf -sh
    configure
    if ! pid_alive "$(execd_pid)"; then
        log "starting sge_execd"
        /usr/sbin/sge_execd || fail "sge_execd did not start"
    fi
    wait_for "execution host $HOST registered" sh -c "qconf -sel | grep -qx $HOST"
    configure_queue
    wait_for "queue all.q@$HOST accepting jobs" queue_ready
    log "ready: all.q@$HOST, $SLOTS slots (SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL)"
}

stop() {
    if pid_alive "$(qmaster_pid)"; then
        qdel -u '*' '*' >/dev/null 2>&1 || true
        qconf -ke "$HOST" >/dev/null 2>&1 || true
        qconf -km >/dev/null 2>&1 || true
    fi
    local f i
    for f in "$(execd_pid)" "$(qmaster_pid)"; do
        for ((i = 0; i < 20; i++)); do pid_alive "$f" || break; sleep 0.5; done
        if pid_alive "$f"; then kill -9 "$(tr -dc '0-9' <"$f")" 2>/dev/null || true; fi
    done
    log "stopped"
}

status() {
    timeout 10 qstat -f 2>&1 || true
    queue_ready
}

if [[ $(id -u) -ne 0 ]]; then
    exec sudo -E bash "$0" "$@"
fi

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) printf 'export SGE_ROOT=%q SGE_CELL=%q\n' "$SGE_ROOT" "$SGE_CELL" ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac
