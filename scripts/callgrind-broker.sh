#!/usr/bin/env bash
# Instructions the broker executes per message, counted by callgrind: exact and repeatable,
# unlike times on a shared machine. A fixed workload (1 publisher -> 1 consumer on one
# address, 64-byte bodies, one shard) is driven by the `mbws` CLI clients; the broker runs
# under valgrind, and the total of its instructions is divided by the message count.
#
#   scripts/callgrind-broker.sh [--count N] [--shards N] [--broker PATH] [--out FILE] [--tls]
#                               [--tls-records in-place|rustls] [--fanout N] [--light]
#                               [-- SEND FLAGS...]
#
# MBWS_CLIENT=PATH uses that `mbws` client instead of building one.
#
# --fanout N (one shard) drives fan-out instead: N multicast consumers on the address, each
# getting every message, and prints instructions per delivery (the total over count x N) as
# well. The consumers subscribe before the publisher starts (the broker's log shows their N
# connections, then a wait for the SUBSCRIBEs); a consumer that misses a message times out
# and fails the run.
#
# e.g. `scripts/callgrind-broker.sh --count 100000 -- --light` for MBLWS publishes (numbered
# SENDs that wait for RECEIPTs, to an MBWS consumer).
#
# --light drives MBLWS as `scripts/bench.sh`'s mbws-light target does: the publisher sends
# unnumbered SENDs (seq 0, `mbws send --light --unnumbered`: no RECEIPTs, paced by TCP and the
# broker's at-most-once lead) and the consumer is an MBLWS session too (client acks every
# credit/4 deliveries, credit 1000), as mbws-bench's MBLWS publisher and consumer are.
#
# --tls-records MODE (with --tls) passes the broker that record layer (docs/SECURITY.md, "The
# record layer"): the two layers compared on one binary.
#
# --tls runs the same workload over wss:// (the broker serves TLS with a throwaway ECDSA P-256
# certificate made by openssl; both clients trust it with --ca-file): the instructions TLS adds
# per message, against a run without it, on a machine too busy for timings to mean much.
#
# --shards N (N >= 2) measures the cross-shard path: the address is named so that shard 0 owns
# it, and the consumer and the publisher are kept off shard 0 (the kernel spreads connections
# over the shards' listeners, so a consumer that lands on shard 0 is started again, and a
# whole run whose publisher landed there is repeated, up to 6 times). With N >= 3 the consumer
# and the publisher are also kept apart: publisher, owner and consumer on three shards.
#
# Valgrind 3.19 (Debian 12's) runs io_uring_enter as a syscall that never blocks: a shard
# thread waiting for completions keeps valgrind's one-thread-at-a-time lock, so no other
# thread runs until a completion arrives for it (seen with `valgrind --tool=none
# --trace-syscalls=yes`: a blocking call is marked [async], io_uring_enter never is). With one
# shard this only delays the main thread's "listening on" line until the shard's first
# completion, which nothing brings until a client connects: the script listens on a known port
# and pokes it with a connection every 0.1 s until the line is there (without the pokes a
# start on a loaded machine often waited past its 120 s bound). With two or more, the owner
# shard, which has no connection of its own, would wait for a wake-up that only the other
# shard (then stopped) can post, and the run would hang: so the broker runs with
# MBWS_PROFILER_WAKE_MS=1, which makes each shard wake every millisecond and yield its thread
# (src/shard/mod.rs, PROFILER_WAKE_ENV). Those wake-ups are counted in the total, which then
# depends on how long the run took, not only on the messages: with --shards the figure to
# compare is "instructions per message in the message tasks", the connections' tasks (reads,
# decode, session, writes) and the shards' inbox tasks (cross-shard envelopes and the rounds
# of work they run), inclusive, which every run prints beside the total.
# Prints "instructions per message: N" and leaves the profile in --out (default
# callgrind.broker.out) for `callgrind_annotate`. The broker's start-up is included in the
# total (about 0.1% at 100,000 messages). Needs valgrind; builds the release binaries (with
# --broker, only the `mbws` client it drives the broker with).
set -euo pipefail

count=100000
shards=1
broker=""
out="callgrind.broker.out"
tls=0
tls_records=""
fanout=0
light=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --count) count=$2; shift 2 ;;
        --shards) shards=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --tls) tls=1; shift ;;
        --tls-records) tls_records=$2; shift 2 ;;
        --fanout) fanout=$2; shift 2 ;;
        --light) light=1; shift ;;
        --) shift; break ;;
        *) echo "callgrind-broker.sh: unknown flag '$1' (--count N, --shards N, --broker PATH, --out FILE, --tls, --tls-records MODE, --fanout N, --light, -- SEND FLAGS)" >&2; exit 2 ;;
    esac
done
[[ $shards =~ ^[1-9][0-9]*$ ]] || { echo "callgrind-broker.sh: --shards takes a number of shards (1 or more), not '$shards'" >&2; exit 2; }
[[ $fanout =~ ^[0-9]+$ ]] || { echo "callgrind-broker.sh: --fanout takes a number of consumers, not '$fanout'" >&2; exit 2; }
((fanout == 0 || shards == 1)) || { echo "callgrind-broker.sh: --fanout runs on one shard only" >&2; exit 2; }
((fanout == 0 || light == 0)) || { echo "callgrind-broker.sh: --light drives 1 -> 1 only, not --fanout" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "callgrind-broker.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 2; }

cd "$(dirname "$0")/.."
if [[ -n ${MBWS_CLIENT:-} ]]; then
    : # the client given (MBWS_CLIENT=PATH), nothing built
elif [[ -n $broker ]]; then
    cargo build --release --quiet -p mbws-client --bin mbws
else
    cargo build --release --quiet --bins
fi
broker=${broker:-target/release/mbws-broker}
# How long the 1 -> 1 clients wait for the broker (seconds): the cross-shard runs are slower
# under valgrind (the shards take turns, a millisecond at a time).
client_wait=60
((shards > 1)) && client_wait=600
client=${MBWS_CLIENT:-target/release/mbws}
# --light: both clients speak MBLWS, the publisher's SENDs unnumbered (as mbws-bench's).
client_mode=()
send_mode=()
if ((light)); then
    client_mode=(--light)
    send_mode=(--unnumbered)
fi
work=$(mktemp -d)
broker_pid=""
consumer_pid=""
fanout_pids=()
cleanup() {
    [[ -n $consumer_pid ]] && kill "$consumer_pid" 2>/dev/null || true
    for pid in "${fanout_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
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
# TLS: a throwaway certificate for localhost, the broker's flags, and the clients' trust.
tls_flags=()
client_tls=()
if ((tls)); then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE \
        -keyout "$work/key.pem" -out "$work/cert.pem" >"$work/openssl.log" 2>&1 \
        || { echo "callgrind-broker.sh: openssl could not make a certificate for --tls:" >&2; cat "$work/openssl.log" >&2; exit 2; }
    tls_flags=(--tls-cert "$work/cert.pem" --tls-key "$work/key.pem")
    [[ -n $tls_records ]] && tls_flags+=(--tls-records "$tls_records")
    client_tls=(--ca-file "$work/cert.pem")
fi
# The address: "perf" on one shard; with more, the first "perf-N" that shard 0 owns (the
# broker's owner_of: FNV-1a, 64-bit, modulo the shard count).
address=perf
if ((shards > 1)); then
    address=$(python3 -c '
import sys
shards = int(sys.argv[1])
def owner(name):
    h = 0xcbf29ce484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001b3) % 2**64
    return h % shards
print(next(f"perf-{i}" for i in range(10000) if owner(f"perf-{i}") == 0))' "$shards")
fi

# The shard of the newest connection the broker logged ("shard N: connection opened"), once
# there are more than $1 of them.
shard_of_connection() {
    local opened=$1 line=""
    for _ in $(seq 600); do
        line=$(grep ': connection opened' "$work/broker.log" | sed -n "$((opened + 1))p")
        [[ -n $line ]] && break
        sleep 0.1
    done
    [[ -n $line ]] || { echo "callgrind-broker.sh: the broker did not log the connection within 60 s" >&2; return 1; }
    sed -n 's/.*shard \([0-9]*\): connection opened.*/\1/p' <<<"$line"
}

# valgrind's broker does not see SIGTERM through sigwait: dump the counts, then stop it.
dump_counts_and_stop_broker() {
    callgrind_control -d "$broker_pid" >/dev/null 2>&1
    sleep 1
    kill -KILL "$broker_pid" 2>/dev/null || true
    wait "$broker_pid" 2>/dev/null || true
    broker_pid=""
}

run_once() {
    # The start waits for a completion on the shard (see above) that nothing else brings: a
    # known port (a free one, picked here), poked with a connection every 0.1 s until the
    # line is there.
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    local wake=()
    ((shards > 1)) && wake=(env MBWS_PROFILER_WAKE_MS=1)
    "${wake[@]}" valgrind --tool=callgrind --callgrind-out-file="$work/profile" \
        "$broker" --shards "$shards" --listen "127.0.0.1:$port" --data-dir "$work/data" "${admin[@]}" "${tls_flags[@]}" 2>"$work/broker.log" &
    broker_pid=$!
    # The whole log line must be there, with the address and the space after it, before we read it.
    listen=""
    for _ in $(seq 1200); do
        listen=$(sed -n 's/.* listening on \([0-9.]*:[0-9]*\) .*/\1/p' "$work/broker.log" | head -1)
        [[ -n $listen ]] && break
        kill -0 "$broker_pid" 2>/dev/null || { cat "$work/broker.log" >&2; exit 1; }
        sleep 0.1
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || true
    done
    [[ -n $listen ]] || { echo "callgrind-broker.sh: the broker did not say where it listens within 120 s" >&2; cat "$work/broker.log" >&2; exit 1; }
    url="ws://$listen/"
    ((tls)) && url="wss://localhost:${listen##*:}/"
    body=$(head -c 64 /dev/zero | tr '\0' x)
    local opened=0 consumer_shard=0
    if ((fanout > 0)); then
        for i in $(seq "$fanout"); do
            "$client" consume "$address" --multicast --url "$url" "${client_tls[@]}" --count "$count" --quiet --timeout 120 >/dev/null 2>"$work/consume-$i.log" &
            fanout_pids+=($!)
        done
        for _ in $(seq 1200); do
            (($(grep -c ': connection opened' "$work/broker.log") >= fanout)) && break
            sleep 0.1
        done
        sleep $((2 + fanout / 20))
        "$client" send "$address" "$body" --url "$url" "${client_tls[@]}" --count "$count" --wait 120 "$@" >/dev/null 2>"$work/send.log"
        local failed=0
        for pid in "${fanout_pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
        fanout_pids=()
        ((failed == 0)) || { echo "callgrind-broker.sh: $failed of $fanout consumers did not get every message" >&2; cat "$work/consume-1.log" >&2; exit 1; }
        dump_counts_and_stop_broker
        placement_ok=1
        return
    fi
    for _ in $(seq 20); do
        "$client" consume "$address" --url "$url" "${client_tls[@]}" "${client_mode[@]}" --count "$count" --quiet --timeout "$client_wait" >/dev/null 2>"$work/consume.log" &
        consumer_pid=$!
        if ((shards == 1)); then
            break
        fi
        consumer_shard=$(shard_of_connection "$opened")
        opened=$((opened + 1))
        ((consumer_shard != 0)) && break
        kill "$consumer_pid" 2>/dev/null || true
        wait "$consumer_pid" 2>/dev/null || true
        consumer_pid=""
    done
    [[ -n $consumer_pid ]] || { echo "callgrind-broker.sh: the consumer landed on the owner's shard 20 times" >&2; exit 1; }
    sleep 0.5
    "$client" send "$address" "$body" --url "$url" "${client_tls[@]}" "${client_mode[@]}" "${send_mode[@]}" --count "$count" --wait "$client_wait" "$@" >/dev/null 2>"$work/send.log" \
        || { echo "callgrind-broker.sh: the publisher failed:" >&2; cat "$work/send.log" >&2; exit 1; }
    wait "$consumer_pid" || { echo "callgrind-broker.sh: the consumer did not get every message:" >&2; cat "$work/consume.log" >&2; exit 1; }
    consumer_pid=""
    dump_counts_and_stop_broker
    placement_ok=1
    if ((shards > 1)); then
        publisher_shard=$(shard_of_connection "$opened")
        if ((publisher_shard == 0)) || ((shards > 2 && publisher_shard == consumer_shard)); then
            placement_ok=0
        fi
        echo "address $address on shard 0, consumer on shard $consumer_shard, publisher on shard $publisher_shard"
    fi
}

for attempt in $(seq 6); do
    rm -rf "$work/data" "$work"/profile* "$work/broker.log"
    run_once "$@"
    ((placement_ok)) && break
    echo "callgrind-broker.sh: the publisher shared a shard with the owner or the consumer; again (attempt $attempt)" >&2
done
((placement_ok)) || { echo "callgrind-broker.sh: no run with the publisher on its own shard in 6 attempts" >&2; exit 1; }
dump=$(ls "$work"/profile.* | tail -1)
cp "$dump" "$out"
total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "messages: $count, broker instructions: $total"
echo "instructions per message: $((total / count))"
# The message tasks, inclusive: every connection's task (reads, decode, session, the rounds of
# work a read runs, writes) plus the rounds of work the shards' inbox tasks run for envelopes
# from other shards (`Shard::run_work` less its calls from connection tasks, which the first
# part holds already). Taking an envelope off the inbox is inlined into the inbox task and left
# out (0.4% of the total at --shards 2). Without --shards the figure is the connections' tasks.
tasks=$(callgrind_annotate --tree=caller --inclusive=yes --threshold=100 "$out" 2>/dev/null | python3 -c '
import re, sys
def cost(line):
    return int(line.split()[0].replace(",", ""))
connections = run_work = run_work_from_connections = 0
block = []
for line in sys.stdin:
    line = line.rstrip("\n")
    if not line.strip():
        block = []
        continue
    block.append(line)
    if not re.match(r"\s*[0-9,]+ \([ 0-9.]+%\)\s+\*", line) or "[" not in line:
        continue
    if line.endswith("]") and ":mbws::shard::connection::run::{{closure}} [" in line:
        connections += cost(line)
    elif ":mbws::shard::Shard::run_work [" in line:
        run_work += cost(line)
        run_work_from_connections += sum(cost(c) for c in block[:-1] if "mbws::shard::connection::run::{{closure}}" in c)
print(connections + run_work - run_work_from_connections)')
echo "instructions per message in the message tasks (connections and inboxes, inclusive): $((tasks / count))"
if ((fanout > 0)); then
    echo "consumers: $fanout, deliveries: $((count * fanout))"
    echo "instructions per delivery: $((total / (count * fanout)))"
fi
