#!/usr/bin/env bash
# Benchmark suite: mbws-broker against nats-server, mosquitto and the raw relay baseline, all
# driven by the same load generator (mbws-bench) in one run, so the ratios compare like with like.
#
#   scripts/bench.sh --quick      about 3 minutes: short runs, for a check of the ratios
#   scripts/bench.sh              full run, about 45 minutes: longer runs, every scenario 3 times
#   scripts/bench.sh --publish    also copy summary.md and the plots to docs/bench/
#
# Other flags: --targets LIST (default mbws,mbws-light,nats,mqtt,relay; mbws-light is our broker
# driven with MBLWS, at most once like core NATS, for throughput and latency only), --no-tls,
# --no-build, --out DIR, --scenarios LIST (default throughput,latency,fanout,connections,durable;
# e.g. `--quick --targets mbws,nats --scenarios fanout --fanout "10 100 1000"` for fan-out
# alone; `--quick --targets mbws,nats --scenarios throughput` gives the four rows that compare
# each broker's wss:// with its ws://, in about a minute), --fanout "M ..." (the fan-out
# subscriber counts, instead of the mode's), --runs N (every scenario N times, medians with
# their ranges in summary.md; the full mode's default is 3, --quick's 1), --latency-at "R ..."
# (the fixed rates, in msgs/s, at which every target's latency is measured beside the raw
# relay's; default "50000 200000", "" for none).
# The summary needs the throughput scenario; without it, the run's JSON files are the result.
# TLS: the throughput runs of mbws and nats are repeated over wss:// (targets mbws-tls and
# nats-tls: each broker serves TLS itself, with a throwaway certificate made by openssl), so the
# summary gives each one's cost of TLS against its own ws://. --no-tls skips them.
# Durable: mbws's durable run (RECEIPT after fsync) is compared with nats-server's JetStream
# (target nats-js: a file-storage stream on bench.>, every publish acknowledged by a PubAck).
# Environment: MBWS_BENCH=PATH runs another generator binary (what it must accept and write:
# docs/PERFORMANCE.md, "What the script expects of the generator"); MBWS_BROKER and MBWS_RELAY
# likewise for the broker and relay binaries.
#
# Every broker runs pinned to CPU 0 (`taskset -c 0`, ours with --shards 1), the generator pinned
# to CPU 1, and each scenario gets a freshly started broker. The script stops only the processes
# it started, by PID. Results: bench-results/<UTC timestamp>/ with one JSON file and one log per
# run, run.json (what ran, where) and summary.md plus SVG plots written by scripts/plot.py.
set -euo pipefail

usage() {
    # The comment block at the top of this file, without its '# '.
    sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

mode=full
publish=0
build=1
tls=1
targets_arg="mbws,mbws-light,nats,mqtt,relay"
scenarios_arg="throughput,latency,fanout,connections,durable"
fanout_arg=""
runs_arg=""
latency_at="50000 200000"
out_dir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) mode=quick ;;
        --full) mode=full ;;
        --publish) publish=1 ;;
        --no-build) build=0 ;;
        --no-tls) tls=0 ;;
        --targets) targets_arg="${2:?--targets needs a list such as mbws,nats}"; shift ;;
        --out) out_dir="${2:?--out needs a directory}"; shift ;;
        --scenarios) scenarios_arg="${2:?--scenarios needs a list such as fanout,latency}"; shift ;;
        --fanout) fanout_arg="${2:?--fanout needs subscriber counts such as \"10 100 1000\"}"; shift ;;
        --runs) runs_arg="${2:?--runs needs a count such as 3}"; shift ;;
        --latency-at) latency_at="${2?--latency-at needs rates in msgs/s such as \"50000 200000\"}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# ---------------------------------------------------------------------------------------------
# Parameters of the two modes. Sizes are bytes, durations seconds.
size=64
if [[ $mode == quick ]]; then
    duration=2; warmup=0.5; step=1.5; repeats=1
    rates="10,25,50,75,90"
    # M = 1000 costs minutes on mosquitto (1000 WebSocket sessions, then the drain): full only.
    fanout_subscribers="10 100"
    connections=10000; source_ips=1; hold=1
    # No single generator run may take longer than this (set-up, measurement and drain).
    run_timeout=60
else
    duration=5; warmup=1; step=4; repeats=3
    rates="10,25,50,75,90"
    fanout_subscribers="10 100 1000"
    connections=50000; source_ips=4; hold=3
    run_timeout=300
fi
[[ -n $fanout_arg ]] && fanout_subscribers=$fanout_arg
if [[ -n $runs_arg ]]; then
    [[ $runs_arg =~ ^[1-9][0-9]?$ ]] || { echo "bench.sh: --runs takes a count from 1 to 99, not '$runs_arg'" >&2; exit 2; }
    repeats=$runs_arg
fi
for rate in $latency_at; do
    [[ $rate =~ ^[1-9][0-9]{2,7}$ ]] || { echo "bench.sh: --latency-at takes rates in msgs/s from 100 to 99999999, not '$rate'" >&2; exit 2; }
done
for scenario in ${scenarios_arg//,/ }; do
    case "$scenario" in
        throughput|latency|fanout|connections|durable) ;;
        *) echo "bench.sh: unknown scenario '$scenario' (throughput, latency, fanout, connections, durable)" >&2; exit 2 ;;
    esac
done
# True when the scenario $1 is to run.
wants() { [[ ",$scenarios_arg," == *",$1,"* ]]; }
# mosquitto's WebSocket listener stops delivering larger messages (see crates/mbws-bench/src/cli.rs).
mqtt_max_size=4000
# Broker CPU and generator CPU.
broker_cpu=0
generator_cpu=1

note() { printf '\n*** %s\n\n' "$*" >&2; }
log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Results directory.
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="${out_dir:-$root/bench-results/$stamp}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
: >"$out/failures.tsv"
log "mode $mode, results in $out"
started_at=$(date +%s)

# ---------------------------------------------------------------------------------------------
# The one broker this script has running (empty when none); the EXIT trap stops it and nothing
# else. A PID is forgotten as soon as its process has been reaped, so a recycled PID is never hit.
broker_pid=""
stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "PID $pid ignored SIGTERM for 5 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    if [[ -n $broker_pid ]]; then
        stop_pid "$broker_pid"
        broker_pid=""
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Pinning: broker on CPU 0, generator on CPU 1, when the machine has both.
if command -v taskset >/dev/null && [[ $(nproc) -ge 2 ]]; then
    pin_broker=(taskset -c "$broker_cpu")
    pin_generator=(taskset -c "$generator_cpu")
else
    note "fewer than 2 CPUs or no taskset: broker and generator run unpinned and share the CPU; \
ratios are less meaningful"
    pin_broker=()
    pin_generator=()
fi

# Many idle connections need many descriptors, in the brokers and in the generator.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The generator holds every idle connection open, and so does the broker: both need K
# descriptors and a few more. Where the hard limit is lower (a container without
# CAP_SYS_RESOURCE), the connections scenario opens as many as fit and says so.
connections_note=""
max_connections=$(( $(ulimit -n) - 1000 ))
if [[ $connections -gt $max_connections ]]; then
    connections_note="$connections idle connections requested, $max_connections opened: the open-file limit is $(ulimit -n)"
    note "$connections_note"
    connections=$max_connections
fi

# ---------------------------------------------------------------------------------------------
# Build and locate the binaries.
if [[ $build == 1 ]]; then
    log "cargo build --release --bins"
    cargo build --release --bins
fi
bench_bin="${MBWS_BENCH:-$root/target/release/mbws-bench}"
broker_bin="${MBWS_BROKER:-$root/target/release/mbws-broker}"
relay_bin="${MBWS_RELAY:-$root/target/release/mbws-relay}"
for binary in "$bench_bin" "$broker_bin"; do
    [[ -x $binary ]] || { echo "bench.sh: $binary is missing; build with cargo build --release --bins" >&2; exit 1; }
done
broker_has_data_dir=0
if "$broker_bin" --help 2>/dev/null | grep -q -- '--data-dir'; then
    broker_has_data_dir=1
fi
# The admin API (issue 11) would take port 7448, which a broker already running here may hold.
broker_has_admin=0
if "$broker_bin" --help 2>/dev/null | grep -q -- '--admin-listen'; then
    broker_has_admin=1
fi

# ---------------------------------------------------------------------------------------------
# Peers: install what is missing (Debian/Ubuntu package names); skip a peer that cannot be had.
find_program() {
    command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || true
}
nats_bin="$(find_program nats-server)"
mosquitto_bin="$(find_program mosquitto)"
if [[ -z $nats_bin || -z $mosquitto_bin ]]; then
    log "installing nats-server and mosquitto (apt-get)"
    if apt-get update >"$out/apt.log" 2>&1 && apt-get install -y nats-server mosquitto >>"$out/apt.log" 2>&1; then
        nats_bin="$(find_program nats-server)"
        mosquitto_bin="$(find_program mosquitto)"
    else
        note "apt-get could not install nats-server/mosquitto (see $out/apt.log); the missing peers are skipped"
    fi
fi

declare -a targets=()
declare -A skipped=()
IFS=',' read -r -a requested <<<"$targets_arg"
for target in "${requested[@]}"; do
    case "$target" in
        mbws|mbws-light) targets+=("$target") ;;
        nats) if [[ -n $nats_bin ]]; then targets+=(nats); else skipped[nats]="nats-server is not installed"; fi ;;
        mqtt) if [[ -n $mosquitto_bin ]]; then targets+=(mqtt); else skipped[mqtt]="mosquitto is not installed"; fi ;;
        relay) if [[ -x $relay_bin ]]; then targets+=(relay); else skipped[relay]="$relay_bin is missing"; fi ;;
        *) echo "bench.sh: unknown target '$target' (mbws, mbws-light, nats, mqtt, relay)" >&2; exit 2 ;;
    esac
done
if [[ $size -gt $mqtt_max_size ]]; then
    declare -a kept=()
    for target in "${targets[@]}"; do
        if [[ $target == mqtt ]]; then
            skipped[mqtt]="messages of $size B exceed the $mqtt_max_size B mosquitto handles over WebSocket"
        else
            kept+=("$target")
        fi
    done
    targets=("${kept[@]}")
fi
# TLS variants of the throughput runs (mbws-tls, nats-tls), with a certificate for localhost
# that the generator trusts through --ca-file.
declare -a tls_targets=()
if [[ $tls == 1 ]]; then
    if ! command -v openssl >/dev/null; then
        skipped[tls]="openssl is not installed (it makes the throwaway certificate)"
    else
        mkdir -p "$out/tls"
        if openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
            -keyout "$out/tls/key.pem" -out "$out/tls/cert.pem" -subj /CN=localhost \
            -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
            >"$out/tls/openssl.log" 2>&1; then
            for target in "${targets[@]}"; do
                [[ $target == mbws || $target == nats ]] && tls_targets+=("$target-tls")
            done
        else
            skipped[tls]="openssl could not make a certificate (see $out/tls/openssl.log)"
        fi
    fi
fi
for target in "${!skipped[@]}"; do
    note "SKIPPING $target: ${skipped[$target]}"
done

# ---------------------------------------------------------------------------------------------
# Ports and broker configurations (written into the results directory).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
mbws_port=$(free_port)
relay_port=$(free_port)
nats_port=$(free_port)
nats_ws_port=$(free_port)
mqtt_port=$(free_port)
mqtt_ws_port=$(free_port)
mbws_tls_port=$(free_port)
nats_tls_port=$(free_port)
nats_tls_ws_port=$(free_port)
nats_js_port=$(free_port)
nats_js_ws_port=$(free_port)

cat >"$out/nats.conf" <<EOF
# nats-server for scripts/bench.sh: core NATS over WebSocket, no TLS, loopback only.
host: 127.0.0.1
port: $nats_port
websocket {
    host: 127.0.0.1
    port: $nats_ws_port
    no_tls: true
}
EOF
cat >"$out/nats-tls.conf" <<EOF
# nats-server for scripts/bench.sh: core NATS over WebSocket with TLS (wss://), loopback only.
host: 127.0.0.1
port: $nats_tls_port
websocket {
    host: 127.0.0.1
    port: $nats_tls_ws_port
    tls {
        cert_file: "$out/tls/cert.pem"
        key_file: "$out/tls/key.pem"
    }
}
EOF
cat >"$out/nats-js.conf" <<EOF
# nats-server for scripts/bench.sh's durable run: JetStream (file storage) over WebSocket, no
# TLS, loopback only. The store directory is set per run on the command line (--store_dir).
host: 127.0.0.1
port: $nats_js_port
jetstream: enabled
websocket {
    host: 127.0.0.1
    port: $nats_js_ws_port
    no_tls: true
}
EOF
cat >"$out/mosquitto.conf" <<EOF
# mosquitto for scripts/bench.sh: MQTT and MQTT over WebSocket, loopback only, no persistence.
listener $mqtt_port 127.0.0.1
listener $mqtt_ws_port 127.0.0.1
protocol websockets
socket_domain ipv4
allow_anonymous true
persistence false
# Logging every connection would cost mosquitto time in the connections scenario; ours does
# not log connections at its default level either.
connection_messages false
log_type error
log_type warning
log_dest stderr
EOF

# ---------------------------------------------------------------------------------------------
# Starting and stopping one broker.

# port_in_use PORT: true while something accepts TCP connections on 127.0.0.1:PORT.
port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# ws_upgrade PORT [SUBPROTOCOL [CA_FILE]]: true when a WebSocket upgrade on 127.0.0.1:PORT is
# answered with 101 (the server really serves, not only has its port bound); over TLS, for the
# name localhost, when CA_FILE is given.
ws_upgrade() {
    python3 - "$1" "${2:-}" "${3:-}" <<'EOF'
import base64, os, socket, ssl, sys
port, protocol, ca_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
request = (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\nSec-WebSocket-Version: 13\r\n")
if protocol:
    request += f"Sec-WebSocket-Protocol: {protocol}\r\n"
try:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        if ca_file:
            connection = ssl.create_default_context(cafile=ca_file).wrap_socket(connection, server_hostname="localhost")
        connection.sendall((request + "\r\n").encode())
        response = b""
        while b"\r\n\r\n" not in response and len(response) < 16384:
            chunk = connection.recv(4096)
            if not chunk:
                break
            response += chunk
except OSError:
    sys.exit(1)
sys.exit(0 if response.startswith(b"HTTP/1.1 101") else 1)
EOF
}

# wait_until_serving TARGET PORT PID NAME: waits (at most 10 s) until the target's server answers
# a WebSocket upgrade on PORT (the relay, which speaks no WebSocket: until it accepts a
# connection); fails at once if the process exits.
wait_until_serving() {
    local target=$1 port=$2 pid=$3 name=$4
    for _ in $(seq 100); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench.sh: $name exited during start-up; its log: $out/logs/$name.log" >&2
            return 1
        fi
        case "$target" in
            mbws|mbws-light) ws_upgrade "$port" MBWS.huawei.com && return 0 ;;
            nats) ws_upgrade "$port" && return 0 ;;
            mbws-tls) ws_upgrade "$port" MBWS.huawei.com "$out/tls/cert.pem" && return 0 ;;
            nats-tls) ws_upgrade "$port" "" "$out/tls/cert.pem" && return 0 ;;
            nats-js) ws_upgrade "$port" && create_jetstream_stream "$nats_js_port" && return 0 ;;
            mqtt) ws_upgrade "$port" mqtt && return 0 ;;
            relay) port_in_use "$port" && return 0 ;;
        esac
        sleep 0.1
    done
    echo "bench.sh: $name did not serve on 127.0.0.1:$port within 10 s" >&2
    return 1
}

# create_jetstream_stream PORT: creates the stream BENCH (file storage, subjects bench.>) on the
# nats-server whose client port is PORT, through the JetStream API ($JS.API.STREAM.CREATE).
create_jetstream_stream() {
    python3 - "$1" <<'EOF'
import json, socket, sys
port = int(sys.argv[1])
config = json.dumps({"name": "BENCH", "subjects": ["bench.>"], "storage": "file", "retention": "limits",
                     "discard": "old", "max_bytes": 4 << 30}).encode()
with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
    lines = connection.makefile("rb")
    lines.readline()  # INFO
    connection.sendall(b'CONNECT {"verbose":false,"protocol":1}\r\nSUB _INBOX.bench.create 1\r\n'
                       + b"PUB $JS.API.STREAM.CREATE.BENCH _INBOX.bench.create %d\r\n" % len(config)
                       + config + b"\r\n")
    while True:
        line = lines.readline()
        if not line or line.startswith(b"-ERR"):
            sys.exit(f"bench.sh: nats-server refused the stream: {line!r}")
        if line.startswith(b"MSG"):
            answer = json.loads(lines.read(int(line.split()[-1]) + 2)[:-2])
            if "error" in answer:
                sys.exit(f"bench.sh: creating the JetStream stream failed: {answer['error']}")
            break
EOF
}

# wait_port_free PORT: waits (at most 10 s) until nothing listens on 127.0.0.1:PORT, so that a
# new broker never shares the port (SO_REUSEPORT) with one still going away, nor a readiness
# check reaches the old one.
wait_port_free() {
    local port=$1
    for _ in $(seq 100); do
        port_in_use "$port" || return 0
        sleep 0.1
    done
    echo "bench.sh: 127.0.0.1:$port is still in use 10 s after its last broker stopped" >&2
    return 1
}

# start_broker TARGET RUN_NAME: starts the target's server pinned to the broker CPU, sets
# broker_pid, and waits until it serves.
start_broker() {
    local target=$1 run=$2 port
    local -a command
    case "$target" in
        mbws|mbws-light|mbws-tls)
            port=$mbws_port
            [[ $target == mbws-tls ]] && port=$mbws_tls_port
            command=("$broker_bin" --listen "127.0.0.1:$port" --shards 1 --log-level warn)
            if [[ $target == mbws-tls ]]; then
                command+=(--tls-cert "$out/tls/cert.pem" --tls-key "$out/tls/key.pem")
            fi
            # The durable log goes into the results directory, never into the working tree.
            if [[ $broker_has_data_dir == 1 ]]; then
                command+=(--data-dir "$out/data/$run")
            fi
            if [[ $broker_has_admin == 1 ]]; then
                command+=(--admin-listen off)
            fi
            ;;
        nats) command=("$nats_bin" -c "$out/nats.conf"); port=$nats_ws_port ;;
        nats-tls) command=("$nats_bin" -c "$out/nats-tls.conf"); port=$nats_tls_ws_port ;;
        nats-js)
            command=("$nats_bin" -c "$out/nats-js.conf" --store_dir "$out/data/$run")
            port=$nats_js_ws_port
            ;;
        mqtt) command=("$mosquitto_bin" -c "$out/mosquitto.conf"); port=$mqtt_ws_port ;;
        relay) command=("$relay_bin" --listen "127.0.0.1:$relay_port"); port=$relay_port ;;
    esac
    # The previous broker (stopped and waited for by PID) must also have let go of the port.
    wait_port_free "$port" || return 1
    mkdir -p "$out/logs"
    "${pin_broker[@]}" "${command[@]}" >"$out/logs/$run.broker.log" 2>&1 &
    broker_pid=$!
    wait_until_serving "$target" "$port" "$broker_pid" "$run.broker"
}

# stop_broker: stops the running broker and waits for its PID to exit (stop_pid).
stop_broker() {
    [[ -n $broker_pid ]] && stop_pid "$broker_pid"
    broker_pid=""
}

url_of() {
    case "$1" in
        mbws|mbws-light) echo "ws://127.0.0.1:$mbws_port/" ;;
        nats) echo "ws://127.0.0.1:$nats_ws_port/" ;;
        mbws-tls) echo "wss://localhost:$mbws_tls_port/" ;;
        nats-tls) echo "wss://localhost:$nats_tls_ws_port/" ;;
        nats-js) echo "ws://127.0.0.1:$nats_js_ws_port/" ;;
        mqtt) echo "ws://127.0.0.1:$mqtt_ws_port/" ;;
        relay) echo "127.0.0.1:$relay_port" ;;
    esac
}

# run_once TARGET NAME SCENARIO [FLAGS...]: one generator run against a fresh broker; the result
# goes to NAME.json, the generator's output to logs/NAME.log. Returns 1, with run_failure set to
# "what happened<TAB>its log", when the run gave no result.
run_failure=""
run_once() {
    local target=$1 name=$2 scenario=$3
    shift 3
    local json="$out/$name.json" status=0
    run_failure=""
    log "$name: $scenario ${*}"
    if ! start_broker "$target" "$name"; then
        run_failure="$(printf '%s\t%s' "broker did not start" "logs/$name.broker.log")"
        stop_broker
        return 1
    fi
    local -a variant=()
    [[ $target == mbws-light ]] && variant=(--light)
    [[ $target == *-tls ]] && variant=(--ca-file "$out/tls/cert.pem")
    local kind=${target%-light}
    kind=${kind%-tls}
    kind=${kind%-js}
    timeout --kill-after=10 "$run_timeout" "${pin_generator[@]}" "$bench_bin" "$scenario" \
        --target "$kind" "${variant[@]}" --url "$(url_of "$target")" --size "$size" \
        --warmup-s "$warmup" --broker-pid "$broker_pid" --json "$json" "$@" \
        >"$out/logs/$name.log" 2>&1 || status=$?
    local died=0
    kill -0 "$broker_pid" 2>/dev/null || died=1
    stop_broker
    rm -rf "$out/data/$name"
    if [[ $died == 1 ]]; then
        run_failure="$(printf '%s\t%s' "broker died during the run" "logs/$name.broker.log")"
    elif [[ $status -eq 124 || $status -eq 137 ]]; then
        run_failure="$(printf '%s\t%s' "stopped after the ${run_timeout} s limit of one run" "logs/$name.log")"
        log "$name TIMED OUT after $run_timeout s"
    elif [[ $status -ne 0 ]]; then
        run_failure="$(printf '%s\t%s' "mbws-bench exited with $status: $(tail -n 1 "$out/logs/$name.log" | tr -d '\t')" "logs/$name.log")"
        log "$name FAILED (exit $status): $(tail -n 3 "$out/logs/$name.log" | tr '\n' ' ')"
    elif [[ ! -s $json ]]; then
        run_failure="$(printf '%s\t%s' "no JSON written" "logs/$name.log")"
    fi
    if [[ -n $run_failure ]]; then
        rm -f "$json"
        return 1
    fi
}

# run TARGET NAME SCENARIO [FLAGS...]: run_once, and once more if it gave no result (a refused
# connection or a broker that did not start should not cost the suite a scenario). The first
# attempt's logs are kept as NAME.attempt1.*, and the retry is listed in retries.tsv (and in
# summary.md); a run that fails twice is listed in failures.tsv and does not stop the suite.
run() {
    local name=$2
    run_once "$@" && return 0
    local first_failure=$run_failure
    for file in "$out/logs/$name.log" "$out/logs/$name.broker.log"; do
        [[ -e $file ]] && mv "$file" "${file%.log}.attempt1.log"
    done
    log "$name: retrying once"
    if run_once "$@"; then
        printf '%s\t%s\n' "$name" "${first_failure/logs\/$name/logs/$name.attempt1}" >>"$out/retries.tsv"
    else
        printf '%s\t%s\n' "$name" "$run_failure" >>"$out/failures.tsv"
        note "RUN LOST: $name gave no result in two attempts: ${run_failure//$'\t'/ (see $out/}); summary.md lists it"
    fi
    return 0
}

# json_value FILE EXPRESSION: a number out of a result file (empty if absent or null).
json_value() {
    [[ -s $1 ]] || return 0
    python3 - "$1" "$2" <<'EOF'
import json, sys
value = json.load(open(sys.argv[1]))
for key in sys.argv[2].split("."):
    value = value.get(key) if isinstance(value, dict) else None
print("" if value is None else value)
EOF
}

# median_throughput TARGET: the median msgs_per_sec of the target's throughput repeats.
median_throughput() {
    python3 - "$out" "$1" <<'EOF'
import glob, json, statistics, sys
rates = []
for path in glob.glob(f"{sys.argv[1]}/{sys.argv[2]}-throughput-r*.json"):
    rate = json.load(open(path))["results"].get("msgs_per_sec")
    if rate:
        rates.append(rate)
print(statistics.median(rates) if rates else "")
EOF
}

# ---------------------------------------------------------------------------------------------
# Phase 1: saturated throughput, 1 publisher -> 1 consumer, for every target, and over TLS for
# mbws and nats.
for target in "${targets[@]}" "${tls_targets[@]}"; do
    wants throughput || break
    for repeat in $(seq "$repeats"); do
        run "$target" "$target-throughput-r$repeat" throughput --duration-s "$duration" \
            --publishers 1 --consumers 1 --addresses 1
    done
done

# The common rate: half the lower of our and NATS's maximum (ours alone without NATS), so both
# sustain it comfortably and their latencies compare at the same load.
declare -A max_rate=()
for target in "${targets[@]}"; do
    max_rate[$target]="$(median_throughput "$target")"
done
common_rate="$(python3 -c 'import sys
rates = [float(r) for r in sys.argv[1:] if r]
print(int(0.5 * min(rates)) if rates else "")' "${max_rate[mbws]:-}" "${max_rate[nats]:-}")"
if [[ -z $common_rate ]]; then
    note "no throughput result for mbws or nats: the common-rate latency runs are skipped"
else
    log "common rate: $common_rate msgs/s (half the lower of mbws ${max_rate[mbws]:-?} and nats ${max_rate[nats]:-?})"
fi

# Phase 2: every other scenario, per target (mbws-light: the common-rate latency only), each
# repeated like the throughput runs (NAME-rN; plot.py reports the median and the range).
for target in "${targets[@]}"; do
  for repeat in $(seq "$repeats"); do
    r="r$repeat"
    # The same fixed rates for every target, the raw relay included: its row is the floor that
    # the machine and the generator allow at that rate (docs/PERFORMANCE.md, "Latency at fixed
    # rates").
    if wants latency; then
        for rate in $latency_at; do
            # A rate the target cannot sustain would measure its queue, not its latency.
            if [[ -n ${max_rate[$target]:-} ]] && python3 -c 'import sys; sys.exit(float(sys.argv[1]) <= 0.9 * float(sys.argv[2]))' "$rate" "${max_rate[$target]}"; then
                [[ $repeat == 1 ]] && log "$target-latency-at-$rate: skipped, above 90% of $target's maximum (${max_rate[$target]} msgs/s)"
                continue
            fi
            run "$target" "$target-latency-at-$rate-$r" latency --rates 100 --max-rate "$rate" \
                --step-s "$((${step%.*} + 1))" --duration-s "$duration"
        done
    fi
    if [[ $target == mbws-light ]]; then
        if [[ -n $common_rate ]] && wants latency; then
            run "$target" "$target-latency-common-$r" latency --rates 100 --max-rate "$common_rate" \
                --step-s "$((${step%.*} + 1))" --duration-s "$duration"
        fi
        continue
    fi
    max_flag=()
    [[ -n ${max_rate[$target]:-} ]] && max_flag=(--max-rate "${max_rate[$target]}")
    if wants latency; then
        run "$target" "$target-latency-sweep-$r" latency --rates "$rates" --step-s "$step" \
            --duration-s "$duration" "${max_flag[@]}"
    fi
    if [[ -n $common_rate ]] && wants latency; then
        run "$target" "$target-latency-common-$r" latency --rates 100 --max-rate "$common_rate" \
            --step-s "$((${step%.*} + 1))" --duration-s "$duration"
    fi
    if wants fanout; then
        for subscribers in $fanout_subscribers; do
            run "$target" "$target-fanout-$subscribers-$r" fanout --subscribers "$subscribers" --duration-s "$duration"
        done
    fi
    if wants connections; then
        run "$target" "$target-connections-$r" connections --connections "$connections" \
            --source-ips "$source_ips" --duration-s "$hold"
    fi
    if [[ $target == mbws ]] && wants durable; then
        run "$target" "$target-durable-$r" durable --duration-s "$duration"
    elif [[ $target == nats ]] && wants durable; then
        run nats-js "nats-js-durable-$r" durable --duration-s "$duration"
    fi
  done
done

# ---------------------------------------------------------------------------------------------
# What ran, where; then the summary and the plots.
finished_at=$(date +%s)
skipped_list=""
for target in "${!skipped[@]}"; do
    skipped_list+="$target: ${skipped[$target]};"
done
python3 - "$out/run.json" <<EOF
import json, platform, subprocess, sys
def command(*argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""
cpu = ""
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
run = {
    "mode": "$mode",
    "started_utc": "$stamp",
    "elapsed_s": $((finished_at - started_at)),
    "commit": command("git", "-C", "$root", "describe", "--always", "--dirty"),
    "kernel": platform.release(),
    "cpu": cpu,
    "cpus": $(nproc),
    "pinned": ${#pin_broker[@]} > 0,
    "targets": "${targets[*]}".split(),
    "tls_targets": "${tls_targets[*]}".split(),
    "skipped": dict(item.split(": ", 1) for item in "$skipped_list".split(";") if item),
    "versions": {
        "nats-server": command("${nats_bin:-true}", "--version"),
        "mosquitto": (command("${mosquitto_bin:-true}", "-h").splitlines() or [""])[0],
    },
    "params": {
        "size_bytes": $size, "duration_s": $duration, "warmup_s": $warmup, "step_s": $step,
        "throughput_repeats": $repeats, "rates_percent": "$rates",
        "fanout_subscribers": "$fanout_subscribers".split(),
        "connections": $connections, "source_ips": $source_ips, "hold_s": $hold,
        "latency_at": [int(rate) for rate in "$latency_at".split()],
    },
    "common_rate": float("$common_rate") if "$common_rate" else None,
    "notes": [note for note in ["$connections_note"] if note],
}
json.dump(run, open(sys.argv[1], "w"), indent=2)
EOF
rmdir "$out/data" 2>/dev/null || true
python3 "$root/scripts/plot.py" "$out"
log "summary: $out/summary.md ($(( $(date +%s) - started_at )) s)"

if [[ $publish == 1 ]]; then
    mkdir -p "$root/docs/bench"
    cp "$out/summary.md" "$out"/*.svg "$root/docs/bench/"
    log "published summary.md and plots to docs/bench/"
fi
if [[ -s $out/failures.tsv ]]; then
    note "some runs failed (listed in $out/failures.tsv and in summary.md)"
fi
