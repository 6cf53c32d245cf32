#!/usr/bin/env bash
# Install the Debian packages the testbed uses, only those that are missing.
# curl: the real SOCKS/HTTP client; tcpdump: link captures; iptables: the
# NFQUEUE hook of link shaping; iperf3: bulk baselines; microsocks and
# dante-server: real SOCKS servers the experiments compare against; tinyproxy:
# the real HTTP forward proxy they compare against (tinyproxy-bin is the
# binary alone: the tinyproxy package adds an init script that would run a
# system-wide proxy on port 8888, and the suite starts its own in a namespace).
# proxychains4: iperf3 through the SOCKS proxies in the benchmarks (bench/).
# clang, libbpf-dev: `make fastpath` (the tc eBPF program); gcc: the test that
# checks the map layout's C side; ethtool: the fast path's checksum test.
set -euo pipefail
declare -A need=(
  [curl]=curl [tcpdump]=tcpdump [iptables]=iptables [iperf3]=iperf3
  [microsocks]=microsocks [danted]=dante-server [clang]=clang [gcc]=gcc [ethtool]=ethtool
  [proxychains4]=proxychains4 [tinyproxy]=tinyproxy-bin
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
[ -e /usr/include/bpf/libbpf.h ] || missing+=(libbpf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root, or apt-get install them)" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
