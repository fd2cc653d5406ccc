#!/usr/bin/env bash
# Installs what Veil's build, demo and tests need on a fresh Debian machine (as root).
# Idempotent: does nothing when everything is already there.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: Veil's demo and tests create network namespaces, TUN devices and BPF programs: run as root" >&2
        exit 1
    fi
}

packages=(clang-19 llvm-19 libbpf-dev bpftool iproute2 wireguard-tools wireguard-go tcpdump iperf3 iputils-ping)
commands=(clang-19 bpftool ip wg wireguard-go tcpdump iperf3 ping)

missing=0
for c in "${commands[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing=1
done
[ -f /usr/include/bpf/bpf_helpers.h ] || missing=1

if [ "$missing" -eq 1 ]; then
    need_root
    echo "setup: installing ${packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

for c in "${commands[@]}"; do
    command -v "$c" >/dev/null 2>&1 || { echo "setup: $c is still missing after install" >&2; exit 1; }
done
need_root
# bpffs and the WireGuard UAPI directory, as a node would have them.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /var/run/wireguard
