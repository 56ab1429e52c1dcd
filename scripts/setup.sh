# shellcheck shell=bash
# Shared setup for scripts/test and scripts/demo. Source it, do not run it:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
#   meterd_setup            # venv + editable install + service binaries
#
# After sourcing, the current directory is the repo root and these are set:
#   METERD_ROOT  absolute path of the repo
#   METERD_VENV  the virtualenv (.venv), with the project installed as '.[test,fast]'
# Functions: meterd_step, meterd_quiet, meterd_setup_venv, meterd_setup_services,
# meterd_setup (both). Every step prints one line; a failing step prints its log tail.

METERD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
METERD_VENV="$METERD_ROOT/.venv"
export METERD_ROOT METERD_VENV
cd "$METERD_ROOT" || return 1

# Debian package -> the binary that proves it is installed.
declare -A METERD_APT_BINARIES=(
    [mosquitto]=mosquitto
    [influxdb]=influxd
    [victoria-metrics]=victoria-metrics
)

meterd_step() {
    printf '==> %s\n' "$*"
}

# Run a command with its output captured; show the tail only if it fails.
meterd_quiet() {
    local log status=0
    log="$(mktemp "${TMPDIR:-/tmp}/meterd-setup.XXXXXX")"
    "$@" >"$log" 2>&1 || status=$?
    if ((status != 0)); then
        printf 'FAILED (exit %d): %s\n' "$status" "$*" >&2
        tail -n 40 "$log" >&2
    fi
    rm -f "$log"
    return "$status"
}

# Prefix for commands that need root: nothing as root, 'sudo -n' otherwise.
meterd_as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        printf 'need root (or sudo) to run: %s\n' "$*" >&2
        return 1
    fi
}

meterd_find_binary() {
    # Daemons live in /usr/sbin, which is not on a normal user's PATH.
    command -v "$1" 2>/dev/null && return 0
    local dir
    for dir in /usr/sbin /usr/bin /sbin; do
        if [[ -x "$dir/$1" ]]; then
            printf '%s\n' "$dir/$1"
            return 0
        fi
    done
    return 1
}

meterd_pyproject_hash() {
    sha256sum pyproject.toml | cut -d' ' -f1
}

meterd_setup_venv() {
    local stamp="$METERD_VENV/.meterd-installed"
    if [[ ! -x "$METERD_VENV/bin/python" ]]; then
        meterd_step "creating $METERD_VENV"
        if ! python3 -m venv "$METERD_VENV" >/dev/null 2>&1; then
            # Debian's python3 ships venv/ensurepip in a separate package.
            rm -rf "$METERD_VENV"
            meterd_apt_install python3-venv
            meterd_quiet python3 -m venv "$METERD_VENV"
        fi
    fi
    # Reinstall only when pyproject.toml changed since the last successful install.
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$(meterd_pyproject_hash)" ]]; then
        meterd_step "python deps up to date (.venv)"
        return 0
    fi
    meterd_step "pip install -e '.[test,fast]'"
    PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
        meterd_quiet "$METERD_VENV/bin/python" -m pip install --quiet -e '.[test,fast]'
    meterd_pyproject_hash >"$stamp"
}

# apt-get install without starting the packages' services. Runs in a subshell so
# its EXIT trap (removing our temporary policy-rc.d) cannot clobber the caller's.
meterd_apt_install() (
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e "$policy" ]]; then
        meterd_as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
        created_policy=1
    fi
    # shellcheck disable=SC2317  # invoked by the trap
    cleanup() {
        if ((created_policy)); then meterd_as_root rm -f "$policy"; fi
    }
    trap cleanup EXIT
    local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -y
        -o DPkg::Lock::Timeout=300
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    meterd_step "apt-get update"
    meterd_quiet meterd_as_root "${apt[@]}" update
    meterd_step "apt-get install $*"
    meterd_quiet meterd_as_root "${apt[@]}" install --no-install-recommends "$@"
)

meterd_setup_services() {
    local package missing=()
    for package in "${!METERD_APT_BINARIES[@]}"; do
        if ! meterd_find_binary "${METERD_APT_BINARIES[$package]}" >/dev/null; then
            missing+=("$package")
        fi
    done
    if ((${#missing[@]} == 0)); then
        meterd_step "services installed (mosquitto, influxd, victoria-metrics)"
        return 0
    fi
    meterd_apt_install "${missing[@]}"
    for package in "${missing[@]}"; do
        if ! meterd_find_binary "${METERD_APT_BINARIES[$package]}" >/dev/null; then
            printf 'package %s installed but %s not found\n' \
                "$package" "${METERD_APT_BINARIES[$package]}" >&2
            return 1
        fi
    done
}

meterd_setup() {
    meterd_setup_services
    meterd_setup_venv
}
