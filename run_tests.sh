#!/usr/bin/env bash
# The one test command, for a fresh machine as for a developer's:
#
#   ./run_tests.sh [pytest arguments...]
#
# 1. As root, installs the real DNS peers the integration tests run against (Debian
#    packages), when any of their programs is missing; /usr/sbin/policy-rc.d (exit 101)
#    stays in place during the install so that no DNS daemon starts.
# 2. Creates .venv (Python 3.11) if missing and installs requirements.txt into it, again
#    only when requirements.txt changed since the last install (hash in .venv).
# 3. Runs .venv/bin/python -m pytest "$@"; the exit code is pytest's.
#
# Without root the peers are not installed: integration tests whose programs are missing
# are skipped, or fail when DNSTAP_REQUIRE_PEERS=1 (as in CI).
set -euo pipefail
cd "$(dirname "$0")"

log() { echo "run_tests.sh: $*" >&2; }

PEER_PROGRAMS=(unbound fstrm_replay fstrm_capture dnstap-ldns dnstap dnsperf dig ip unshare prometheus rsyslogd tcpdump systemd-analyze systemd-sysusers chromium chromedriver)
PEER_PACKAGES=(unbound fstrm-bin dnstap-ldns golang-github-dnstap-golang-dnstap-cli dnsperf bind9-dnsutils iproute2 util-linux prometheus rsyslog postgresql tcpdump systemd chromium chromium-driver)
SBIN_PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

. scripts/ensure_venv.sh

have() { PATH="$SBIN_PATH" command -v "$1" >/dev/null 2>&1; }

# --- 1. system packages (root only) -------------------------------------------------
apt_packages=()
for prog in "${PEER_PROGRAMS[@]}"; do
    if ! have "$prog"; then apt_packages=("${PEER_PACKAGES[@]}"); break; fi
done
# PostgreSQL's server programs are not on PATH.
for initdb in /usr/lib/postgresql/*/bin/initdb; do
    [ -x "$initdb" ] || apt_packages=("${PEER_PACKAGES[@]}")
done
if [ ! -x .venv/bin/python ]; then
    py="$(pick_python || true)"
    if [ -z "$py" ]; then
        apt_packages+=(python3 python3-venv)
    elif ! "$py" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_packages+=(python3-venv)
    fi
fi

if [ "${#apt_packages[@]}" -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        created_policy=0
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\n# installed by run_tests.sh: start no daemon on package install\nexit 101\n' \
                > /usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            created_policy=1
        fi
        remove_policy() { if [ "$created_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
        trap remove_policy EXIT
        log "installing ${apt_packages[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            "${apt_packages[@]}" >/dev/null
        remove_policy
        trap - EXIT
    else
        log "cannot install ${apt_packages[*]} (needs root and apt-get); integration tests needing them will skip"
    fi
fi

# --- 2. virtualenv --------------------------------------------------------------------
ensure_venv

# --- 3. tests -------------------------------------------------------------------------
exec .venv/bin/python -m pytest "$@"
