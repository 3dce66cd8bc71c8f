#!/usr/bin/env bash
# dogflow: a live single-node SLURM (slurmctld + slurmd + munge) for development and CI.
#
#   bash infra/slurm/slurm.sh start    install if missing, configure, start, wait until the node is idle
#   bash infra/slurm/slurm.sh stop     cancel jobs, stop slurmd and slurmctld (munged is left running)
#   bash infra/slurm/slurm.sh status   print sinfo/squeue; exit 0 when the node accepts jobs, 1 otherwise
#   bash infra/slurm/slurm.sh env      print `export SLURM_CONF=...` (use: eval "$(bash infra/slurm/slurm.sh env)")
#
# Environment:
#   DOGFLOW_SLURM_DIR          state folder (default /tmp/dogflow-slurm): slurm.conf, state, spool, logs, pids
#   DOGFLOW_SLURM_TIMEOUT      seconds to wait for the node to become idle / daemons to stop (default 60)
#   DOGFLOW_SLURM_CPUS         CPUs the node declares (default max(nproc, 8))
#   DOGFLOW_SLURM_MEM_MB       RealMemory in MiB (default MemTotal - 2048)
#   DOGFLOW_SLURM_STOP_MUNGE=1 make `stop` also stop munged, if this script started it
#   DOGFLOW_SLURM_NO_ETC=1     do not point /etc/slurm/slurm.conf at the generated file
#
# Needs root (SlurmUser=root, SlurmdUser=root); re-executes itself with sudo when not root.
set -euo pipefail

STATE_DIR="${DOGFLOW_SLURM_DIR:-/tmp/dogflow-slurm}"
CONF="$STATE_DIR/slurm.conf"
TIMEOUT="${DOGFLOW_SLURM_TIMEOUT:-60}"
ETC_CONF=/etc/slurm/slurm.conf
PACKAGES=(slurmctld slurmd slurm-client munge)
MUNGE_KEY=/etc/munge/munge.key

log() { printf '[slurm.sh] %s\n' "$*" >&2; }
die() { printf '[slurm.sh] ERROR: %s\n' "$*" >&2; exit 1; }

node_name() { hostname -s 2>/dev/null || uname -n | cut -d. -f1; }

# ---------------------------------------------------------------- helpers
pid_alive() {  # pid_alive PIDFILE -> 0 if the pid in the file is a live process
    local f=$1 pid
    [[ -r $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

pid_of() { tr -dc '0-9' <"$1" 2>/dev/null || true; }

show_logs() {
    local f
    for f in "$STATE_DIR/slurmctld.log" "$STATE_DIR/slurmd.log" "$STATE_DIR/slurmctld.out" \
        "$STATE_DIR/slurmd.out" /var/log/munge/munged.log; do
        [[ -r $f ]] || continue
        printf '\n----- tail -n 30 %s -----\n' "$f" >&2
        tail -n 30 "$f" >&2 || true
    done
}

fail() { log "ERROR: $*"; show_logs; exit 1; }

# Node state as sinfo reports it ("idle", "mixed", "down*", "drained", ...); empty if unreachable.
node_state() {
    SLURM_CONF="$CONF" timeout 10 sinfo -h -N -n "$(node_name)" -o '%T' 2>/dev/null | head -n1 || true
}

node_ready() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

munge_ok() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

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
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# ---------------------------------------------------------------- munge
ensure_munge() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        install -d -m 0700 -o munge -g munge /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    install -d -m 0755 -o munge -g munge /run/munge
    install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge

    munge_ok && return 0
    log "starting munged"
    # Run as the munge user when possible (it owns the key); --force tolerates a stale socket.
    local mlog=/var/log/munge/munged.log
    if ! { command -v runuser >/dev/null &&
        runuser -u munge -- munged --force --log-file="$mlog" --pid-file=/run/munge/munged.pid; }; then
        log "munged as user munge failed; starting it as root"
        munged --force --log-file="$mlog" --pid-file=/run/munge/munged.pid ||
            fail "munged failed to start"
    fi
    touch "$STATE_DIR/.munged-started-by-us"
    local i
    for ((i = 0; i < 20; i++)); do
        munge_ok && return 0
        sleep 0.5
    done
    fail "munged does not answer (munge -n | unmunge fails)"
}

# ---------------------------------------------------------------- config
write_conf() {
    local host cpus mem_total_mb mem_mb tmp
    host=$(node_name)
    cpus=${DOGFLOW_SLURM_CPUS:-$(nproc)}
    ((cpus < 8)) && [[ -z ${DOGFLOW_SLURM_CPUS:-} ]] && cpus=8
    mem_total_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
    mem_mb=${DOGFLOW_SLURM_MEM_MB:-$((mem_total_mb - 2048))}
    ((mem_mb < 1024)) && mem_mb=1024

    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool"
    tmp=$(mktemp "$STATE_DIR/slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
# Generated by dogflow infra/slurm/slurm.sh -- single-node development/CI cluster.
ClusterName=dogflow
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE_DIR}/state
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldLogFile=${STATE_DIR}/slurmctld.log
SlurmdLogFile=${STATE_DIR}/slurmd.log
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=60
# Jobs without --mem get 1 GiB per CPU instead of the whole node (which would serialise them).
DefMemPerCPU=1024
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$CONF"
        chmod 0644 "$CONF"
        CONF_CHANGED=1
        log "wrote $CONF"
    fi
    link_etc_conf
}

# /etc/slurm/slurm.conf -> $CONF, so sbatch/srun/squeue work without SLURM_CONF
# (dask-jobqueue's worker jobs, subprocesses, other shells).
link_etc_conf() {
    [[ ${DOGFLOW_SLURM_NO_ETC:-0} == 1 ]] && return 0
    mkdir -p /etc/slurm
    if [[ -L $ETC_CONF ]]; then
        [[ "$(readlink "$ETC_CONF")" == "$CONF" ]] && return 0
        rm -f "$ETC_CONF"
    elif [[ -e $ETC_CONF ]]; then
        log "moving existing $ETC_CONF to $ETC_CONF.dogflow-bak"
        mv -f "$ETC_CONF" "$ETC_CONF.dogflow-bak"
    fi
    ln -s "$CONF" "$ETC_CONF"
    log "linked $ETC_CONF -> $CONF"
}

# ---------------------------------------------------------------- daemons
start_daemons() {
    export SLURM_CONF="$CONF"
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        log "starting slurmctld"
        slurmctld -f "$CONF" >>"$STATE_DIR/slurmctld.out" 2>&1 || fail "slurmctld failed to start"
    fi
    if ! pid_alive "$STATE_DIR/slurmd.pid"; then
        log "starting slurmd"
        slurmd -f "$CONF" >>"$STATE_DIR/slurmd.out" 2>&1 || fail "slurmd failed to start"
    fi
}

wait_ready() {
    local host deadline state resumed=0
    host=$(node_name)
    deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        sleep 1
        # Check our own daemons first: a port clash makes them exit while sinfo still
        # answers from some other controller.
        pid_alive "$STATE_DIR/slurmctld.pid" || fail "slurmctld is not running"
        pid_alive "$STATE_DIR/slurmd.pid" || fail "slurmd is not running"
        state=$(node_state)
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            down* | drain* | fail*)
                if ((resumed == 0)) || ((SECONDS % 10 == 0)); then
                    log "node $host is '$state', resuming it"
                    SLURM_CONF="$CONF" scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
    done
    fail "node $host not idle after ${TIMEOUT}s (state: '$(node_state)')"
}

# Stop a daemon by pidfile: SIGTERM, bounded wait, then SIGKILL.
stop_pidfile() {
    local name=$1 f=$2 pid i
    pid_alive "$f" || { rm -f "$f"; return 0; }
    pid=$(pid_of "$f")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
        sleep 0.5
    done
    log "$name did not exit after ${TIMEOUT}s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$f"
}

# ---------------------------------------------------------------- commands
cmd_start() {
    mkdir -p "$STATE_DIR"
    ensure_packages
    ensure_munge
    CONF_CHANGED=0
    write_conf
    if ((CONF_CHANGED)) && { pid_alive "$STATE_DIR/slurmctld.pid" || pid_alive "$STATE_DIR/slurmd.pid"; }; then
        log "slurm.conf changed; restarting the daemons"
        stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
        stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
    fi
    if pid_alive "$STATE_DIR/slurmctld.pid" && pid_alive "$STATE_DIR/slurmd.pid" && node_ready; then
        log "already running; node $(node_name) is $(node_state) (SLURM_CONF=$CONF)"
        return 0
    fi
    start_daemons
    wait_ready
    log "ready: node $(node_name) is $(node_state) (SLURM_CONF=$CONF)"
}

cmd_stop() {
    export SLURM_CONF="$CONF"
    if pid_alive "$STATE_DIR/slurmctld.pid"; then
        local deadline
        log "cancelling all jobs"
        local ids
        ids=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        # shellcheck disable=SC2086  # word splitting of the job id list is intended
        [[ -z $ids ]] || timeout 10 scancel $ids >/dev/null 2>&1 || true
        deadline=$((SECONDS + TIMEOUT / 2))
        while ((SECONDS < deadline)) &&
            [[ -n "$(timeout 10 squeue -h -t PD,R,CG,CF,S -o %i 2>/dev/null || true)" ]]; do
            sleep 1
        done
    fi
    stop_pidfile slurmd "$STATE_DIR/slurmd.pid"
    stop_pidfile slurmctld "$STATE_DIR/slurmctld.pid"
    if [[ ${DOGFLOW_SLURM_STOP_MUNGE:-0} == 1 && -e $STATE_DIR/.munged-started-by-us ]]; then
        stop_pidfile munged /run/munge/munged.pid
        rm -f "$STATE_DIR/.munged-started-by-us"
    fi
    log "stopped"
}

cmd_status() {
    export SLURM_CONF="$CONF"
    local rc=0
    [[ -f $CONF ]] || { echo "no $CONF (run: bash infra/slurm/slurm.sh start)"; return 1; }
    pid_alive "$STATE_DIR/slurmctld.pid" && echo "slurmctld: running (pid $(pid_of "$STATE_DIR/slurmctld.pid"))" ||
        { echo "slurmctld: not running"; rc=1; }
    pid_alive "$STATE_DIR/slurmd.pid" && echo "slurmd: running (pid $(pid_of "$STATE_DIR/slurmd.pid"))" ||
        { echo "slurmd: not running"; rc=1; }
    if ((rc == 0)); then
        timeout 10 sinfo -N -l || rc=1
        timeout 10 squeue || rc=1
        node_ready || rc=1
    fi
    ((rc == 0)) && echo "ready (SLURM_CONF=$CONF)" || echo "not ready"
    return $rc
}

cmd_env() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

main() {
    local cmd=${1:-}
    case "$cmd" in
        start | stop | status) ;;
        env) cmd_env; return 0 ;;
        -h | --help | help) usage; return 0 ;;
        *) usage >&2; return 2 ;;
    esac
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "must run as root (SlurmUser=root) and sudo is not available"
        exec sudo --preserve-env=DOGFLOW_SLURM_DIR,DOGFLOW_SLURM_TIMEOUT,DOGFLOW_SLURM_CPUS,DOGFLOW_SLURM_MEM_MB,DOGFLOW_SLURM_STOP_MUNGE,DOGFLOW_SLURM_NO_ETC \
            bash "$0" "$@"
    fi
    "cmd_$cmd"
}

main "$@"
