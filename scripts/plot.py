#!/usr/bin/env python3
"""Summary tables and SVG plots for one scripts/bench.sh results directory.

    python3 scripts/plot.py bench-results/<timestamp>/

Reads every result file mbws-bench wrote there (`<target>-<scenario>[-<variant>][-r<N>].json`,
each {"scenario", "target", "params", "results"}; `-r<N>` is the N-th repeat of a run, and a
table shows the median repeat with the range over all of them), run.json (what ran, where),
failures.tsv and retries.tsv, and writes into the same directory:

- summary.md: every broker side by side with the ratio of ours (mbws) to each peer, the
  latency sweeps, the cost of TLS (wss:// against ws://, ours and NATS's), and the table of
  performance targets with PASS/MISS;
- throughput.svg, cpu.svg: bars per broker (1 publisher -> 1 consumer);
- latency.svg: latency percentiles against the achieved rate, per broker, log scale;
- fanout.svg: deliveries per second against the number of subscribers.

Standard library only: the SVG is written by hand (axes, ticks, labels, legend). A missing or
failed run leaves a gap ("n/a") instead of stopping the report.
"""

import glob
import json
import math
import os
import re
import statistics
import sys
from xml.sax.saxutils import escape

OURS = "mbws"
# Display order and colours; a target not in this list is appended in name order.
TARGET_ORDER = ["mbws", "mbws-light", "nats", "mqtt", "relay"]
TARGET_NAMES = {
    "mbws": "mbws (ours)",
    "mbws-light": "mbws MBLWS (ours)",
    "nats": "NATS",
    "mqtt": "mosquitto (MQTT)",
    "relay": "raw relay",
}
COLOURS = {"mbws": "#1f6fb4", "mbws-light": "#6fa8dc", "nats": "#2a9d3f", "mqtt": "#e07b10", "relay": "#707070"}
FALLBACK_COLOURS = ["#9b59b6", "#c0392b", "#16a085", "#8e6c3a"]

# ---------------------------------------------------------------------------------------------
# Loading results


def load_json(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        print(f"plot.py: skipping {path}: {error}", file=sys.stderr)
        return None


class Results:
    """Every result of one run, indexed the way the report needs them."""

    def __init__(self, directory):
        self.directory = directory
        self.run = load_json(os.path.join(directory, "run.json")) or {}
        self.by_name = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
            name = os.path.splitext(os.path.basename(path))[0]
            if name == "run":
                continue
            document = load_json(path)
            if isinstance(document, dict) and isinstance(document.get("results"), dict):
                self.by_name[name] = document
        found = {document.get("target") for document in self.by_name.values()} - {None}
        found |= set(self.run.get("targets", []))
        self.targets = [t for t in TARGET_ORDER if t in found] + sorted(found - set(TARGET_ORDER))
        self.failures = read_tsv(os.path.join(directory, "failures.tsv"))
        self.retries = read_tsv(os.path.join(directory, "retries.tsv"))

    def result(self, name):
        document = self.by_name.get(name)
        return document["results"] if document else None

    def repeats(self, name):
        """The results of run `name` and of its repeats `name-rN`, in repeat order."""
        pattern = re.compile(re.escape(name) + r"(-r(\d+))?$")
        found = []
        for run_name, document in self.by_name.items():
            match = pattern.match(run_name)
            if match:
                found.append((int(match.group(2) or 0), document["results"]))
        return [results for _, results in sorted(found, key=lambda item: item[0])]

    def median(self, name, value):
        """The repeat of `name` whose value(results) is the median (the lower middle one of an
        even count), or None; repeats without the value are left out."""
        runs = [run for run in self.repeats(name) if number(value(run)) is not None]
        runs.sort(key=lambda run: number(value(run)))
        return runs[(len(runs) - 1) // 2] if runs else None

    def spread(self, name, value):
        """(low, high, count) of value(results) over the repeats of `name`, or None."""
        values = [number(value(run)) for run in self.repeats(name)]
        values = [v for v in values if v is not None]
        return (min(values), max(values), len(values)) if values else None

    def throughput_runs(self, target):
        runs = []
        for name, document in self.by_name.items():
            if name.startswith(f"{target}-throughput") and document.get("scenario") == "throughput":
                if number(document["results"].get("msgs_per_sec")) is not None:
                    runs.append(document["results"])
        return sorted(runs, key=lambda results: results["msgs_per_sec"])

    def throughput(self, target):
        """The median throughput run (by msgs/s) of the target's repeats, or None."""
        runs = self.throughput_runs(target)
        return runs[(len(runs) - 1) // 2] if runs else None

    def latency_sweep(self, target):
        """The sweep's steps, each field the median over the repeats at that step."""
        sweeps = [run.get("steps") or [] for run in self.repeats(f"{target}-latency-sweep")]
        sweeps = [steps for steps in sweeps if steps]
        if not sweeps:
            return []
        merged = []
        for index in range(min(len(steps) for steps in sweeps)):
            at_step = [steps[index] for steps in sweeps]
            step = dict(at_step[0])
            for key in step:
                values = [number(other.get(key)) for other in at_step]
                values = [v for v in values if v is not None]
                if values and number(step[key]) is not None:
                    step[key] = statistics.median(values)
            merged.append(step)
        return merged

    def latency_common(self, target):
        """The common-rate step of the repeat with the median p99."""
        run = self.median(f"{target}-latency-common", lambda run: first_step(run).get("p99_us"))
        return first_step(run) if run else None

    def latency_at_rates(self):
        """The fixed rates (msgs/s) at which some target's latency was measured."""
        rates = set()
        for name in self.by_name:
            match = re.match(r".+-latency-at-(\d+)(-r\d+)?$", name)
            if match:
                rates.add(int(match.group(1)))
        return sorted(rates)

    def latency_at(self, target, rate):
        """The step of the target's fixed-rate run at `rate` with the median p99, or None."""
        run = self.median(f"{target}-latency-at-{rate}", lambda run: first_step(run).get("p99_us"))
        return first_step(run) if run else None

    def fanout(self, target):
        """{subscribers: results} of the target's fan-out runs (the median repeat by deliveries/s)."""
        sizes = set()
        for name, document in self.by_name.items():
            match = re.match(re.escape(target) + r"-fanout-(\d+)(-r\d+)?$", name)
            if match and document.get("scenario") == "fanout":
                sizes.add(int(match.group(1)))
        runs = {}
        for size in sorted(sizes):
            run = self.median(f"{target}-fanout-{size}", lambda run: run.get("deliveries_per_sec"))
            if run:
                runs[size] = run
        return runs

    def fanout_sizes(self):
        return sorted({m for target in self.targets for m in self.fanout(target)})

    def connections(self, target):
        return self.median(f"{target}-connections", lambda run: run.get("rss_per_connection_bytes"))

    def durable(self, target):
        return self.median(f"{target}-durable", lambda run: run.get("msgs_per_sec"))


def first_step(run):
    steps = (run or {}).get("steps") or []
    return steps[0] if steps else {}


def read_tsv(path):
    """Rows of (run, what happened, log) from failures.tsv or retries.tsv."""
    rows = []
    if os.path.exists(path):
        with open(path) as file:
            for line in file:
                fields = line.rstrip("\n").split("\t")
                if fields and fields[0]:
                    rows.append((fields + [""] * 3)[:3])
    return rows


# ---------------------------------------------------------------------------------------------
# Numbers and formatting


def number(value):
    """A finite float, or None for absent, null, NaN or non-numeric values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def get(results, key):
    return number(results.get(key)) if results else None


def ratio(ours, theirs):
    ours, theirs = number(ours), number(theirs)
    if ours is None or theirs is None or theirs == 0:
        return None
    return ours / theirs


def fmt_count(value):
    value = number(value)
    return "n/a" if value is None else f"{value:,.0f}"


def fmt_fixed(value, digits=1):
    value = number(value)
    return "n/a" if value is None else f"{value:,.{digits}f}"


def fmt_us(value):
    value = number(value)
    if value is None:
        return "n/a"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def fmt_ratio(value):
    value = number(value)
    if value is None:
        return "n/a"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def fmt_bytes(value):
    value = number(value)
    if value is None:
        return "n/a"
    return f"{value:,.0f} B ({value / 1024:.1f} KiB)"


def si(value):
    """Short axis label: 1.5k, 20k, 1.2M."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            text = f"{value / limit:.2f}".rstrip("0").rstrip(".")
            return text + suffix
    if magnitude >= 1 or value == 0:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.3g}"


def short(value):
    """Three significant digits with an SI suffix, for values printed on bars: 414k, 1.23M."""
    magnitude = abs(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if magnitude >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def target_label(target):
    return TARGET_NAMES.get(target, target)


def colour(target, targets):
    if target in COLOURS:
        return COLOURS[target]
    extra = [t for t in targets if t not in COLOURS]
    return FALLBACK_COLOURS[extra.index(target) % len(FALLBACK_COLOURS)]


# ---------------------------------------------------------------------------------------------
# summary.md


def markdown_table(header, rows, align=None):
    align = align or ["---"] + ["--:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def side_by_side(results):
    """Rows of (metric, value per target, ratio of ours to each peer)."""
    targets = results.targets
    peers = [t for t in targets if t != OURS]
    rows = []

    def add(label, values, formatter):
        cells = [formatter(values.get(t)) for t in targets]
        ratios = [fmt_ratio(ratio(values.get(OURS), values.get(peer))) for peer in peers]
        rows.append([label] + cells + ratios)

    throughput = {t: results.throughput(t) for t in targets}
    add("msgs/s, 1 -> 1, 64 B (higher is better)", {t: get(throughput[t], "msgs_per_sec") for t in targets}, fmt_count)
    add("MB/s of bodies", {t: get(throughput[t], "mb_per_sec") for t in targets}, fmt_fixed)
    add(
        "broker CPU s per million msgs (lower is better)",
        {t: get(throughput[t], "cpu_s_per_million") for t in targets},
        lambda v: fmt_fixed(v, 2),
    )
    common = {t: results.latency_common(t) for t in targets}
    add("achieved rate at the common rate, msgs/s", {t: get(common[t], "achieved_rate") for t in targets}, fmt_count)
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        add(
            f"{label} latency at the common rate, µs (lower is better)",
            {t: get(common[t], key) for t in targets},
            fmt_us,
        )
    for subscribers in results.fanout_sizes():
        add(
            f"fan-out to {subscribers}: deliveries/s (higher is better)",
            {t: get(results.fanout(t).get(subscribers), "deliveries_per_sec") for t in targets},
            fmt_count,
        )
    for subscribers in results.fanout_sizes():
        add(
            f"fan-out to {subscribers}: broker CPU s per million deliveries",
            {t: get(results.fanout(t).get(subscribers), "cpu_s_per_million") for t in targets},
            lambda v: fmt_fixed(v, 2),
        )
    add(
        "RSS per idle connection, bytes (lower is better)",
        {t: get(results.connections(t), "rss_per_connection_bytes") for t in targets},
        fmt_count,
    )
    add(
        "seconds to open the idle connections",
        {t: get(results.connections(t), "seconds_to_open") for t in targets},
        lambda v: fmt_fixed(v, 2),
    )
    header = ["metric"] + [target_label(t) for t in targets] + [f"{OURS} / {peer}" for peer in peers]
    return header, rows


def goal_rows(results):
    """The milestone's performance targets: (goal, measured, threshold, PASS/MISS)."""
    ours_tp, nats_tp, relay_tp = (results.throughput(t) for t in (OURS, "nats", "relay"))
    ours_common, nats_common = results.latency_common(OURS), results.latency_common("nats")
    largest = max(results.fanout_sizes(), default=None)
    fanout_m = 1000 if 1000 in results.fanout_sizes() else largest
    goals = [
        ("msgs/s vs NATS (1 -> 1, 64 B)", ratio(get(ours_tp, "msgs_per_sec"), get(nats_tp, "msgs_per_sec")), ">=", 2.0, "x"),
        (
            "broker CPU per message vs NATS",
            ratio(get(ours_tp, "cpu_s_per_million"), get(nats_tp, "cpu_s_per_million")),
            "<=",
            0.5,
            "x",
        ),
        (
            "p99 latency at the common rate vs NATS",
            ratio(get(ours_common, "p99_us"), get(nats_common, "p99_us")),
            "<=",
            0.5,
            "x",
        ),
        (
            # Without a fan-out run there is no size to name: the row says so instead of "None".
            f"fan-out to {fanout_m} deliveries/s vs NATS" if fanout_m else "fan-out deliveries/s vs NATS (no fan-out run)",
            ratio(
                get(results.fanout(OURS).get(fanout_m), "deliveries_per_sec"),
                get(results.fanout("nats").get(fanout_m), "deliveries_per_sec"),
            ),
            ">=",
            2.0,
            "x",
        ),
        ("msgs/s vs the raw relay (1 -> 1, 64 B)", ratio(get(ours_tp, "msgs_per_sec"), get(relay_tp, "msgs_per_sec")), ">=", 0.7, "x"),
        (
            "RSS per idle session",
            (lambda v: None if v is None else v / 1024)(get(results.connections(OURS), "rss_per_connection_bytes")),
            "<=",
            8.0,
            " KiB",
        ),
    ]
    # Latency at the fixed rates, where both were measured (issue 14 item 3).
    for rate in results.latency_at_rates():
        ours, nats = results.latency_at(OURS, rate), results.latency_at("nats", rate)
        if ours and nats:
            goals.append((f"p99 latency at {rate:,} msgs/s vs NATS", ratio(ours.get("p99_us"), nats.get("p99_us")), "<=", 0.5, "x"))
            goals.append((f"p99.9 latency at {rate:,} msgs/s vs NATS", ratio(ours.get("p999_us"), nats.get("p999_us")), "<=", 1.0, "x"))
    rows = []
    for goal, measured, comparison, threshold, unit in goals:
        if measured is None:
            verdict, shown = "NO DATA", "n/a"
        else:
            passed = measured >= threshold if comparison == ">=" else measured <= threshold
            verdict = "PASS" if passed else "MISS"
            shown = f"{measured:.2f}{unit}"
        rows.append([goal, shown, f"{comparison} {threshold:g}{unit}", f"**{verdict}**"])
    return rows


def light_rows(results):
    """Our light subprotocol against NATS, where it was measured."""
    light, nats = results.throughput("mbws-light"), results.throughput("nats")
    rows = []
    throughput = ratio(get(light, "msgs_per_sec"), get(nats, "msgs_per_sec"))
    if throughput is not None:
        rows.append(["msgs/s vs NATS (1 -> 1, 64 B)", fmt_ratio(throughput), ">= 2x"])
    cpu = ratio(get(light, "cpu_s_per_million"), get(nats, "cpu_s_per_million"))
    if cpu is not None:
        rows.append(["broker CPU per message vs NATS", fmt_ratio(cpu), "<= 0.5x"])
    p99 = ratio(get(results.latency_common("mbws-light"), "p99_us"), get(results.latency_common("nats"), "p99_us"))
    if p99 is not None:
        rows.append(["p99 latency at the common rate vs NATS", fmt_ratio(p99), "<= 0.5x"])
    return rows


def tls_rows(results):
    """The cost of TLS for ours and for NATS: each broker's wss:// run against its ws:// run.

    Rows of (metric, ours ws, ours wss, ours wss/ws, NATS ws, NATS wss, NATS wss/ws), and the
    two goal rows (our TLS cost relative to NATS's, for throughput and CPU per message).
    """
    pairs = {t: (results.throughput(t), results.throughput(f"{t}-tls")) for t in (OURS, "nats")}
    if not any(tls for _, tls in pairs.values()):
        return [], []
    rows = []
    cost = {}
    for metric, key, formatter in (
        ("msgs/s, 1 -> 1, 64 B", "msgs_per_sec", fmt_count),
        ("broker CPU s per million msgs", "cpu_s_per_million", lambda v: fmt_fixed(v, 3)),
    ):
        row = [metric]
        for target in (OURS, "nats"):
            plain, tls = (get(run, key) for run in pairs[target])
            cost[(target, key)] = ratio(tls, plain)
            row += [formatter(plain), formatter(tls), fmt_ratio(cost[(target, key)])]
        rows.append(row)
    goals = []
    for goal, key, better_high in (
        ("msgs/s kept under TLS (wss/ws), ours vs NATS's", "msgs_per_sec", True),
        ("CPU per message added by TLS (wss/ws), ours vs NATS's", "cpu_s_per_million", False),
    ):
        ours, theirs = cost[(OURS, key)], cost[("nats", key)]
        if ours is None or theirs is None:
            goals.append([goal, "n/a", "", "**NO DATA**"])
            continue
        passed = ours >= theirs if better_high else ours <= theirs
        goals.append(
            [goal, f"{ours:.2f}x vs {theirs:.2f}x", ">= NATS's" if better_high else "<= NATS's", f"**{'PASS' if passed else 'MISS'}**"]
        )
    return rows, goals


def durable_comparison(results):
    """Rows of (broker, msgs/s, ack p50, ack p99, CPU) for mbws's durable run and NATS JetStream's,
    and the goal rows (msgs/s >= 2x, ack p99 <= 0.5x JetStream's)."""
    runs = [(label, results.durable(target)) for label, target in (("mbws (ours)", OURS), ("NATS JetStream", "nats-js"))]
    runs = [(label, run) for label, run in runs if run and not run.get("unsupported")]
    rows = [
        [
            label,
            fmt_count(run.get("msgs_per_sec")),
            fmt_us(run.get("receipt_p50_us")),
            fmt_us(run.get("receipt_p99_us")),
            fmt_fixed(run.get("cpu_s_per_million"), 3),
        ]
        for label, run in runs
    ]
    ours, jetstream = results.durable(OURS), results.durable("nats-js")
    goals = []
    if ours and jetstream:
        for goal, key, comparison, threshold in (
            ("durable msgs/s vs JetStream", "msgs_per_sec", ">=", 2.0),
            ("acknowledgement p99 vs JetStream", "receipt_p99_us", "<=", 0.5),
        ):
            measured = ratio(get(ours, key), get(jetstream, key))
            if measured is None:
                goals.append([goal, "n/a", f"{comparison} {threshold:g}x", "**NO DATA**"])
                continue
            passed = measured >= threshold if comparison == ">=" else measured <= threshold
            goals.append([goal, f"{measured:.2f}x", f"{comparison} {threshold:g}x", f"**{'PASS' if passed else 'MISS'}**"])
    return rows, goals


def spread_rows(results):
    """(run, metric, repeats, low, high, ratio) for every run measured more than once."""
    rows = []

    def add(name, metric, value, formatter):
        spread = results.spread(name, value)
        if spread and spread[2] > 1:
            low, high, count = spread
            rows.append([name, metric, count, formatter(low), formatter(high), fmt_ratio(ratio(high, low))])

    for target in results.targets + [f"{t}-tls" for t in results.targets] + ["nats-js"]:
        add(f"{target}-throughput", "msgs/s", lambda run: run.get("msgs_per_sec"), fmt_count)
        add(f"{target}-latency-common", "p99 µs", lambda run: first_step(run).get("p99_us"), fmt_us)
        for rate in results.latency_at_rates():
            add(f"{target}-latency-at-{rate}", "p99 µs", lambda run: first_step(run).get("p99_us"), fmt_us)
            add(f"{target}-latency-at-{rate}", "p99.9 µs", lambda run: first_step(run).get("p999_us"), fmt_us)
        for size in results.fanout_sizes():
            add(f"{target}-fanout-{size}", "deliveries/s", lambda run: run.get("deliveries_per_sec"), fmt_count)
        add(f"{target}-connections", "RSS per session", lambda run: run.get("rss_per_connection_bytes"), fmt_bytes)
        add(f"{target}-durable", "msgs/s", lambda run: run.get("msgs_per_sec"), fmt_count)
    return rows


def sweep_table(results, target):
    steps = results.latency_sweep(target)
    if not steps:
        return None
    rows = []
    for step in steps:
        rows.append(
            [
                fmt_count(step.get("target_rate")),
                fmt_count(step.get("achieved_rate")),
                fmt_count(step.get("messages")),
                fmt_us(step.get("p50_us")),
                fmt_us(step.get("p90_us")),
                fmt_us(step.get("p99_us")),
                fmt_us(step.get("p999_us")),
                fmt_us(step.get("max_us")),
            ]
        )
    header = ["target msgs/s", "achieved msgs/s", "messages", "p50 µs", "p90 µs", "p99 µs", "p99.9 µs", "max µs"]
    return markdown_table(header, rows)


def latency_at_table(results):
    """Every target's latency at each fixed rate, the raw relay's row beside it."""
    rows = []
    for rate in results.latency_at_rates():
        nats = results.latency_at("nats", rate)
        for target in results.targets:
            step = results.latency_at(target, rate)
            if not step:
                continue
            spread = results.spread(f"{target}-latency-at-{rate}", lambda run: first_step(run).get("p99_us"))
            runs = spread[2] if spread else 1
            p99_range = f"{fmt_us(spread[0])}-{fmt_us(spread[1])}" if spread and runs > 1 else ""
            rows.append(
                [
                    fmt_count(rate),
                    target_label(target),
                    fmt_count(step.get("achieved_rate")),
                    fmt_us(step.get("p50_us")),
                    fmt_us(step.get("p99_us")),
                    p99_range,
                    fmt_us(step.get("p999_us")),
                    fmt_us(step.get("send_lag_p99_us")),
                    fmt_ratio(ratio(step.get("p99_us"), get(nats, "p99_us"))) if nats else "n/a",
                    fmt_ratio(ratio(step.get("p999_us"), get(nats, "p999_us"))) if nats else "n/a",
                ]
            )
    if not rows:
        return None
    header = ["msgs/s", "target", "achieved", "p50 µs", "p99 µs", "p99 range", "p99.9 µs", "generator send lag p99 µs", "p99 / NATS", "p99.9 / NATS"]
    return markdown_table(header, rows)


def write_summary(results, plots):
    run = results.run
    params = run.get("params", {})
    lines = ["# Benchmark summary", ""]
    context = [
        f"mode **{run.get('mode', '?')}**",
        f"started {run.get('started_utc', '?')} UTC",
        f"commit `{run.get('commit', '?')}`",
        f"{run.get('cpus', '?')} CPUs ({run.get('cpu', '?')})",
        f"kernel {run.get('kernel', '?')}",
        f"{run.get('elapsed_s', '?')} s",
    ]
    lines.append(", ".join(context) + ".")
    lines.append("")
    pinned = "broker pinned to CPU 0, generator to CPU 1" if run.get("pinned") else "unpinned (fewer than 2 CPUs)"
    lines.append(
        f"Every number below comes from this one run: {pinned}, one broker process per run "
        f"(mbws with `--shards 1`), {params.get('size_bytes', 64)}-byte bodies, "
        f"{params.get('duration_s', '?')} s measured after {params.get('warmup_s', '?')} s of warm-up, "
        "latencies corrected for coordinated omission, broker CPU from /proc/PID/stat. "
        "Ratios are ours divided by the peer's. Method: docs/PERFORMANCE.md, \"Benchmark suite\"."
    )
    versions = {name: version for name, version in run.get("versions", {}).items() if version}
    if versions:
        lines.append("")
        lines.append("Peers: " + "; ".join(f"{name} `{version}`" for name, version in versions.items()) + ".")
    for note in run.get("notes", []):
        lines += ["", f"Note: {note}."]
    for target, reason in run.get("skipped", {}).items():
        lines += ["", f"**{target} was skipped: {reason}.**"]
    if results.failures:
        # Said up front: a lost run is a cell that reads n/a (or a median over fewer repeats)
        # below, which must not pass for a result.
        lost = ", ".join(f"`{name}`" for name, _, _ in results.failures)
        lines += ["", f"**{len(results.failures)} run(s) gave no result after a retry: {lost}. Their cells read "
                  "n/a, or are the median of the repeats that did; what happened is under \"Runs that failed\".**"]

    lines += ["", "## Targets", ""]
    lines.append(markdown_table(["goal", "measured", "target", "result"], goal_rows(results), ["---", "--:", "--:", ":-:"]))
    light = light_rows(results)
    if light:
        lines += ["", "The targets are judged on MBWS (reliable: receipts, client acknowledgements). For "
                  "reference, MBLWS, at most once like core NATS:", ""]
        lines.append(markdown_table(["MBLWS against NATS", "measured", "target"], light, ["---", "--:", "--:"]))

    lines += ["", "## Side by side", ""]
    common_rate = number(run.get("common_rate"))
    if common_rate is not None:
        lines.append(
            f"The common rate is {common_rate:,.0f} msgs/s: half the lower of ours and NATS's measured "
            "maximum, so every broker that can sustain it is compared at the same load."
        )
        lines.append("")
    header, rows = side_by_side(results)
    lines.append(markdown_table(header, rows))
    repeats = {t: results.throughput_runs(t) for t in results.targets}
    if any(len(runs) > 1 for runs in repeats.values()):
        lines.append("")
        spread = [
            f"{target_label(t)} {fmt_count(runs[0]['msgs_per_sec'])} to {fmt_count(runs[-1]['msgs_per_sec'])}"
            for t, runs in repeats.items()
            if runs
        ]
        lines.append(f"Throughput is the median of {max(len(r) for r in repeats.values())} runs; range: " + "; ".join(spread) + ".")

    tls, tls_goals = tls_rows(results)
    if tls:
        lines += ["", "## TLS (wss://) against plain (ws://)", ""]
        lines.append(
            "1 publisher -> 1 consumer, saturated, each broker serving TLS itself (ours: rustls; NATS: Go's "
            "crypto/tls) with the same throwaway ECDSA P-256 certificate; the generator speaks TLS with rustls."
        )
        lines.append("")
        header = ["metric", "mbws ws://", "mbws wss://", "mbws wss/ws", "NATS ws://", "NATS wss://", "NATS wss/ws"]
        lines.append(markdown_table(header, tls))
        lines.append("")
        lines.append(markdown_table(["TLS goal", "measured", "target", "result"], tls_goals, ["---", "--:", "--:", ":-:"]))

    durable_rows, durable_goals = durable_comparison(results)
    if durable_rows:
        lines += ["", "## Durable sends", ""]
        lines.append(
            "1 publisher -> 1 consumer, saturated. mbws: durable SENDs, each RECEIPT after the group commit's "
            "fsync. NATS: JetStream, a file-storage stream on the subject, each publish acknowledged by a PubAck "
            "(nats-server 2.9 writes before it acknowledges but does not fsync each write; the consumer is a core "
            "subscriber)."
        )
        lines.append("")
        lines.append(markdown_table(["broker", "msgs/s", "ack p50 µs", "ack p99 µs", "CPU s per million"], durable_rows))
        if durable_goals:
            lines.append("")
            lines.append(markdown_table(["durable goal", "measured", "target", "result"], durable_goals, ["---", "--:", "--:", ":-:"]))

    lines += ["", "## Latency against load", ""]
    lines.append(
        "1 publisher -> 1 consumer at fixed rates, a percentage of each broker's own maximum "
        "(its throughput result)."
    )
    for target in results.targets:
        table = sweep_table(results, target)
        if table:
            lines += ["", f"### {target_label(target)}", "", table]

    fixed = latency_at_table(results)
    if fixed:
        lines += ["", "## Latency at fixed rates", ""]
        lines.append(
            "1 publisher -> 1 consumer at the same rates for every broker (the median repeat by p99). The raw "
            "relay (length-prefixed bytes, no WebSocket, no routing) is the floor the machine and the generator "
            "allow at each rate: a broker's tail that the relay shares is the machine's, not the broker's. The "
            "generator's send lag is how late it sent against its schedule (coordinated omission is corrected "
            "from the schedule, so a late send still counts as latency)."
        )
        lines += ["", fixed]

    if plots:
        lines += ["", "## Plots", ""]
        for file_name, title in plots:
            lines.append(f"![{title}]({file_name})")
            lines.append("")

    spread = spread_rows(results)
    if spread:
        lines += ["", "## Spread over the repeats", ""]
        lines.append(
            "Each table above shows the median repeat (the latency sweep: the median at each step); "
            "here is the range over all repeats of each run."
        )
        lines.append("")
        lines.append(markdown_table(["run", "metric", "repeats", "low", "high", "high / low"], spread))

    if results.retries:
        lines += ["", "## Runs retried", ""]
        lines.append("These runs gave no result at the first attempt and one at the second (scripts/bench.sh retries once):")
        lines.append("")
        lines.append(markdown_table(["run", "first attempt", "its log"], [[n, w, f"`{l}`"] for n, w, l in results.retries], ["---", "---", "---"]))

    if results.failures:
        lines += ["", "## Runs that failed", ""]
        lines.append(markdown_table(["run", "what happened", "log"], [[n, w, f"`{l}`"] for n, w, l in results.failures], ["---", "---", "---"]))
    lines.append("")
    with open(os.path.join(results.directory, "summary.md"), "w") as file:
        file.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# SVG


def nice_step(span, count):
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 2.5, 5, 10):
        if raw <= multiple * power:
            return multiple * power
    return 10 * power


class Scale:
    """Maps data values to pixels along one axis, linear or logarithmic (base 10)."""

    def __init__(self, low, high, pixel_low, pixel_high, log=False, ticks=6):
        self.log = log
        if log:
            low = max(low, 1e-9)
            high = max(high, low * 10)
            self.low = 10 ** math.floor(math.log10(low))
            self.high = 10 ** math.ceil(math.log10(high))
        else:
            if high <= low:
                high = low + 1
            step = nice_step(high - low, ticks)
            self.low = math.floor(low / step) * step
            self.high = math.ceil(high / step) * step
            self.step = step
        self.pixel_low, self.pixel_high = pixel_low, pixel_high

    def __call__(self, value):
        if self.log:
            value = max(value, self.low)
            fraction = (math.log10(value) - math.log10(self.low)) / (math.log10(self.high) - math.log10(self.low))
        else:
            fraction = (value - self.low) / (self.high - self.low)
        return self.pixel_low + fraction * (self.pixel_high - self.pixel_low)

    def major_ticks(self):
        if self.log:
            first, last = round(math.log10(self.low)), round(math.log10(self.high))
            return [10.0**exponent for exponent in range(first, last + 1)]
        count = round((self.high - self.low) / self.step)
        return [self.low + index * self.step for index in range(count + 1)]

    def minor_ticks(self):
        if not self.log:
            return []
        return [major * factor for major in self.major_ticks()[:-1] for factor in range(2, 10)]


class Svg:
    """A chart canvas: a plot area with margins, drawn into a list of SVG elements."""

    def __init__(self, width=760, height=460, left=86, right=200, top=48, bottom=64):
        self.width, self.height = width, height
        self.left, self.right = left, width - right
        self.top, self.bottom = top, height - bottom
        self.parts = []

    def add(self, element):
        self.parts.append(element)

    def text(self, x, y, content, size=12, anchor="middle", weight="normal", rotate=None, fill="#222"):
        transform = f' transform="rotate({rotate} {x:.1f} {y:.1f})"' if rotate else ""
        self.add(
            f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}" fill="{fill}"{transform}>{escape(str(content))}</text>'
        )

    def line(self, x1, y1, x2, y2, stroke="#222", width=1.0, dash=None):
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
            f'stroke-width="{width}"{dashes}/>'
        )

    def polyline(self, points, stroke, width=2.0, dash=None):
        if len(points) < 2:
            return
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        coordinates = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        self.add(f'<polyline points="{coordinates}" fill="none" stroke="{stroke}" stroke-width="{width}"{dashes}/>')

    def marker(self, x, y, fill, shape="circle", size=3.5, hollow=False):
        paint = f'fill="white" stroke="{fill}" stroke-width="1.5"' if hollow else f'fill="{fill}"'
        if shape == "diamond":
            s = size * 1.4
            self.add(f'<polygon points="{x:.1f},{y - s:.1f} {x + s:.1f},{y:.1f} {x:.1f},{y + s:.1f} {x - s:.1f},{y:.1f}" {paint}/>')
        else:
            self.add(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{size}" {paint}/>')

    def rect(self, x, y, width, height, fill):
        self.add(f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{fill}"/>')

    def title(self, content, subtitle=None):
        self.text(self.width / 2, 22, content, size=15, weight="bold")
        if subtitle:
            self.text(self.width / 2, 38, subtitle, size=11, fill="#555")

    def axes(self, x_scale, y_scale, x_title, y_title, x_labels=None):
        """Grid, ticks and labels. `x_labels` replaces numeric x ticks with (value, label) pairs."""
        for value in y_scale.minor_ticks():
            y = y_scale(value)
            self.line(self.left, y, self.right, y, stroke="#eee", width=0.6)
        for value in y_scale.major_ticks():
            y = y_scale(value)
            self.line(self.left, y, self.right, y, stroke="#ddd", width=0.8)
            self.line(self.left - 5, y, self.left, y)
            self.text(self.left - 8, y + 4, si(value), size=11, anchor="end")
        ticks = x_labels if x_labels is not None else [(value, si(value)) for value in x_scale.major_ticks()]
        for value, label in ticks:
            x = x_scale(value)
            if x_labels is None:
                self.line(x, self.top, x, self.bottom, stroke="#eee", width=0.8)
            self.line(x, self.bottom, x, self.bottom + 5)
            self.text(x, self.bottom + 19, label, size=11)
        self.line(self.left, self.bottom, self.right, self.bottom, width=1.2)
        self.line(self.left, self.top, self.left, self.bottom, width=1.2)
        self.text((self.left + self.right) / 2, self.height - 18, x_title, size=12)
        self.text(20, (self.top + self.bottom) / 2, y_title, size=12, rotate=-90)

    def legend(self, entries):
        """entries: (label, colour, dash, marker shape or None, hollow)."""
        x, y = self.right + 18, self.top + 6
        for label, stroke, dash, shape, hollow in entries:
            if dash is not False:
                self.line(x, y, x + 26, y, stroke=stroke, width=2, dash=dash)
            if shape:
                self.marker(x + 13, y, stroke, shape=shape, hollow=hollow)
            self.text(x + 34, y + 4, label, size=11, anchor="start")
            y += 18

    def write(self, path):
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
            f'viewBox="0 0 {self.width} {self.height}" font-family="Helvetica, Arial, sans-serif">'
        )
        background = f'<rect width="{self.width}" height="{self.height}" fill="white"/>'
        with open(path, "w") as file:
            file.write("\n".join([head, background] + self.parts + ["</svg>", ""]))


def bar_chart(path, title, subtitle, y_title, values, targets, errors=None, value_format=short):
    """Vertical bars, one per target with a value; `errors` maps target -> (low, high)."""
    present = [t for t in targets if number(values.get(t)) is not None]
    if not present:
        return False
    svg = Svg(right=40)
    highest = max(max(values[t], (errors or {}).get(t, (0, 0))[1]) for t in present)
    y_scale = Scale(0, highest * 1.12, svg.bottom, svg.top)
    slot = (svg.right - svg.left) / len(present)
    x_labels = [(index, target_label(t)) for index, t in enumerate(present)]

    class SlotScale:
        def __call__(self, index):
            return svg.left + slot * (index + 0.5)

    svg.title(title, subtitle)
    svg.axes(SlotScale(), y_scale, "", y_title, x_labels=x_labels)
    bar_width = min(90, slot * 0.6)
    for index, target in enumerate(present):
        centre = svg.left + slot * (index + 0.5)
        top = y_scale(values[target])
        svg.rect(centre - bar_width / 2, top, bar_width, svg.bottom - top, colour(target, targets))
        if errors and target in errors:
            low, high = (y_scale(v) for v in errors[target])
            svg.line(centre, low, centre, high, width=1.4)
            svg.line(centre - 8, low, centre + 8, low, width=1.4)
            svg.line(centre - 8, high, centre + 8, high, width=1.4)
            top = min(top, high)
        svg.text(centre, top - 6, value_format(values[target]), size=12, weight="bold")
    svg.write(path)
    return True


def latency_chart(path, results):
    percentiles = [("p50_us", "p50", None), ("p99_us", "p99", "7,4"), ("p999_us", "p99.9", "2,3")]
    series = {t: results.latency_sweep(t) for t in results.targets}
    series = {t: steps for t, steps in series.items() if steps}
    if not series:
        return False
    commons = {t: results.latency_common(t) for t in results.targets}
    points = []
    for steps in list(series.values()) + [[c] for c in commons.values() if c]:
        for step in steps:
            rate = number(step.get("achieved_rate")) or number(step.get("target_rate"))
            for key, _, _ in percentiles:
                value = number(step.get(key))
                if rate is not None and value is not None and value > 0:
                    points.append((rate, value))
    if not points:
        return False
    svg = Svg()
    # Both axes logarithmic: the brokers' rates span orders of magnitude (the relay's most).
    x_scale = Scale(min(p[0] for p in points), max(p[0] for p in points), svg.left, svg.right, log=True)
    y_scale = Scale(min(p[1] for p in points), max(p[1] for p in points), svg.bottom, svg.top, log=True)
    svg.title("Latency against load", "1 publisher -> 1 consumer, coordinated-omission corrected")
    svg.axes(x_scale, y_scale, "achieved rate (messages/s, log scale)", "latency (µs, log scale)")
    legend = []
    for target, steps in series.items():
        stroke = colour(target, results.targets)
        for key, label, dash in percentiles:
            line = []
            for step in steps:
                rate = number(step.get("achieved_rate")) or number(step.get("target_rate"))
                value = number(step.get(key))
                if rate is not None and value is not None and value > 0:
                    line.append((x_scale(rate), y_scale(value)))
            svg.polyline(line, stroke, dash=dash)
            for x, y in line:
                svg.marker(x, y, stroke, size=2.6)
        legend.append((target_label(target), stroke, None, "circle", False))
    for target, step in commons.items():
        if not step:
            continue
        if target not in series:
            legend.append((target_label(target), colour(target, results.targets), False, "diamond", True))
        rate = number(step.get("achieved_rate")) or number(step.get("target_rate"))
        for key in ("p50_us", "p99_us"):
            value = number(step.get(key))
            if rate is not None and value is not None and value > 0:
                svg.marker(x_scale(rate), y_scale(value), colour(target, results.targets), shape="diamond", hollow=True)
    legend += [("p50", "#444", None, None, False), ("p99", "#444", "7,4", None, False), ("p99.9", "#444", "2,3", None, False)]
    if any(commons.values()):
        legend.append(("common rate (p50, p99)", "#444", False, "diamond", True))
    svg.legend(legend)
    svg.write(path)
    return True


def fanout_chart(path, results):
    series = {t: results.fanout(t) for t in results.targets}
    series = {
        t: [(m, number(r.get("deliveries_per_sec"))) for m, r in runs.items() if number(r.get("deliveries_per_sec"))]
        for t, runs in series.items()
    }
    series = {t: points for t, points in series.items() if points}
    if not series:
        return False
    sizes = sorted({m for points in series.values() for m, _ in points})
    svg = Svg()
    x_scale = Scale(min(sizes), max(sizes), svg.left + 30, svg.right - 30, log=True)
    highest = max(value for points in series.values() for _, value in points)
    y_scale = Scale(0, highest * 1.1, svg.bottom, svg.top)
    svg.title("Fan-out", "1 publisher -> M multicast subscribers; deliveries per second at the subscribers")
    svg.axes(x_scale, y_scale, "subscribers M (log scale)", "deliveries/s", x_labels=[(m, f"{m:,}") for m in sizes])
    legend = []
    for target, points in series.items():
        stroke = colour(target, results.targets)
        line = [(x_scale(m), y_scale(v)) for m, v in points]
        svg.polyline(line, stroke)
        for x, y in line:
            svg.marker(x, y, stroke)
        legend.append((target_label(target), stroke, None, "circle", False))
    svg.legend(legend)
    svg.write(path)
    return True


def write_plots(results):
    """Writes every plot there is data for; returns [(file name, title)]."""
    directory, targets = results.directory, results.targets
    written = []
    throughput = {t: get(results.throughput(t), "msgs_per_sec") for t in targets}
    spread = {}
    for target in targets:
        runs = results.throughput_runs(target)
        if len(runs) > 1:
            spread[target] = (runs[0]["msgs_per_sec"], runs[-1]["msgs_per_sec"])
    size = results.run.get("params", {}).get("size_bytes", 64)
    if bar_chart(
        os.path.join(directory, "throughput.svg"),
        "Throughput",
        f"1 publisher -> 1 consumer, {size}-byte bodies, broker on one core" + ("; bars: median, whiskers: range" if spread else ""),
        "messages/s",
        throughput,
        targets,
        errors=spread,
    ):
        written.append(("throughput.svg", "Throughput, 1 -> 1"))
    cpu = {t: get(results.throughput(t), "cpu_s_per_million") for t in targets}
    if bar_chart(
        os.path.join(directory, "cpu.svg"),
        "Broker CPU per message",
        "CPU seconds per million messages (1 -> 1 saturated run); lower is better",
        "CPU s per million messages",
        cpu,
        targets,
        value_format=lambda v: f"{v:.2f}",
    ):
        written.append(("cpu.svg", "Broker CPU per million messages"))
    if latency_chart(os.path.join(directory, "latency.svg"), results):
        written.append(("latency.svg", "Latency percentiles against rate"))
    if fanout_chart(os.path.join(directory, "fanout.svg"), results):
        written.append(("fanout.svg", "Fan-out deliveries per second"))
    return written


def main(argv):
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if len(argv) == 2 else 2
    directory = argv[1]
    if not os.path.isdir(directory):
        print(f"plot.py: {directory} is not a directory (expected a bench-results/<timestamp>/ directory)", file=sys.stderr)
        return 2
    results = Results(directory)
    if not results.by_name:
        print(f"plot.py: no result files (*.json with a \"results\" object) in {directory}", file=sys.stderr)
    plots = write_plots(results)
    write_summary(results, plots)
    print(f"plot.py: wrote summary.md and {len(plots)} plots in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
