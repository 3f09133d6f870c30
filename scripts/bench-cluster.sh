#!/usr/bin/env bash
# Cluster benchmark (issue 13, docs/CLUSTER.md "Figures"): three mbws-broker nodes coordinated
# by etcd against a three-node nats-server cluster (routes configured, clients over WebSocket),
# measured by the same load generator (mbws-bench) in one run, so the ratios compare like with
# like.
#
#   scripts/bench-cluster.sh --quick     about 2 minutes: 2 s runs
#   scripts/bench-cluster.sh             5 s runs
#
# Other flags: --no-build (use target/release as it is), --out DIR (default
# bench-results/cluster-<UTC timestamp>), --broker PATH (run this mbws-broker binary instead of
# target/release's, e.g. an older build for a before/after comparison; implies --no-build),
# --bench PATH (the same for the generator mbws-bench).
#
# Rows, 1 publisher -> 1 consumer, 64-byte messages, the address's owner node B:
#   local       publisher and consumer on B (no hop; the baseline of the forwarding cost)
#   A -> B      publisher on node A, consumer on B: mbws forwards each SEND A -> B, NATS routes it
#   A -> B -> C publisher on A, owner B, consumer on C: needs subscriptions relayed between
#               nodes; while a node refuses a SUBSCRIBE for an address it does not own (4421),
#               the row says SKIPPED with that reason (NATS: publisher on A, consumer on C)
# each as saturated throughput (msg/s, with latency under that load) and as latency at a common
# rate (half the lower of the two clusters' A -> B throughput). Then fan-out: 1 publisher on A
# -> 1,000 multicast subscribers spread evenly over the three nodes (subscriber i on node
# i mod 3: 334 on A, 333 on B and C), deliveries/s; the mbws address is owned by A (the
# publisher's node), so B's and C's subscribers are relayed subscriptions held at A; NATS: plain
# subscribers on each server, the messages routed to B and C. Broker CPU is the sum over the
# three nodes of each cluster (etcd not counted: it is idle on the message path), per million
# messages; the forwarding cost is the A -> B figure minus the local one.
#
# Every broker process (mbws nodes, nats-servers, etcd) runs pinned to CPU 0, the generator to
# CPU 1, as in scripts/bench.sh. The script stops only the processes it started, by PID.
# Needs etcd (etcd-server), nats-server (installed with apt-get when missing), python3, curl.
set -euo pipefail

mode=full
build=1
out_dir=""
broker_bin=""
bench_bin=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) mode=quick ;;
        --no-build) build=0 ;;
        --out) out_dir="${2:?--out needs a directory}"; shift ;;
        --broker) broker_bin="${2:?--broker needs the path of an mbws-broker binary}"; build=0; shift ;;
        --bench) bench_bin="${2:?--bench needs the path of an mbws-bench binary}"; build=0; shift ;;
        -h|--help) sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-cluster.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $mode == quick ]]; then duration=2; warmup=0.5; step=2; run_timeout=60; else duration=5; warmup=1; step=4; run_timeout=120; fi
size=64

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf '[bench-cluster %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="${out_dir:-$root/bench-results/cluster-$stamp}"
mkdir -p "$out/logs"
out="$(cd "$out" && pwd)"
log "mode $mode, results in $out"

# ---------------------------------------------------------------------------------------------
# Processes: every PID this script started, stopped (TERM, then KILL after 5 s) on exit.
pids=()
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    pids=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
    pin_broker=(taskset -c 0); pin_generator=(taskset -c 1)
else
    log "fewer than 2 CPUs or no taskset: brokers and generator unpinned"
    pin_broker=(); pin_generator=()
fi

if [[ $build == 1 ]]; then
    log "cargo build --release --bin mbws-broker --bin mbws-bench"
    cargo build --release --bin mbws-broker --bin mbws-bench
fi
broker_bin="${broker_bin:-$root/target/release/mbws-broker}"
bench_bin="${bench_bin:-$root/target/release/mbws-bench}"
for binary in "$broker_bin" "$bench_bin"; do
    [[ -x $binary ]] || { echo "bench-cluster.sh: $binary is missing; build with cargo build --release" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "bench-cluster.sh: etcd is missing: apt-get install etcd-server" >&2; exit 1; }
nats_bin="$(command -v nats-server || { [[ -x /usr/sbin/nats-server ]] && echo /usr/sbin/nats-server; } || true)"
if [[ -z $nats_bin ]]; then
    log "installing nats-server (apt-get)"
    apt-get update >"$out/apt.log" 2>&1 && apt-get install -y nats-server >>"$out/apt.log" 2>&1 || true
    nats_bin="$(command -v nats-server || { [[ -x /usr/sbin/nats-server ]] && echo /usr/sbin/nats-server; } || true)"
fi

# reserve_ports N: N distinct TCP ports free on 127.0.0.1 now, for the servers that must be
# told their ports (etcd, nats-server). Each is checked by binding it, and all are held until
# the N are chosen, so no two are the same (asking bind(2) for port 0 N times, and closing each
# socket before the next ask, can give one port twice: an mbws admin port once equalled a
# listen port). They are taken below the kernel's ephemeral range, which outgoing connections'
# local ports and other programs' port-0 listeners draw from, so none of those takes one
# before its server binds it. The mbws nodes need none of this: they bind port 0 and say which
# ports they got (mbws_ports below).
reserve_ports() {
    python3 - "$1" <<'EOF'
import random, socket, sys
count = int(sys.argv[1])
ephemeral_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
candidates = list(range(10000, ephemeral_low)) if ephemeral_low > 10000 + 10 * count else list(range(1024, ephemeral_low))
random.shuffle(candidates)
held = []
for port in candidates:
    if len(held) == count:
        break
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        continue
    held.append(sock)
if len(held) < count:
    sys.exit(f"bench-cluster.sh: only {len(held)} of {count} free ports below {ephemeral_low} on 127.0.0.1")
print(" ".join(str(sock.getsockname()[1]) for sock in held))
EOF
}
# mbws_ports LOG: "LISTEN_PORT ADMIN_PORT" from an mbws node's start-up lines (`... listening on
# 127.0.0.1:PORT (...)` and `admin API at http://127.0.0.1:PORT/ ...`).
mbws_ports() {
    local listen admin
    listen="$(sed -n 's/.* listening on 127\.0\.0\.1:\([0-9][0-9]*\) .*/\1/p' "$1" | head -n 1)"
    admin="$(sed -n 's#.*admin API at http://127\.0\.0\.1:\([0-9][0-9]*\)/.*#\1#p' "$1" | head -n 1)"
    [[ -n $listen && -n $admin && $listen != 0 && $admin != 0 ]] \
        || { echo "bench-cluster.sh: no listen or admin port in $1" >&2; return 1; }
    echo "$listen $admin"
}
# wait_for_log FILE TEXT PID NAME: at most 15 s until FILE contains TEXT; fails if PID exits.
wait_for_log() {
    for _ in $(seq 150); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "bench-cluster.sh: $4 exited; its log: $1" >&2; return 1; }
        sleep 0.1
    done
    echo "bench-cluster.sh: $4 did not log '$2' within 15 s; its log: $1" >&2
    return 1
}

# ---------------------------------------------------------------------------------------------
# etcd and the three mbws nodes n1 (A), n2 (B), n3 (C).
# Every port etcd and the nats-servers are told, reserved at once: distinct.
read -r -a reserved <<<"$(reserve_ports 11)"
[[ ${#reserved[@]} -eq 11 ]] || { echo "bench-cluster.sh: could not reserve 11 ports" >&2; exit 1; }
etcd_port=${reserved[0]}; etcd_peer=${reserved[1]}
etcd_url="http://127.0.0.1:$etcd_port"
"${pin_broker[@]}" etcd --name bench --data-dir "$out/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "bench=http://127.0.0.1:$etcd_peer" >"$out/logs/etcd.log" 2>&1 &
pids+=($!)
wait_for_log "$out/logs/etcd.log" "ready to serve client requests" "$!" etcd
declare -a mbws_port mbws_admin mbws_pid
for n in 1 2 3; do
    # Port 0: the kernel gives each listener a port no other socket holds; the node advertises
    # the one it got (its default --advertise-url is its bound address).
    "${pin_broker[@]}" "$broker_bin" --cluster bench --etcd "$etcd_url" --node-name "n$n" \
        --listen "127.0.0.1:0" --admin-listen "127.0.0.1:0" \
        --data-dir "$out/data/n$n" --shards 1 --log-level info >"$out/logs/mbws-n$n.log" 2>&1 &
    mbws_pid[$n]=$!
    pids+=($!)
done
for n in 1 2 3; do
    wait_for_log "$out/logs/mbws-n$n.log" "admin API at" "${mbws_pid[$n]}" "mbws node n$n"
    wait_for_log "$out/logs/mbws-n$n.log" "node \"n$n\" registered" "${mbws_pid[$n]}" "mbws node n$n"
    read -r "mbws_port[$n]" "mbws_admin[$n]" <<<"$(mbws_ports "$out/logs/mbws-n$n.log")"
done
mbws_url() { echo "ws://127.0.0.1:${mbws_port[$1]}/"; }
mbws_pids="${mbws_pid[1]},${mbws_pid[2]},${mbws_pid[3]}"
log "mbws cluster: etcd $etcd_url, nodes n1..n3 on ports ${mbws_port[*]}, admin APIs ${mbws_admin[*]} (PIDs $mbws_pids)"

# ---------------------------------------------------------------------------------------------
# The nats-server cluster: three servers with routes to each other, WebSocket listeners.
declare -a nats_port nats_ws nats_route nats_pid
for n in 1 2 3; do
    nats_port[$n]=${reserved[$((n * 3 - 1))]}; nats_ws[$n]=${reserved[$((n * 3))]}; nats_route[$n]=${reserved[$((n * 3 + 1))]}
done
nats_pids=""
if [[ -n $nats_bin ]]; then
    for n in 1 2 3; do
        routes=""
        for m in 1 2 3; do [[ $m != "$n" ]] && routes+="nats-route://127.0.0.1:${nats_route[$m]}, "; done
        cat >"$out/nats-$n.conf" <<EOF
# nats-server node $n of scripts/bench-cluster.sh's cluster: core NATS, WebSocket without TLS.
server_name: nats-$n
host: 127.0.0.1
port: ${nats_port[$n]}
websocket {
    host: 127.0.0.1
    port: ${nats_ws[$n]}
    no_tls: true
}
cluster {
    name: bench
    host: 127.0.0.1
    port: ${nats_route[$n]}
    routes: [ ${routes%, } ]
}
EOF
        "${pin_broker[@]}" "$nats_bin" -c "$out/nats-$n.conf" >"$out/logs/nats-$n.log" 2>&1 &
        nats_pid[$n]=$!
        pids+=($!)
    done
    # Each server has routes to the two others once it logged two "Route connection created".
    for n in 1 2 3; do
        for _ in $(seq 150); do
            [[ $(grep -c "Route connection created" "$out/logs/nats-$n.log" 2>/dev/null || true) -ge 2 ]] && break
            sleep 0.1
        done
        [[ $(grep -c "Route connection created" "$out/logs/nats-$n.log" || true) -ge 2 ]] \
            || { echo "bench-cluster.sh: nats-$n has not routed to both others; log $out/logs/nats-$n.log" >&2; exit 1; }
    done
    nats_pids="${nats_pid[1]},${nats_pid[2]},${nats_pid[3]}"
    log "nats cluster: WebSocket ports ${nats_ws[*]}, routes ${nats_route[*]} (PIDs $nats_pids)"
else
    log "SKIPPING the nats cluster: nats-server is not installed"
fi
nats_url() { echo "ws://127.0.0.1:${nats_ws[$1]}/"; }

# ---------------------------------------------------------------------------------------------
# place ID NODE: the mbws address of run ID (bench-ID-0) placed on node NODE (the admin API's
# move, which records a placement whether or not the address was used before).
place() {
    curl -fsS -X PUT -d "{\"owner\":\"n$2\"}" "http://127.0.0.1:${mbws_admin[1]}/api/cluster/addresses/bench-$1-0" \
        >"$out/logs/place-$1.log" 2>&1
}

# measure NAME TARGET PUBLISH_URL CONSUME_URL PIDS SCENARIO [FLAGS...]: one generator run; the
# result in NAME.json, the output in logs/NAME.log. Returns 1 (and leaves no JSON) on failure.
run_index=0
measure() {
    local name=$1 target=$2 publish_url=$3 consume_url=$4 broker_pids=$5 scenario=$6
    shift 6
    run_index=$((run_index + 1))
    log "$name: $scenario $*"
    local status=0
    timeout --kill-after=10 "$run_timeout" "${pin_generator[@]}" "$bench_bin" "$scenario" --target "$target" \
        --url "$publish_url" --consumer-url "$consume_url" --size "$size" --warmup-s "$warmup" \
        --broker-pid "$broker_pids" --run-id "$run_id" --json "$out/$name.json" "$@" >"$out/logs/$name.log" 2>&1 || status=$?
    if [[ $status -ne 0 || ! -s $out/$name.json ]]; then
        rm -f "$out/$name.json"
        log "$name FAILED (exit $status): $(tail -n 2 "$out/logs/$name.log" | tr '\n' ' ')"
        return 1
    fi
}

# urls KIND NODES: the URLs of the comma-separated node numbers NODES ("1,2,3"), comma-separated
# (mbws-bench spreads consumers over them).
urls() {
    local node list=""
    for node in ${2//,/ }; do list+="$("${1}_url" "$node"),"; done
    echo "${list%,}"
}

# mbws_run NAME PUBLISHER OWNER CONSUMERS SCENARIO [FLAGS...]: an mbws run with its address
# placed on OWNER first; CONSUMERS is a node or a comma-separated list of nodes; a refused
# SUBSCRIBE (4421) is recorded as SKIPPED with the reason.
declare -A skipped=()
mbws_run() {
    local name=$1 publisher=$2 owner=$3 consumer=$4
    shift 4
    run_id="c$(date +%s%N | tail -c 10)-$run_index"
    place "$run_id" "$owner" || { log "$name: placing its address on n$owner failed: $(cat "$out/logs/place-$run_id.log")"; return 0; }
    if ! measure "$name" mbws "$(mbws_url "$publisher")" "$(urls mbws "$consumer")" "$mbws_pids" "$@"; then
        if grep -q "4421" "$out/logs/$name.log"; then
            skipped[$name]="the consumer's node refused the SUBSCRIBE with 4421 (subscriptions are not relayed between nodes yet): $(grep -o 'broker error 4421.*' "$out/logs/$name.log" | head -n 1 | cut -c 1-240 | tr -d '|')"
        else
            skipped[$name]="failed: $(tail -n 1 "$out/logs/$name.log")"
        fi
    fi
}

nats_run() {
    local name=$1 publisher=$2 consumer=$3
    shift 3
    run_id="n$(date +%s%N | tail -c 10)-$run_index"
    [[ -n $nats_pids ]] || { skipped[$name]="nats-server is not installed"; return 0; }
    measure "$name" nats "$(nats_url "$publisher")" "$(urls nats "$consumer")" "$nats_pids" "$@" \
        || skipped[$name]="failed: $(tail -n 1 "$out/logs/$name.log")"
}

json_value() {
    [[ -s $1 ]] || return 0
    python3 - "$1" "$2" <<'EOF'
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    if isinstance(value, list):
        value = value[int(key)] if len(value) > int(key) else None
    else:
        value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)
EOF
}

# Throughput, saturated: node 1 is A, 2 is B (the owner), 3 is C.
throughput=(throughput --duration-s "$duration" --publishers 1 --consumers 1 --addresses 1)
mbws_run mbws-local 2 2 2 "${throughput[@]}"
mbws_run mbws-a-b 1 2 2 "${throughput[@]}"
mbws_run mbws-a-b-c 1 2 3 "${throughput[@]}"
nats_run nats-local 2 2 "${throughput[@]}"
nats_run nats-a-b 1 2 "${throughput[@]}"
nats_run nats-a-c 1 3 "${throughput[@]}"

# Fan-out to 1,000 subscribers over the three nodes, publisher on A (the mbws owner too).
fanout=(fanout --duration-s "$duration" --subscribers 1000)
mbws_run mbws-fanout 1 1 1,2,3 "${fanout[@]}"
nats_run nats-fanout 1 1,2,3 "${fanout[@]}"

# Latency at a common rate: half the lower of the two clusters' A -> B throughput.
common_rate="$(python3 -c 'import sys
rates = [float(r) for r in sys.argv[1:] if r]
print(int(0.5 * min(rates)) if rates else "")' "$(json_value "$out/mbws-a-b.json" results.msgs_per_sec)" \
    "$(json_value "$out/nats-a-b.json" results.msgs_per_sec)")"
if [[ -n $common_rate ]]; then
    latency=(latency --rates 100 --max-rate "$common_rate" --step-s "$step" --duration-s "$duration")
    mbws_run mbws-local-latency 2 2 2 "${latency[@]}"
    mbws_run mbws-a-b-latency 1 2 2 "${latency[@]}"
    [[ -z ${skipped[mbws-a-b-c]:-} ]] && mbws_run mbws-a-b-c-latency 1 2 3 "${latency[@]}"
    nats_run nats-local-latency 2 2 "${latency[@]}"
    nats_run nats-a-b-latency 1 2 "${latency[@]}"
    nats_run nats-a-c-latency 1 3 "${latency[@]}"
fi
load="$(cut -d' ' -f1-3 /proc/loadavg)"
stop_all

# ---------------------------------------------------------------------------------------------
# The table.
{
    echo "# Cluster benchmark, $(date -u +%Y-%m-%dT%H:%MZ) ($mode)"
    echo
    echo "\`scripts/bench-cluster.sh$([[ $mode == quick ]] && echo ' --quick')\`, commit $(git -C "$root" describe --always --dirty), broker binary $broker_bin, $(nproc) CPUs, load average $load at the end; every broker process on CPU 0, the generator on CPU 1; 1 publisher -> 1 consumer, $size B, runs of $duration s; broker CPU summed over the cluster's three nodes."
    echo
    echo "| row | cluster | msg/s | p50 / p99 at saturation (us) | broker CPU s per million msgs | latency p50 / p99 at $common_rate msg/s (us) |"
    echo "|---|---|---|---|---|---|"
    for row in local a-b a-b-c a-c; do
        for cluster in mbws nats; do
            name="$cluster-$row"
            [[ $cluster == mbws && $row == a-c ]] && continue
            [[ $cluster == nats && $row == a-b-c ]] && continue
            label=$row
            case $row in local) label="local (on B)";; a-b) label="A -> B";; a-b-c) label="A -> B -> C";; a-c) label="A -> C";; esac
            if [[ -n ${skipped[$name]:-} ]]; then
                echo "| $label | $cluster | SKIPPED: ${skipped[$name]} | | | |"
                continue
            fi
            json="$out/$name.json"; lat="$out/$name-latency.json"
            rate="$(json_value "$json" results.msgs_per_sec)"
            printf '| %s | %s | %s | %s / %s | %s | %s / %s |\n' "$label" "$cluster" "${rate%.*}" \
                "$(json_value "$json" results.p50_us)" "$(json_value "$json" results.p99_us)" \
                "$(json_value "$json" results.cpu_s_per_million)" \
                "$(json_value "$lat" results.steps.0.p50_us)" "$(json_value "$lat" results.steps.0.p99_us)"
        done
    done
    echo
    echo "Fan-out: 1 publisher on A -> 1,000 multicast subscribers, 334 on A, 333 on B and C (mbws: the address owned by A, B's and C's subscribers relayed from A; NATS: routed), $size B, runs of $duration s."
    echo
    echo "| cluster | deliveries/s | broker CPU s per million deliveries | latency p50 / p99 (us) |"
    echo "|---|---|---|---|"
    for cluster in mbws nats; do
        name="$cluster-fanout"
        if [[ -n ${skipped[$name]:-} ]]; then
            echo "| $cluster | SKIPPED: ${skipped[$name]} | | |"
            continue
        fi
        json="$out/$name.json"
        rate="$(json_value "$json" results.deliveries_per_sec)"
        printf '| %s | %s | %s | %s / %s |\n' "$cluster" "${rate%.*}" "$(json_value "$json" results.cpu_s_per_million)" \
            "$(json_value "$json" results.p50_us)" "$(json_value "$json" results.p99_us)"
    done
    echo
    python3 - "$out" <<'EOF'
import json, os, sys
def cpu(name):
    path = os.path.join(sys.argv[1], name + ".json")
    if not os.path.exists(path):
        return None
    return json.load(open(path))["results"].get("cpu_s_per_million")
for cluster in ("mbws", "nats"):
    local, forwarded = cpu(f"{cluster}-local"), cpu(f"{cluster}-a-b")
    if local is not None and forwarded is not None:
        print(f"- {cluster}: one hop between nodes costs {forwarded - local:.2f} s of broker CPU per million messages "
              f"({(forwarded - local):.2f} us per message; {forwarded:.2f} against {local:.2f} on one node)")
def rate(name):
    path = os.path.join(sys.argv[1], name + ".json")
    return json.load(open(path))["results"].get("deliveries_per_sec") if os.path.exists(path) else None
mbws, nats = rate("mbws-fanout"), rate("nats-fanout")
if mbws and nats:
    print(f"- fan-out to 1,000 over three nodes: mbws {mbws / nats:.2f}x nats-server's deliveries/s")
EOF
} >"$out/summary.md"
cat "$out/summary.md"
log "summary: $out/summary.md"
