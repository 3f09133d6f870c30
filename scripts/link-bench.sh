#!/usr/bin/env bash
# Throughput through a link (docs/CLUSTER.md, "Links"), against the same path without one, in
# the same run so the ratio compares like with like:
#
#   scripts/link-bench.sh [COUNT]     default 200000 messages of 64 bytes
#
# Starts two release brokers on loopback (B, and A with an `out` link to B for "bench"), then
# 1. direct: `mbws send` to B, `mbws consume` on B;
# 2. link:   `mbws send` to A, the link carries it to B, `mbws consume` on B.
# Each line prints the consumer's count, time and rate. It stops only the brokers it started,
# by PID. Environment: MBWS_BROKER / MBWS_CLI for other binaries; --no-build skips the build.
set -euo pipefail
count=200000
build=1
for arg in "$@"; do
    case "$arg" in
        --no-build) build=0 ;;
        *) count="$arg" ;;
    esac
done
cd "$(dirname "$0")/.."
if [[ $build == 1 ]]; then
    cargo build --release --bin mbws-broker --bin mbws >&2
fi
broker=${MBWS_BROKER:-target/release/mbws-broker}
cli=${MBWS_CLI:-target/release/mbws}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts a broker on a free port; prints its URL once it listens.
start_broker() {
    local name=$1; shift
    "$broker" --listen 127.0.0.1:0 --admin-listen off --shards 1 --data-dir "$work/$name" "$@" 2>"$work/$name.log" &
    pids+=($!)
    for _ in $(seq 200); do
        if grep -q " listening on " "$work/$name.log"; then
            echo "ws://$(grep -o 'listening on [^ ]*' "$work/$name.log" | head -1 | cut -d' ' -f3)/"
            return
        fi
        sleep 0.05
    done
    echo "broker $name did not start: $(cat "$work/$name.log")" >&2
    exit 1
}

b=$(start_broker b)
cat >"$work/a.toml" <<TOML
[[link]]
name = "to-b"
url = "$b"
direction = "out"
addresses = ["bench"]
target-prefix = "a."
TOML
a=$(start_broker a --config "$work/a.toml")
for _ in $(seq 200); do grep -q "link to-b: up" "$work/a.log" && break; sleep 0.05; done
body=$(head -c 64 /dev/zero | tr '\0' x)

run() {
    local label=$1 send_url=$2 address=$3 consume_address=$4
    "$cli" consume "$consume_address" --url "$b" --count "$count" --quiet --timeout 60 >"$work/$label.out" 2>&1 &
    local consumer=$!
    sleep 0.3 # The consumer's SUBSCRIBE first (the address queues meanwhile anyway).
    "$cli" send "$address" "$body" --url "$send_url" --count "$count" >/dev/null
    wait "$consumer"
    echo "$label: $(tail -1 "$work/$label.out")"
}
run direct "$b" bench bench
run link "$a" bench a.bench
