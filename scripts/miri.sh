#!/usr/bin/env bash
# Runs the sans-IO codec and log tests under Miri (nightly), which executes them in an
# interpreter that reports undefined behaviour: out-of-bounds or misaligned access, use after
# free, invalid values, data races, and unsafe code that breaks the aliasing rules. Not part of
# .ci/run (it takes many minutes); docs/SECURITY.md, "Fuzzing and Miri", gives its scope and the
# last result.
#
# Scope, exactly:
#   - every test of mbws-proto: the RFC 6455 handshake, frames, masking and message assembly,
#     and both MBWS bindings (property tests run a handful of cases each under Miri);
#   - the broker's `store::` unit tests: the durable log's record format and the sans-IO halves
#     of recovery (segment scan, replay). The log's IO tests (src/store/tests.rs: files, flock,
#     io_uring through monoio) are compiled out under Miri, which cannot run io_uring.
#   - the broker's `broker::shared_message` unit tests: the stored messages' slabs and their
#     atomic reference counts (unsafe code), handles cloned and dropped on several threads.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup +nightly component list --installed 2>/dev/null | grep -q '^miri'; then
    echo "miri.sh: installing Miri for the nightly toolchain" >&2
    rustup +nightly component add miri rust-src
fi
# Property tests without an explicit case count run this many under Miri.
export PROPTEST_CASES="${PROPTEST_CASES:-4}"
# Proptest reads and writes its failure files (proptest-regressions/): allow file access.
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"

echo "== miri: mbws-proto (all tests)"
cargo +nightly miri test -p mbws-proto
echo "== miri: mbws store:: unit tests (record format, recovery scan and replay)"
cargo +nightly miri test -p mbws --lib store::
echo "== miri: mbws broker::shared_message unit tests (the message slabs' reference counts, across threads)"
cargo +nightly miri test -p mbws --lib broker::shared_message
