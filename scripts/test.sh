#!/usr/bin/env bash
# Runs the whole test suite: unit, property and integration tests (the real broker binary over
# real sockets), including the interop tests with Python's `websockets`, whose virtualenv this
# script creates in .venv on first use, and the JavaScript client's Node tests (tests/js_client.rs),
# whose packages it installs with `npm ci` on first use. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! .venv/bin/python -c 'import websockets' >/dev/null 2>&1; then
    echo "test.sh: setting up .venv with Python websockets (interop peer)" >&2
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check 'websockets>=12,<16'
fi
export MBWS_PYTHON="$PWD/.venv/bin/python"

if [ ! -d clients/js/node_modules ]; then
    echo "test.sh: installing the JavaScript client's packages (npm ci --prefix clients/js)" >&2
    npm ci --prefix clients/js --no-audit --no-fund --loglevel=error
fi

# The cluster's build needs protoc, its tests a real etcd (tests/cluster.rs): Debian's packages.
for tool in protoc etcd; do
    if ! command -v "$tool" >/dev/null; then
        echo "test.sh: $tool is missing: apt-get install protobuf-compiler libprotobuf-dev etcd-server (as .ci/run does)" >&2
        exit 1
    fi
done

cargo test "$@"
