# Shared by the service scripts (infra/slurm/slurm.sh, infra/sge/sge.sh, infra/postgres/postgres.sh): their
# log lines and the install of their Debian packages. Source it after setting NAME (the log prefix) and
# PACKAGES; APT_OPTS (extra apt-get install options) and a function `preseed` (debconf answers, run before
# the install) are optional.

log() { printf '[%s] %s\n' "$NAME" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$NAME" "$*" >&2; exit 1; }

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
    if declare -F preseed >/dev/null; then preseed; fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # the packages' init scripts may not start the daemons here (policy-rc.d); the scripts start them
    apt-get install -y -qq ${APT_OPTS[@]+"${APT_OPTS[@]}"} "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}
