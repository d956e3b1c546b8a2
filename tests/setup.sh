#!/usr/bin/env bash
# Installs what the test suite needs, idempotently and quickly when already
# there: PostgreSQL running on 127.0.0.1:5432 (trust auth for `postgres`),
# the Helm chart checks' Python virtualenv, Debian's chromium, and
# clients/web's npm packages. `.ci/run` runs it before `cargo test`; the
# chart and browser tests run the part they need themselves when it is
# missing, so `cargo test` alone works on a fresh machine.
#
# Usage: tests/setup.sh [postgres|chart|browser|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "tests/setup.sh: installing $* needs root (apt-get)" >&2
    return 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

postgres() {
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    apt_install postgresql
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
    for _ in $(seq 1 30); do
      pg_isready -h 127.0.0.1 -p 5432 -q && break
      sleep 1
    done
  fi
  pg_isready -h 127.0.0.1 -p 5432
}

# The chart checks (helm/tests/check.py): a virtualenv with the pinned
# packages of helm/tests/requirements.txt, installed again only when that
# file changes.
chart() {
  local venv=helm/tests/.venv
  if cmp -s helm/tests/requirements.txt "$venv/requirements.installed"; then
    return 0
  fi
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    -r helm/tests/requirements.txt
  cp helm/tests/requirements.txt "$venv/requirements.installed"
}

# The browser tests (tests/browser.rs): Debian's chromium, and clients/web's
# npm dependencies, installed again only when package-lock.json is newer
# than the install. The tests build what they run themselves.
browser() {
  if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "tests/setup.sh: no npm on PATH: the clients/web tests need Node >= 20" >&2
    return 1
  fi
  if [ ! -f clients/web/node_modules/.package-lock.json ] ||
    [ clients/web/package-lock.json -nt clients/web/node_modules/.package-lock.json ]; then
    (cd clients/web && npm ci --no-audit --no-fund --loglevel=error)
  fi
}

case "${1:-all}" in
  postgres) postgres ;;
  chart) chart ;;
  browser) browser ;;
  all) postgres; chart; browser ;;
  *) echo "usage: tests/setup.sh [postgres|chart|browser|all]" >&2; exit 2 ;;
esac
