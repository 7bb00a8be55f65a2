#!/usr/bin/env bash
# The one command that runs every test on a fresh machine: set-up, lint, build once, test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE=1

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# One build of every target, then the tests (unit, integration, end-to-end).
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
