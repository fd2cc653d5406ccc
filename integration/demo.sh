#!/usr/bin/env bash
# The README's demo: installs what it needs, builds, and runs a 3-node x 2-pod
# cluster in network namespaces with one veil-agent per node. It shows (and
# checks) encrypted pod traffic, `wg show`, and underlay captures with Veil on,
# off (the plaintext canary is caught) and on again. Needs root; touches nothing
# outside the namespaces it creates, and removes them when it ends (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "demo: cargo not found; install Rust stable first (https://rustup.rs)" >&2
    exit 1
fi
bash integration/setup.sh

# Release: the userspace WireGuard engine at realistic speed. The demo is a
# harness = false test target, so cargo builds veil-agent, veilctl and veil-probe
# for it and shows its output as it runs.
echo "demo: building (release; the first build takes a few minutes)"
exec cargo test --release --test demo
