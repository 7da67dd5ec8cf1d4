#!/bin/sh
# Side-by-side single-flow TCP throughput between two network namespaces joined by a veth:
# plain veth, wireguard-go, boringtun-cli and trellis-gateway. The starting line of the
# gateway speed issue, not a verdict: run it on an idle machine, more than once.
#
#   gateway/bench/baseline.sh [seconds per run] [rounds]
#
# Needs root, iperf3, wireguard-go, wg, and boringtun-cli and trellis-gateway on PATH (or
# BORINGTUN / TRELLIS_GATEWAY set). Everything runs in namespaces this script creates; every
# process it starts is stopped by PID and every namespace removed on exit, also on failure.
set -eu

SECONDS_PER_RUN=${1:-8}
ROUNDS=${2:-2}
BORINGTUN=${BORINGTUN:-boringtun-cli}
TRELLIS_GATEWAY=${TRELLIS_GATEWAY:-trellis-gateway}
TAG=$$
L=bench-l-$TAG
R=bench-r-$TAG
WORK=$(mktemp -d)
PIDS=""

cleanup() {
    for pid in $PIDS; do kill "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in $PIDS; do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$L" 2>/dev/null || true
    ip netns del "$R" 2>/dev/null || true
    rm -f /var/run/wireguard/wgo-l-$TAG.sock /var/run/wireguard/wgo-r-$TAG.sock \
        /var/run/wireguard/wbt-l-$TAG.sock /var/run/wireguard/wbt-r-$TAG.sock
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

start() { # start <netns> <command...>: background, remember the PID
    ns=$1; shift
    ip netns exec "$ns" "$@" >>"$WORK/log" 2>&1 &
    PIDS="$PIDS $!"
    LAST=$!
}

stop() { # stop <pid>
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

ip netns add "$L"
ip netns add "$R"
ip -n "$L" link set lo up
ip -n "$R" link set lo up
ip -n "$L" link add underlay type veth peer name underlay netns "$R"
ip -n "$L" addr add 198.18.1.1/24 dev underlay
ip -n "$R" addr add 198.18.1.2/24 dev underlay
ip -n "$L" link set underlay up
ip -n "$R" link set underlay up

measure() { # measure <label> <server address> <client bind address>
    start "$R" iperf3 -s -1 -B "$2"
    server=$LAST
    sleep 0.5
    before=$(ip netns exec "$R" awk '/^Udp:/ && $2 ~ /^[0-9]/ {print $6}' /proc/net/snmp)
    if ip netns exec "$L" iperf3 -c "$2" -B "$3" -t "$SECONDS_PER_RUN" -J >"$WORK/out.json" 2>>"$WORK/log"; then
        gbps=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))' "$WORK/out.json")
    else
        gbps="failed"
    fi
    after=$(ip netns exec "$R" awk '/^Udp:/ && $2 ~ /^[0-9]/ {print $6}' /proc/net/snmp)
    stop "$server"
    printf '%-16s %8s Gbit/s   (receiver UDP RcvbufErrors +%s)\n' "$1" "$gbps" "$((after - before))"
}

# Each tunnel: the same key pair roles, addresses 10.1.0.1 (left) and 10.2.0.1 (right).
ip -n "$L" addr add 10.1.0.1/32 dev lo
ip -n "$R" addr add 10.2.0.1/32 dev lo

kernel_style_up() { # kernel_style_up <daemon> <prefix>: a wg-configured userspace tunnel
    daemon=$1; prefix=$2
    kl=$(wg genkey); kr=$(wg genkey)
    pl=$(echo "$kl" | wg pubkey); pr=$(echo "$kr" | wg pubkey)
    for side in l r; do
        if [ $side = l ]; then ns=$L; else ns=$R; fi
        name=$prefix-$side-$TAG
        case $daemon in
            wireguard-go) start "$ns" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f "$name" ;;
            boringtun) start "$ns" "$BORINGTUN" -f --disable-drop-privileges --log "$WORK/bt-$side.log" "$name" ;;
        esac
        eval "pid_$side=\$LAST"
    done
    for _ in $(seq 50); do
        [ -S /var/run/wireguard/$prefix-l-$TAG.sock ] && [ -S /var/run/wireguard/$prefix-r-$TAG.sock ] && break
        sleep 0.1
    done
    echo "$kl" >"$WORK/kl"; echo "$kr" >"$WORK/kr"
    wg set "$prefix-l-$TAG" listen-port 51820 private-key "$WORK/kl" peer "$pr" endpoint 198.18.1.2:51820 allowed-ips 10.2.0.0/24
    wg set "$prefix-r-$TAG" listen-port 51820 private-key "$WORK/kr" peer "$pl" endpoint 198.18.1.1:51820 allowed-ips 10.1.0.0/24
    ip -n "$L" link set "$prefix-l-$TAG" up
    ip -n "$R" link set "$prefix-r-$TAG" up
    ip -n "$L" route replace 10.2.0.0/24 dev "$prefix-l-$TAG"
    ip -n "$R" route replace 10.1.0.0/24 dev "$prefix-r-$TAG"
}

kernel_style_down() {
    stop "$pid_l"; stop "$pid_r"
    ip -n "$L" route del 10.2.0.0/24 2>/dev/null || true
    ip -n "$R" route del 10.1.0.0/24 2>/dev/null || true
}

trellis_up() {
    mkdir -p "$WORK/tl" "$WORK/tr"
    kl=$("$TRELLIS_GATEWAY" public-key --state-dir "$WORK/tl")
    kr=$("$TRELLIS_GATEWAY" public-key --state-dir "$WORK/tr")
    cat >"$WORK/tl/state.json" <<JSON
{"cluster": "bench", "nodes": [{"name": "right", "cluster": "bench", "public_key": "$kr",
  "endpoint": "198.18.1.2:51820", "pod_cidrs": ["10.2.0.0/24"]}]}
JSON
    cat >"$WORK/tr/state.json" <<JSON
{"cluster": "bench", "nodes": [{"name": "left", "cluster": "bench", "public_key": "$kl",
  "endpoint": "198.18.1.1:51820", "pod_cidrs": ["10.1.0.0/24"]}]}
JSON
    start "$L" env RUST_LOG=warn "$TRELLIS_GATEWAY" run --state-dir "$WORK/tl" --desired-state "$WORK/tl/state.json"
    pid_l=$LAST
    start "$R" env RUST_LOG=warn "$TRELLIS_GATEWAY" run --state-dir "$WORK/tr" --desired-state "$WORK/tr/state.json"
    pid_r=$LAST
    for _ in $(seq 50); do
        ip -n "$L" route show 10.2.0.0/24 | grep -q trellis0 && ip -n "$R" route show 10.1.0.0/24 | grep -q trellis0 && break
        sleep 0.1
    done
}

trellis_down() {
    stop "$pid_l"; stop "$pid_r"
    # The gateway leaves fail-closed backstops behind; clear them for the next contender.
    ip -n "$L" route flush proto 212 2>/dev/null || true
    ip -n "$R" route flush proto 212 2>/dev/null || true
}

echo "single TCP flow, ${SECONDS_PER_RUN}s per run, $ROUNDS rounds, $(nproc) CPUs"
for round in $(seq "$ROUNDS"); do
    echo "-- round $round"
    measure "veth (plain)" 198.18.1.2 198.18.1.1
    kernel_style_up wireguard-go wgo
    measure "wireguard-go" 10.2.0.1 10.1.0.1
    kernel_style_down
    kernel_style_up boringtun wbt
    measure "boringtun-cli" 10.2.0.1 10.1.0.1
    kernel_style_down
    trellis_up
    measure "trellis-gateway" 10.2.0.1 10.1.0.1
    trellis_down
done
