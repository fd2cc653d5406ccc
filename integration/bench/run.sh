#!/usr/bin/env bash
# The data plane benchmark (issue 6), in one command: plain routing, Veil,
# stock wireguard-go and (when installed) gotatun, pod to pod across two node
# namespaces, interleaved round-robin (median of 3 x 5 s per figure), then the
# agent's memory with 1,000 pods / 100 nodes in its state. Prints the table and
# writes integration/bench/RESULTS.md. About 8 minutes. Needs root; touches
# nothing outside the namespaces it creates and removes them when it ends
# (also on failure and Ctrl-C).
#
#   bash integration/bench/run.sh [--note "what else ran"] [--out FILE] [--no-memory]
#
# gotatun is optional: `cargo install gotatun-cli --locked` (or GOTATUN_BIN=path).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "bench: cargo not found; install Rust stable first (https://rustup.rs)" >&2
    exit 1
fi
bash integration/setup.sh

# The engine and the latency probe run as release builds; the bench driver (a
# harness = false test target, so it can use the namespace harness) only sets
# things up and reads results, so it runs in the test profile: no release build
# of the dev-dependencies. Both builds are incremental after the first.
echo "bench: building veil-agent and veil-probe (release; the first build takes a few minutes)"
cargo build --release --locked --bin veil-agent --bin veil-probe
export VEIL_AGENT_BIN="$PWD/target/release/veil-agent"
export VEIL_PROBE_BIN="$PWD/target/release/veil-probe"
exec cargo test --locked --test bench -- --full "$@"
