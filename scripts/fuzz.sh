#!/usr/bin/env bash
# Runs the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer; nightly Rust) one after the other, each
# for a bounded time, and prints executions, time and corpus size per target. Not part of
# .ci/run (too long); the crash inputs it finds are kept in tests/fuzz-regressions/<target>/,
# which plain `cargo test` replays (tests/fuzz_regressions.rs). docs/SECURITY.md, "Fuzzing and
# Miri", lists the targets and the figures of the last long runs.
#
#   bash scripts/fuzz.sh                       every target, 60 s each
#   bash scripts/fuzz.sh --seconds 900 --target websocket --target auth
#
# The corpus grows in fuzz/corpus/<target>/ (only the seed-* files are committed). A crash
# stops that target's run: libFuzzer prints the input's path (fuzz/artifacts/<target>/crash-*);
# reproduce it with `cargo +nightly fuzz run <target> <that file>`, fix the bug, and copy the
# file into tests/fuzz-regressions/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds="$2"; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1 (use --seconds N, --target NAME)" >&2; exit 2 ;;
    esac
done
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz.sh: --seconds takes a positive whole number of seconds, not \"$seconds\"" >&2
    exit 2
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz.sh: cargo-fuzz needs nightly Rust: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

cd fuzz
all=$(cargo +nightly fuzz list)
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets <<<"$all"
fi
for target in "${targets[@]}"; do
    if ! grep -qx "$target" <<<"$all"; then
        echo "fuzz.sh: no target \"$target\"; the targets are: $(echo $all)" >&2
        exit 2
    fi
done

cargo +nightly fuzz build
summary=()
status=0
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" logs
    log="logs/$target.log"
    echo "== $target: ${seconds} s (log: fuzz/$log)"
    start=$(date +%s)
    # -max_total_time bounds the run; -timeout flags an input that takes over 10 s (a hang);
    # -rss_limit_mb catches unbounded allocation.
    if cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (see fuzz/$log and fuzz/artifacts/$target/)"
        status=1
    fi
    elapsed=$(($(date +%s) - start))
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
    corpus=$(find "corpus/$target" -type f | wc -l)
    line="$target: $runs executions in ${elapsed} s, corpus $corpus inputs, $result"
    echo "$line"
    summary+=("$line")
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
