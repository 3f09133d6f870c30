#!/usr/bin/env bash
# Runs the deterministic simulator (src/sim/) over many seeds, or replays one.
#
#   scripts/simulate.sh                      1,000 seeds from 0
#   scripts/simulate.sh --seeds 100000       more seeds
#   scripts/simulate.sh --from 5000          starting elsewhere
#   scripts/simulate.sh --seed 17 [--trace]  one seed, with its report (and every event)
#   MBWS_SIM_CREDENTIALS=0 scripts/simulate.sh ...  without expiring credentials
#
# A failing seed prints the invariant it broke and the command that replays it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."

seeds=1000
from=0
seed=""
trace=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --seeds) seeds="$2"; shift 2 ;;
        --from) from="$2"; shift 2 ;;
        --seed) seed="$2"; shift 2 ;;
        --trace) trace=1; shift ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "simulate.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "$seed" ]]; then
    # `env`: an assignment produced by an expansion is not an assignment to the shell.
    env MBWS_SIM_SEED="$seed" ${trace:+MBWS_SIM_TRACE=1} \
        cargo test --release --quiet --lib sim::tests::one_seed -- --ignored --nocapture
else
    MBWS_SIM_SEEDS="$seeds" MBWS_SIM_FIRST_SEED="$from" \
        cargo test --release --quiet --lib sim::tests::many_seeds -- --ignored --nocapture
fi
