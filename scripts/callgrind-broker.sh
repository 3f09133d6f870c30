#!/usr/bin/env bash
# Instructions the broker executes per message, counted by callgrind: exact and repeatable,
# unlike times on a shared machine. A fixed workload (1 publisher -> 1 consumer on one
# address, 64-byte bodies, one shard) is driven by the `mbws` CLI clients; the broker runs
# under valgrind, and the total of its instructions is divided by the message count.
#
#   scripts/callgrind-broker.sh [--count N] [--broker PATH] [--out FILE] [-- SEND FLAGS...]
#
# e.g. `scripts/callgrind-broker.sh --count 100000 -- --light` for MBLWS publishes.
# Prints "instructions per message: N" and leaves the profile in --out (default
# callgrind.broker.out) for `callgrind_annotate`. The broker's start-up is included in the
# total (about 0.1% at 100,000 messages). Needs valgrind; builds the release binaries.
set -euo pipefail

count=100000
broker=""
out="callgrind.broker.out"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --count) count=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "callgrind-broker.sh: unknown flag '$1' (--count N, --broker PATH, --out FILE, -- SEND FLAGS)" >&2; exit 2 ;;
    esac
done
command -v valgrind >/dev/null || { echo "callgrind-broker.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }

cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
broker=${broker:-target/release/mbws-broker}
client=target/release/mbws
work=$(mktemp -d)
broker_pid=""
consumer_pid=""
cleanup() {
    [[ -n $consumer_pid ]] && kill "$consumer_pid" 2>/dev/null || true
    [[ -n $broker_pid ]] && kill -KILL "$broker_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# No admin API (it would take port 7448, which another broker may hold); an older --broker
# without the flag runs as it is.
admin=()
if "$broker" --help 2>/dev/null | grep -q -- '--admin-listen'; then
    admin=(--admin-listen off)
fi
valgrind --tool=callgrind --callgrind-out-file="$work/profile" \
    "$broker" --shards 1 --listen "127.0.0.1:0" --data-dir "$work/data" "${admin[@]}" 2>"$work/broker.log" &
broker_pid=$!
# Port 0: the kernel picks a free port (two runs at once, or a broker on 7447, never clash).
# The whole log line must be there, with the address and the space after it, before we read it.
listen=""
for _ in $(seq 1200); do
    listen=$(sed -n 's/.* listening on \([0-9.]*:[0-9]*\) .*/\1/p' "$work/broker.log" | head -1)
    [[ -n $listen ]] && break
    kill -0 "$broker_pid" 2>/dev/null || { cat "$work/broker.log" >&2; exit 1; }
    sleep 0.1
done
[[ -n $listen ]] || { echo "callgrind-broker.sh: the broker did not say where it listens within 120 s" >&2; cat "$work/broker.log" >&2; exit 1; }
url="ws://$listen/"
body=$(head -c 64 /dev/zero | tr '\0' x)
"$client" consume perf --url "$url" --count "$count" --quiet --timeout 60 >/dev/null 2>"$work/consume.log" &
consumer_pid=$!
sleep 0.5
"$client" send perf "$body" --url "$url" --count "$count" --wait 60 "$@" >/dev/null 2>"$work/send.log"
wait "$consumer_pid"
consumer_pid=""
# valgrind's broker does not see SIGTERM through sigwait: dump the counts, then stop it.
callgrind_control -d "$broker_pid" >/dev/null 2>&1
sleep 1
kill -KILL "$broker_pid" 2>/dev/null || true
wait "$broker_pid" 2>/dev/null || true
broker_pid=""
dump=$(ls "$work"/profile.* | tail -1)
cp "$dump" "$out"
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "messages: $count, broker instructions: $total"
echo "instructions per message: $((total / count))"
