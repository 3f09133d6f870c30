//! The five scenarios, each a sequence of engine phases turned into a [`Report`].
//!
//! - throughput: P unpaced publishers, C consumers, A addresses; rate at the consumers.
//! - latency: 1 -> 1 at fixed rates (percent of a given or measured maximum); percentiles of
//!   intended-send-to-delivery time per step.
//! - fanout: 1 publisher -> M multicast subscribers; deliveries per second.
//! - connections: K idle sessions; time to open, broker memory per session.
//! - durable: throughput 1 -> 1 with durable SENDs; receipt latency (MBWS; NATS through
//!   JetStream, whose PubAck is the receipt).
//!
//! Measured phases follow a warm-up; counters and the broker's CPU time are read at the start
//! and end of the measured phase only, and publishing stops and drains before connections close.

use std::time::Duration;

use hdrhistogram::Histogram;

use super::cli::{Plan, Scenario, TargetKind, MAX_RATE_PROBE};
use super::clock::now_ns;
use super::engine::{close_idle_sessions, closed_idle_sessions, open_idle_sessions, Bench, Mode, Shape, Snapshot};
use super::flow::Semantics;
use super::net::raise_open_files_limit;
use super::procfs;
use super::report::{maybe, table, thousands, Json, Progress};
use super::targets::TargetConfig;
use super::BenchError;

/// Set-ups in flight at once in the connections scenario.
const CONNECT_CONCURRENCY: usize = 256;
/// File descriptors the generator needs besides the idle sessions.
const SPARE_FILES: u64 = 256;
/// How often the connections scenario checks that the target still holds its sessions.
const HELD_SESSIONS_CHECK_INTERVAL: Duration = Duration::from_millis(200);
/// Above this share of one core the generator may be what limits a result.
const GENERATOR_BUSY_WARNING: f64 = 0.95;
/// A paced step that has not sent everything after this multiple of its length has failed.
const PACED_STEP_LIMIT_FACTOR: u32 = 20;

/// A finished run.
pub struct Report {
    pub scenario: &'static str,
    pub target: &'static str,
    pub params: Json,
    pub results: Json,
    /// Human-readable result for stdout.
    pub text: String,
}

impl Report {
    pub fn json(&self) -> Json {
        Json::object([
            ("scenario", Json::str(self.scenario)),
            ("target", Json::str(self.target)),
            ("params", self.params.clone()),
            ("results", self.results.clone()),
        ])
    }
}

/// Runs `plan` on a single-threaded io_uring runtime.
pub fn run(plan: &Plan) -> Result<Report, BenchError> {
    if !monoio::utils::detect_uring() {
        return Err(BenchError::Failed(
            "io_uring is not available (kernel older than 5.6, or disabled by \
             /proc/sys/kernel/io_uring_disabled or a seccomp policy); mbws-bench needs io_uring"
                .to_string(),
        ));
    }
    let mut runtime = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(4096)
        .enable_timer()
        .build()
        .map_err(|error| BenchError::Failed(format!("cannot start an io_uring event loop: {error}")))?;
    runtime.block_on(run_scenario(plan))
}

async fn run_scenario(plan: &Plan) -> Result<Report, BenchError> {
    for &pid in &plan.broker_pids {
        procfs::cpu_seconds(pid)?;
    }
    let run_id = match &plan.common.run_id {
        Some(id) => id.clone(),
        None => format!("{}-{}", std::process::id(), now_ns() / 1_000_000 % 1_000_000),
    };
    let config = TargetConfig::new(plan, run_id);
    let (results, rows) = match &plan.scenario {
        Scenario::Throughput { publishers, consumers, addresses } => {
            throughput(plan, &config, *publishers, *consumers, *addresses).await?
        }
        Scenario::Latency { rates_percent, max_rate, step } => {
            latency(plan, &config, rates_percent, *max_rate, *step).await?
        }
        Scenario::Fanout { subscribers } => fanout(plan, &config, *subscribers).await?,
        Scenario::Connections { connections, source_ips } => {
            connections_scenario(plan, &config, *connections, *source_ips).await?
        }
        Scenario::Durable => durable(plan, &config).await?,
    };
    let mut all_rows = vec![
        ("scenario".to_string(), plan.scenario.name().to_string()),
        ("target".to_string(), format!("{} ({})", plan.target.name(), plan.url)),
    ];
    all_rows.extend(rows);
    Ok(Report {
        scenario: plan.scenario.name(),
        target: plan.target.name(),
        params: params(plan),
        results,
        text: table(&all_rows),
    })
}

type Outcome = (Json, Vec<(String, String)>);

fn label(plan: &Plan) -> String {
    format!("{} {}", plan.scenario.name(), plan.target.name())
}

fn row(label: &str, value: String) -> (String, String) {
    (label.to_string(), value)
}

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Percentiles {
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    p999: Option<f64>,
    max: Option<f64>,
}

impl Percentiles {
    fn of(histogram: &Histogram<u64>) -> Percentiles {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| Some(ns as f64 / 1000.0);
        Percentiles {
            p50: us(histogram.value_at_quantile(0.50)),
            p90: us(histogram.value_at_quantile(0.90)),
            p99: us(histogram.value_at_quantile(0.99)),
            p999: us(histogram.value_at_quantile(0.999)),
            max: us(histogram.max()),
        }
    }

    fn describe(&self) -> String {
        format!(
            "p50 {} us  p90 {} us  p99 {} us  p99.9 {} us  max {} us",
            maybe(self.p50, 1),
            maybe(self.p90, 1),
            maybe(self.p99, 1),
            maybe(self.p999, 1),
            maybe(self.max, 1)
        )
    }
}

/// Counters of one measured unpaced phase.
struct Measured {
    start: Snapshot,
    end: Snapshot,
    latency: Percentiles,
    receipt_latency: Percentiles,
    drained: bool,
}

impl Measured {
    fn seconds(&self) -> f64 {
        (self.end.at_ns - self.start.at_ns) as f64 / 1e9
    }

    fn delivered(&self) -> u64 {
        self.end.delivered - self.start.delivered
    }

    fn published(&self) -> u64 {
        self.end.published - self.start.published
    }

    fn acknowledged(&self) -> u64 {
        self.end.acknowledged - self.start.acknowledged
    }

    fn broker_cpu(&self) -> Option<f64> {
        cpu_between(&self.start, &self.end)
    }

    fn generator_cpu(&self) -> f64 {
        self.end.own_cpu_seconds - self.start.own_cpu_seconds
    }

    /// Warns when the generator was (nearly) saturated: the result may be its limit.
    fn warn_if_generator_bound(&self) {
        let busy = self.generator_cpu() / self.seconds();
        if busy >= GENERATOR_BUSY_WARNING {
            eprintln!(
                "mbws-bench: warning: the load generator used {:.0}% of a core during the measurement; \
                 the result may be limited by the generator rather than the target",
                busy * 100.0
            );
        }
        if !self.drained {
            eprintln!(
                "mbws-bench: warning: not every published message was delivered within {} s after publishing stopped",
                super::engine::DRAIN_TIMEOUT.as_secs()
            );
        }
    }
}

fn cpu_between(start: &Snapshot, end: &Snapshot) -> Option<f64> {
    Some(end.broker_cpu_seconds? - start.broker_cpu_seconds?)
}

fn per_million(cpu_seconds: Option<f64>, count: u64) -> Option<f64> {
    cpu_seconds.filter(|_| count > 0).map(|cpu| cpu / (count as f64 / 1e6))
}

/// Warm-up, then a measured phase of `--duration-s`, both unpaced; then drain.
/// Sets up `shape`, measures it unpaced, and closes it (also when the measurement failed).
async fn run_unpaced(plan: &Plan, config: &TargetConfig, shape: &Shape) -> Result<Measured, BenchError> {
    let bench = Bench::setup(plan, config, shape).await?;
    let measured = measure_unpaced(&bench, plan).await;
    bench.finish().await;
    measured
}

async fn measure_unpaced(bench: &Bench, plan: &Plan) -> Result<Measured, BenchError> {
    let mut progress = Progress::rate(label(plan), "msg/s", now_ns(), bench.run.delivered.get());
    bench.set_mode(Mode::Unpaced);
    if !plan.warmup.is_zero() {
        progress.restart(format!("{} warm-up", label(plan)), now_ns(), bench.run.delivered.get());
        bench.watch(plan.warmup, &mut progress, |_| false).await?;
    }
    let start = bench.snapshot()?;
    bench.start_recording();
    progress.restart(label(plan), now_ns(), bench.run.delivered.get());
    bench.watch(plan.duration, &mut progress, |_| false).await?;
    let end = bench.snapshot()?;
    bench.stop_recording();
    bench.set_mode(Mode::Idle);
    let drained = bench.drain(&mut progress).await?;
    progress.finish();
    let measured = Measured {
        start,
        end,
        latency: Percentiles::of(&bench.run.latency.borrow()),
        receipt_latency: Percentiles::of(&bench.run.receipt_latency.borrow()),
        drained,
    };
    measured.warn_if_generator_bound();
    Ok(measured)
}

fn cpu_rows(rows: &mut Vec<(String, String)>, cpu: Option<f64>, count: u64, what: &str, generator_cpu: f64) {
    rows.push(row(
        "broker CPU",
        match cpu {
            Some(cpu) => format!("{cpu:.2} s ({} s per million {what})", maybe(per_million(Some(cpu), count), 3)),
            None => "- (give --broker-pid)".to_string(),
        },
    ));
    rows.push(row("generator CPU", format!("{generator_cpu:.2} s")));
}

async fn throughput(
    plan: &Plan,
    config: &TargetConfig,
    publishers: usize,
    consumers: usize,
    addresses: usize,
) -> Result<Outcome, BenchError> {
    let addresses = if plan.target == TargetKind::Relay && addresses > 1 {
        eprintln!("mbws-bench: note: the relay has no addresses; --addresses {addresses} is treated as 1");
        1
    } else {
        addresses
    };
    let semantics = if plan.target == TargetKind::Mqtt { Semantics::EveryConsumer } else { Semantics::Competing };
    let shape = Shape { publishers, consumers, addresses, semantics, multicast: false, durable: false };
    let measured = run_unpaced(plan, config, &shape).await?;
    let seconds = measured.seconds();
    let messages = measured.delivered();
    let rate = messages as f64 / seconds;
    let megabytes = rate * plan.size as f64 / 1e6;
    let cpu = measured.broker_cpu();
    let results = Json::object([
        ("messages", Json::Int(messages)),
        ("seconds", Json::num(Some(seconds))),
        ("msgs_per_sec", Json::num(Some(rate))),
        ("mb_per_sec", Json::num(Some(megabytes))),
        ("broker_cpu_seconds", Json::num(cpu)),
        ("cpu_s_per_million", Json::num(per_million(cpu, messages))),
        ("p50_us", Json::num(measured.latency.p50)),
        ("p99_us", Json::num(measured.latency.p99)),
        ("published", Json::Int(measured.published())),
        ("refused", Json::Int(measured.end.refused - measured.start.refused)),
        ("generator_cpu_seconds", Json::num(Some(measured.generator_cpu()))),
        ("window", Json::Int(plan.window)),
    ]);
    let mut rows = vec![
        row(
            "shape",
            format!("{publishers} publishers -> {consumers} consumers, {addresses} addresses, {} B", plan.size),
        ),
        row(
            "messages",
            format!("{} delivered ({} published)", thousands(messages as f64), thousands(measured.published() as f64)),
        ),
        row("seconds", format!("{seconds:.3}")),
        row("msgs/s", thousands(rate)),
        row("MB/s", format!("{megabytes:.1}")),
    ];
    cpu_rows(&mut rows, cpu, messages, "messages", measured.generator_cpu());
    rows.push(row("latency (saturated)", measured.latency.describe()));
    Ok((results, rows))
}

async fn fanout(plan: &Plan, config: &TargetConfig, subscribers: usize) -> Result<Outcome, BenchError> {
    let shape = Shape {
        publishers: 1,
        consumers: subscribers,
        addresses: 1,
        semantics: Semantics::EveryConsumer,
        multicast: true,
        durable: false,
    };
    let measured = run_unpaced(plan, config, &shape).await?;
    let seconds = measured.seconds();
    let deliveries = measured.delivered();
    let rate = deliveries as f64 / seconds;
    let cpu = measured.broker_cpu();
    let results = Json::object([
        ("subscribers", Json::Int(subscribers as u64)),
        ("published", Json::Int(measured.published())),
        ("deliveries", Json::Int(deliveries)),
        ("seconds", Json::num(Some(seconds))),
        ("deliveries_per_sec", Json::num(Some(rate))),
        ("broker_cpu_seconds", Json::num(cpu)),
        ("cpu_s_per_million", Json::num(per_million(cpu, deliveries))),
        ("p50_us", Json::num(measured.latency.p50)),
        ("p99_us", Json::num(measured.latency.p99)),
        ("generator_cpu_seconds", Json::num(Some(measured.generator_cpu()))),
        ("window", Json::Int(plan.window)),
    ]);
    let mut rows = vec![
        row("shape", format!("1 publisher -> {subscribers} subscribers, {} B", plan.size)),
        row("published", thousands(measured.published() as f64)),
        row("deliveries", thousands(deliveries as f64)),
        row("seconds", format!("{seconds:.3}")),
        row("deliveries/s", thousands(rate)),
    ];
    cpu_rows(&mut rows, cpu, deliveries, "deliveries", measured.generator_cpu());
    rows.push(row("latency (saturated)", measured.latency.describe()));
    Ok((results, rows))
}

async fn durable(plan: &Plan, config: &TargetConfig) -> Result<Outcome, BenchError> {
    if !matches!(plan.target, TargetKind::Mbws | TargetKind::Nats) {
        let results = Json::object([
            ("messages", Json::Null),
            ("seconds", Json::Null),
            ("msgs_per_sec", Json::Null),
            ("receipt_p50_us", Json::Null),
            ("receipt_p99_us", Json::Null),
            ("unsupported", Json::Bool(true)),
        ]);
        let rows =
            vec![row("result", format!("not supported: {} has no durable publish with receipts", plan.target.name()))];
        return Ok((results, rows));
    }
    let shape = Shape {
        publishers: 1,
        consumers: 1,
        addresses: 1,
        semantics: Semantics::Competing,
        multicast: false,
        durable: true,
    };
    let measured = run_unpaced(plan, config, &shape).await?;
    let seconds = measured.seconds();
    let messages = measured.acknowledged();
    let rate = messages as f64 / seconds;
    let cpu = measured.broker_cpu();
    let results = Json::object([
        ("messages", Json::Int(messages)),
        ("seconds", Json::num(Some(seconds))),
        ("msgs_per_sec", Json::num(Some(rate))),
        ("receipt_p50_us", Json::num(measured.receipt_latency.p50)),
        ("receipt_p99_us", Json::num(measured.receipt_latency.p99)),
        ("unsupported", Json::Bool(false)),
        ("delivered", Json::Int(measured.delivered())),
        ("broker_cpu_seconds", Json::num(cpu)),
        ("cpu_s_per_million", Json::num(per_million(cpu, messages))),
        ("generator_cpu_seconds", Json::num(Some(measured.generator_cpu()))),
    ]);
    let mut rows = vec![
        row("shape", format!("1 publisher -> 1 consumer, durable SENDs, {} B", plan.size)),
        row("receipted", thousands(messages as f64)),
        row("seconds", format!("{seconds:.3}")),
        row("msgs/s", thousands(rate)),
        row("receipt latency", measured.receipt_latency.describe()),
    ];
    cpu_rows(&mut rows, cpu, messages, "messages", measured.generator_cpu());
    Ok((results, rows))
}

async fn latency(
    plan: &Plan,
    config: &TargetConfig,
    rates_percent: &[f64],
    max_rate: Option<f64>,
    step: Duration,
) -> Result<Outcome, BenchError> {
    let shape = Shape {
        publishers: 1,
        consumers: 1,
        addresses: 1,
        semantics: Semantics::Competing,
        multicast: false,
        durable: false,
    };
    let bench = Bench::setup(plan, config, &shape).await?;
    let outcome = latency_steps(plan, &bench, rates_percent, max_rate, step).await;
    bench.finish().await;
    outcome
}

async fn latency_steps(
    plan: &Plan,
    bench: &Bench,
    rates_percent: &[f64],
    max_rate: Option<f64>,
    step: Duration,
) -> Result<Outcome, BenchError> {
    let mut progress = Progress::rate(label(plan), "msg/s", now_ns(), bench.run.delivered.get());
    let (max_rate, max_rate_measured) = match max_rate {
        Some(rate) => (rate, false),
        None => (probe_max_rate(plan, bench, &mut progress).await?, true),
    };
    let mut steps = Vec::new();
    let mut rows = vec![
        row("shape", format!("1 publisher -> 1 consumer, {} B", plan.size)),
        row("max rate", format!("{} msg/s{}", thousands(max_rate), if max_rate_measured { " (measured)" } else { "" })),
    ];
    let mut cpu_total: Option<f64> = Some(0.0);
    for (index, &percent) in rates_percent.iter().enumerate() {
        let rate = max_rate * percent / 100.0;
        if index == 0 && !plan.warmup.is_zero() {
            progress.restart(format!("{} warm-up", label(plan)), now_ns(), bench.run.delivered.get());
            paced_step(bench, rate, plan.warmup, &mut progress).await?;
        }
        progress.restart(format!("{} {percent}%", label(plan)), now_ns(), bench.run.delivered.get());
        bench.start_recording();
        let start = bench.snapshot()?;
        let first_intended_ns = paced_step(bench, rate, step, &mut progress).await?;
        let end = bench.snapshot()?;
        bench.stop_recording();
        let messages = end.delivered - start.delivered;
        let active_seconds = (bench.run.last_delivery_ns.get().saturating_sub(first_intended_ns)) as f64 / 1e9;
        let achieved = if active_seconds > 0.0 { messages as f64 / active_seconds } else { 0.0 };
        let percentiles = Percentiles::of(&bench.run.latency.borrow());
        let send_lag = Percentiles::of(&bench.run.send_lag.borrow());
        cpu_total = cpu_total.and_then(|total| Some(total + cpu_between(&start, &end)?));
        steps.push(Json::object([
            ("target_rate", Json::num(Some(rate))),
            ("achieved_rate", Json::num(Some(achieved))),
            ("messages", Json::Int(messages)),
            ("p50_us", Json::num(percentiles.p50)),
            ("p90_us", Json::num(percentiles.p90)),
            ("p99_us", Json::num(percentiles.p99)),
            ("p999_us", Json::num(percentiles.p999)),
            ("max_us", Json::num(percentiles.max)),
            ("percent", Json::num(Some(percent))),
            ("send_lag_p50_us", Json::num(send_lag.p50)),
            ("send_lag_p99_us", Json::num(send_lag.p99)),
            ("generator_cpu_seconds", Json::num(Some(end.own_cpu_seconds - start.own_cpu_seconds))),
        ]));
        rows.push(row(
            &format!("{percent}% = {} msg/s", thousands(rate)),
            format!(
                "achieved {} msg/s  {}  (generator send lag p50 {} us, p99 {} us)",
                thousands(achieved),
                percentiles.describe(),
                maybe(send_lag.p50, 1),
                maybe(send_lag.p99, 1)
            ),
        ));
    }
    progress.finish();
    let cpu_total = cpu_total.filter(|_| plan.broker_pid.is_some());
    rows.push(row("broker CPU", maybe(cpu_total, 2) + " s"));
    let results = Json::object([
        ("steps", Json::Arr(steps)),
        ("max_rate", Json::num(Some(max_rate))),
        ("broker_cpu_seconds", Json::num(cpu_total)),
        ("max_rate_measured", Json::Bool(max_rate_measured)),
    ]);
    Ok((results, rows))
}

/// A short unpaced run (after the warm-up) whose delivery rate is the latency scenario's 100%.
async fn probe_max_rate(plan: &Plan, bench: &Bench, progress: &mut Progress) -> Result<f64, BenchError> {
    progress.restart(format!("{} max-rate probe", label(plan)), now_ns(), bench.run.delivered.get());
    bench.set_mode(Mode::Unpaced);
    bench.watch(plan.warmup, progress, |_| false).await?;
    let start = bench.snapshot()?;
    bench.watch(MAX_RATE_PROBE, progress, |_| false).await?;
    let end = bench.snapshot()?;
    bench.set_mode(Mode::Idle);
    bench.drain(progress).await?;
    let rate = (end.delivered - start.delivered) as f64 / ((end.at_ns - start.at_ns) as f64 / 1e9);
    if rate < 1.0 {
        return Err(BenchError::Failed(format!("the max-rate probe delivered only {rate:.1} msg/s")));
    }
    Ok(rate)
}

/// Sends `rate * length` messages at their intended times and waits until all are delivered.
/// Returns the intended time of the first message.
async fn paced_step(bench: &Bench, rate: f64, length: Duration, progress: &mut Progress) -> Result<u64, BenchError> {
    let count = (rate * length.as_secs_f64()).round().max(1.0) as u64;
    // Start a little ahead so the first message is not already late when the producer wakes.
    let start_ns = now_ns() + 1_000_000;
    bench.set_mode(Mode::Paced { start_ns, interval_ns: 1e9 / rate, count });
    let limit = length * PACED_STEP_LIMIT_FACTOR + Duration::from_secs(10);
    if !bench.watch(limit, progress, Bench::all_idle).await? {
        return Err(BenchError::Failed(format!(
            "the publisher could not send {count} messages within {} s",
            limit.as_secs()
        )));
    }
    bench.drain(progress).await?;
    Ok(start_ns)
}

async fn connections_scenario(
    plan: &Plan,
    config: &TargetConfig,
    connections: usize,
    source_ips: u8,
) -> Result<Outcome, BenchError> {
    check_port_range(connections, source_ips)?;
    let open_files = raise_open_files_limit()
        .map_err(|error| BenchError::Failed(format!("cannot read the open-files limit: {error}")))?;
    if open_files < connections as u64 + SPARE_FILES {
        return Err(BenchError::Failed(format!(
            "the open-files limit is {open_files}, below --connections {connections} plus {SPARE_FILES}; \
             raise it (ulimit -n) or open fewer connections"
        )));
    }
    let rss_before = plan.broker_pid.map(procfs::rss_kib).transpose()?;
    let mut progress = Progress::count(label(plan), "open", now_ns(), 0);
    let started = now_ns();
    let sessions = open_idle_sessions(config, connections, source_ips, CONNECT_CONCURRENCY, &mut progress).await?;
    let seconds_to_open = (now_ns() - started) as f64 / 1e9;
    progress.restart(format!("{} holding", label(plan)), now_ns(), sessions.len() as u64);
    let hold_until = now_ns() + plan.duration.as_nanos() as u64;
    let mut next_check = now_ns();
    while now_ns() < hold_until {
        progress.tick(now_ns(), sessions.len() as u64);
        if now_ns() >= next_check {
            next_check = now_ns() + HELD_SESSIONS_CHECK_INTERVAL.as_nanos() as u64;
            let closed = closed_idle_sessions(&sessions)
                .map_err(|error| BenchError::Failed(format!("cannot poll the held sessions: {error}")))?;
            if closed > 0 {
                progress.finish();
                let held = sessions.len();
                close_idle_sessions(sessions, CONNECT_CONCURRENCY).await;
                return Err(BenchError::Failed(format!(
                    "the target closed {closed} of the {held} idle sessions held (has it stopped or crashed?); \
                     no memory figure is reported"
                )));
            }
        }
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    progress.finish();
    let rss_after = plan.broker_pid.map(procfs::rss_kib);
    close_idle_sessions(sessions, CONNECT_CONCURRENCY).await;
    let rss_after = rss_after.transpose()?;
    let per_connection = match (rss_before, rss_after) {
        (Some(before), Some(after)) => Some((after as f64 - before as f64) * 1024.0 / connections as f64),
        _ => None,
    };
    let results = Json::object([
        ("connections", Json::Int(connections as u64)),
        ("seconds_to_open", Json::num(Some(seconds_to_open))),
        ("rss_before_kib", rss_before.map_or(Json::Null, Json::Int)),
        ("rss_after_kib", rss_after.map_or(Json::Null, Json::Int)),
        ("rss_per_connection_bytes", Json::num(per_connection)),
        ("source_ips", Json::Int(u64::from(source_ips))),
    ]);
    let kib = |value: Option<u64>| value.map_or("-".to_string(), |kib| format!("{} KiB", thousands(kib as f64)));
    let rows = vec![
        row(
            "connections",
            format!("{} idle sessions from {source_ips} source address(es)", thousands(connections as f64)),
        ),
        row(
            "time to open",
            format!("{seconds_to_open:.3} s ({} per second)", thousands(connections as f64 / seconds_to_open)),
        ),
        row("broker RSS", format!("{} before, {} after", kib(rss_before), kib(rss_after))),
        row("RSS per session", maybe(per_connection, 0) + " bytes"),
    ];
    Ok((results, rows))
}

/// Fails early (usage) when the connections cannot fit the ephemeral port range.
fn check_port_range(connections: usize, source_ips: u8) -> Result<(), BenchError> {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else { return Ok(()) };
    let bounds: Vec<usize> = range.split_whitespace().filter_map(|part| part.parse().ok()).collect();
    let [low, high] = bounds[..] else { return Ok(()) };
    let ports = high.saturating_sub(low) + 1;
    let per_source = connections.div_ceil(usize::from(source_ips));
    if per_source > ports {
        return Err(BenchError::Usage(format!(
            "--connections {connections} over {source_ips} source address(es) needs {per_source} ports per \
             address, but the ephemeral port range has {ports}; give --source-ips {}",
            connections.div_ceil(ports).min(254)
        )));
    }
    Ok(())
}

fn params(plan: &Plan) -> Json {
    let common = &plan.common;
    let mut fields = vec![
        ("target", Json::str(plan.target.name())),
        ("url", Json::str(plan.url.clone())),
        ("size", Json::Int(plan.size as u64)),
        ("duration_s", Json::num(Some(common.duration_s))),
        ("warmup_s", Json::num(Some(common.warmup_s))),
        ("broker_pid", plan.broker_pid.map_or(Json::Null, |pid| Json::Int(u64::from(pid)))),
        ("broker_pids", Json::str(plan.broker_pids.iter().map(u32::to_string).collect::<Vec<_>>().join(","))),
        (
            "consumer_url",
            match plan.common.consumer_url.as_slice() {
                [] => Json::Null,
                urls => Json::str(urls.join(",")),
            },
        ),
        ("light", Json::Bool(plan.light)),
        ("qos", Json::Int(u64::from(plan.qos))),
        ("window", Json::Int(plan.window)),
        ("credit", Json::Int(u64::from(plan.credit))),
        ("ack", Json::str(if plan.auto_ack { "auto" } else { "client" })),
    ];
    match &plan.scenario {
        Scenario::Throughput { publishers, consumers, addresses } => {
            fields.push(("publishers", Json::Int(*publishers as u64)));
            fields.push(("consumers", Json::Int(*consumers as u64)));
            fields.push(("addresses", Json::Int(*addresses as u64)));
        }
        Scenario::Latency { rates_percent, max_rate, step } => {
            fields.push(("rates", Json::Arr(rates_percent.iter().map(|rate| Json::num(Some(*rate))).collect())));
            fields.push(("max_rate", Json::num(*max_rate)));
            fields.push(("step_s", Json::num(Some(step.as_secs_f64()))));
        }
        Scenario::Fanout { subscribers } => fields.push(("subscribers", Json::Int(*subscribers as u64))),
        Scenario::Connections { connections, source_ips } => {
            fields.push(("connections", Json::Int(*connections as u64)));
            fields.push(("source_ips", Json::Int(u64::from(*source_ips))));
        }
        Scenario::Durable => {}
    }
    Json::object(fields)
}
