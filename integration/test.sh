#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, BPF program tests,
# engine and end-to-end tests in network namespaces. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash integration/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked --no-fail-fast
