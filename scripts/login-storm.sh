#!/usr/bin/env bash
# What a storm of password logins costs the other clients of a shard, and what a login costs
# the client that makes it (docs/SECURITY.md, "Password checks and latency").
#
#   scripts/login-storm.sh [--users N] [--rate MSGS_PER_S] [--duration-s S] [--no-build]
#
# One broker (--shards 1, pinned to CPU 0 with taskset, like scripts/bench.sh) with N users,
# each with its own argon2id hash (the same password, different salts: every first login is a
# real verification, none is served from the verification cache). mbws-bench (pinned to CPU 1)
# measures 1 -> 1 latency at a fixed rate twice: alone, then while a Python client (asyncio +
# websockets, also on CPU 1) logs every user in, 32 logins at a time, each one a new connection
# (upgrade, OPEN with login and passcode, OPENED, close). Prints both latency rows and the
# logins' own times; the files stay in the results directory. Stops only what it started.
set -euo pipefail

users=400
rate=5000
duration=5
build=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --users) users="${2:?--users needs a number}"; shift ;;
        --rate) rate="${2:?--rate needs msgs/s}"; shift ;;
        --duration-s) duration="${2:?--duration-s needs seconds}"; shift ;;
        --no-build) build=0 ;;
        -h|--help) sed -n '2,/^set -euo pipefail$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "login-storm.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ $build == 1 ]]; then
    cargo build --release --bins >&2
fi
# The login client needs Python's websockets: the virtualenv scripts/test.sh makes.
if ! .venv/bin/python -c 'import websockets' >/dev/null 2>&1; then
    echo "login-storm: setting up .venv with Python websockets" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check 'websockets>=12,<16'
fi
out="$root/bench-results/login-storm-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
password="storm-password-$$"

broker_pid=""
storm_pid=""
cleanup() {
    for pid in $storm_pid $broker_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT

if [[ $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
    pin_broker=(taskset -c 0)
    pin_clients=(taskset -c 1)
else
    pin_broker=()
    pin_clients=()
fi

echo "login-storm: hashing $users passwords" >&2
{
    seq "$users" | xargs -P "$(nproc)" -I{} sh -c \
        "printf '%s' '$password' | '$root/target/release/mbws' hash-password | sed 's/^/user{} /'"
} >"$out/hashes.txt"
{
    echo "listen = \"127.0.0.1:0\""
    echo "admin-listen = \"off\""
    echo "[auth]"
    echo "allow-anonymous = true"
    grep '^user' "$out/hashes.txt" | while read -r name hash; do
        printf '[[auth.user]]\nname = "%s"\npassword-hash = "%s"\n' "$name" "$hash"
    done
} >"$out/broker.toml"

"${pin_broker[@]}" "$root/target/release/mbws-broker" --config "$out/broker.toml" --shards 1 \
    --data-dir "$out/data" --log-level info --summary-interval-secs 0 >"$out/broker.log" 2>&1 &
broker_pid=$!
port=""
for _ in $(seq 100); do
    port="$(sed -n 's/.* listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$out/broker.log" | head -n 1)"
    [[ -n $port ]] && break
    sleep 0.1
done
if [[ -z $port ]]; then
    echo "login-storm: the broker did not start; its log:" >&2
    cat "$out/broker.log" >&2
    exit 1
fi

latency() {
    "${pin_clients[@]}" "$root/target/release/mbws-bench" latency --target mbws --url "ws://127.0.0.1:$port/" \
        --rates 100 --max-rate "$rate" --step-s "$duration" --warmup-s 1 --broker-pid "$broker_pid" \
        --json "$out/$1.json" >"$out/$1.log" 2>&1
}

echo "login-storm: latency at $rate msgs/s without logins" >&2
latency quiet

echo "login-storm: latency at $rate msgs/s during $users logins" >&2
"${pin_clients[@]}" nice -n 5 .venv/bin/python - "$port" "$password" "$users" "$out/logins.json" <<'PY' &
import asyncio, json, struct, sys, time
import websockets
port, password, users, result = int(sys.argv[1]), sys.argv[2].encode(), int(sys.argv[3]), sys.argv[4]
def open_frame(login):
    # version 1, OPEN, flags 0; last-received-seq, heartbeat-ms; session-id, login, passcode
    return (struct.pack("!BBBQI", 1, 0x01, 0, 0, 0) + struct.pack("!B", 0)
            + struct.pack("!B", len(login)) + login + struct.pack("!H", len(password)) + password)
times, refused = [], 0
async def login(index):
    global refused
    started = time.perf_counter()
    async with websockets.connect(f"ws://127.0.0.1:{port}/", subprotocols=["MBWS.huawei.com"],
                                  open_timeout=30, close_timeout=1) as socket:
        await socket.send(open_frame(f"user{index}".encode()))
        answer = await asyncio.wait_for(socket.recv(), 30)
        if answer[1] != 0x02:
            refused += 1
        times.append(time.perf_counter() - started)
async def main():
    queue = list(range(1, users + 1))
    async def worker():
        while queue:
            await login(queue.pop())
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(32)))
    elapsed = time.perf_counter() - started
    times.sort()
    pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))] * 1000, 1)
    json.dump({"logins": len(times), "refused": refused, "seconds": round(elapsed, 2),
               "p50_ms": pick(0.5), "p99_ms": pick(0.99), "max_ms": round(times[-1] * 1000, 1)},
              open(result, "w"))
asyncio.run(main())
PY
storm_pid=$!
# Let the storm reach full speed before measuring.
sleep 0.5
latency storm
wait "$storm_pid" || echo "login-storm: the login client failed" >&2
storm_pid=""

python3 - "$out" "$rate" <<'PY'
import json, sys
out, rate = sys.argv[1], sys.argv[2]
def row(name):
    step = json.load(open(f"{out}/{name}.json"))["results"]["steps"][0]
    return step
quiet, storm = row("quiet"), row("storm")
logins = json.load(open(f"{out}/logins.json"))
print(f"| other clients, 1 -> 1 at {rate} msgs/s | p50 µs | p99 µs | p99.9 µs | max µs |")
print("|---|--:|--:|--:|--:|")
for label, step in (("without logins", quiet), ("during the login storm", storm)):
    print(f"| {label} | {step['p50_us']:.0f} | {step['p99_us']:.0f} | {step['p999_us']:.0f} | {step['max_us']:.0f} |")
print()
print(f"logins: {logins['logins']} in {logins['seconds']} s ({logins['logins'] / logins['seconds']:.0f}/s), "
      f"refused {logins['refused']}; each login (connect, upgrade, OPEN, OPENED): "
      f"p50 {logins['p50_ms']} ms, p99 {logins['p99_ms']} ms, max {logins['max_ms']} ms")
PY
echo "login-storm: results in $out" >&2
