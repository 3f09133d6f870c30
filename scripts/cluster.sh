#!/usr/bin/env bash
# A local three-node mbws cluster for trying it out (docs/CLUSTER.md): one etcd and three
# brokers on loopback, each in its own directory under a temp dir. Ctrl-C (or SIGTERM) stops
# them all, by PID, and removes the directory.
#
#   scripts/cluster.sh                      # builds release binaries first
#   MBWS_BUILD=debug scripts/cluster.sh     # debug build
#
# Ports: etcd 127.0.0.1:23790 (peer 23800); nodes n1, n2, n3 on 127.0.0.1:7451..7453, their
# admin APIs on 127.0.0.1:7461..7463 (GET /api/cluster shows nodes, leases and placement).
# Needs etcd (Debian: apt-get install etcd-server) and protoc to build (protobuf-compiler).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v etcd >/dev/null || { echo "cluster.sh: etcd is missing: apt-get install etcd-server" >&2; exit 1; }
profile="${MBWS_BUILD:-release}"
if [ "$profile" = release ]; then
    cargo build --release --bin mbws-broker --bin mbws
else
    cargo build --bin mbws-broker --bin mbws
fi
bin="target/$profile"

dir="$(mktemp -d -t mbws-cluster.XXXXXX)"
pids=()
stop() {
    trap - INT TERM EXIT
    echo
    echo "cluster.sh: stopping ${pids[*]:-nothing}"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap stop INT TERM EXIT

etcd_url="http://127.0.0.1:23790"
etcd --name local --data-dir "$dir/etcd" \
    --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster local=http://127.0.0.1:23800 >"$dir/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    grep -q "ready to serve client requests" "$dir/etcd.log" && break
    sleep 0.1
done
grep -q "ready to serve client requests" "$dir/etcd.log" || { echo "cluster.sh: etcd did not start:" >&2; cat "$dir/etcd.log" >&2; exit 1; }
echo "etcd at $etcd_url (log $dir/etcd.log)"

for n in 1 2 3; do
    mkdir -p "$dir/n$n"
    "$bin/mbws-broker" --cluster local --etcd "$etcd_url" --node-name "n$n" \
        --listen "127.0.0.1:745$n" --admin-listen "127.0.0.1:746$n" --data-dir "$dir/n$n/data" \
        --shards 2 --durable-address 'ledger.*' >"$dir/n$n.log" 2>&1 &
    pids+=($!)
    echo "node n$n: ws://127.0.0.1:745$n/  admin http://127.0.0.1:746$n/api/cluster  (log $dir/n$n.log)"
done

cat <<EOF

Try:
  $bin/mbws send orders hello --url ws://127.0.0.1:7451/   # placed on the least loaded node on first use
  $bin/mbws send orders hello --url ws://127.0.0.1:7452/   # any node: a node that does not own it forwards the SEND to the owner
  $bin/mbws consume orders --url ws://127.0.0.1:7452/      # consume at the owner: elsewhere a SUBSCRIBE gets 4421 naming it
  curl -s http://127.0.0.1:7461/api/cluster                 # nodes, leases, placement
  curl -s -X PUT -d '{"owner":"n3"}' http://127.0.0.1:7461/api/cluster/addresses/orders   # move it
  kill -9 <a node's PID>   # its non-durable addresses move to the others within the lease (5 s)
PIDs: ${pids[*]}   Ctrl-C stops everything.
EOF
wait -n "${pids[@]}" || true
echo "cluster.sh: a process exited; see the logs in $dir" >&2
