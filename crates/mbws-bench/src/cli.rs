//! Flags of `mbws-bench` and their validation into a [`Plan`].
//!
//! The command line is a contract with `scripts/bench.sh`: a scenario subcommand followed by
//! common and scenario flags. Everything the run needs is checked here, before any connection
//! is made, so a bad combination exits 2 with a sentence saying what to change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use super::wire::STAMP_BYTES;
use super::BenchError;

/// Largest message body the generator sends (each publisher keeps one template per address).
pub const MAX_SIZE_BYTES: usize = 16 * 1024 * 1024;
/// mosquitto stops answering WebSocket deliveries above about 4 KB (see the target notes).
pub const MQTT_MAX_SIZE_BYTES: usize = 4000;
/// Bounds on the shape of a run; far above what one generator core can drive.
pub const MAX_PUBLISHERS: usize = 1024;
pub const MAX_CONSUMERS: usize = 1024;
pub const MAX_ADDRESSES: usize = 1024;
pub const MAX_SUBSCRIBERS: usize = 10_000;
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// Default end-to-end window in messages (at most `WINDOW_BYTES` of bodies in flight).
pub const DEFAULT_WINDOW_MESSAGES: u64 = 10_000;
/// mosquitto queues at most 1000 QoS 1 messages per client (`max_queued_messages`) and drops
/// the rest, so MQTT QoS 1 runs keep far fewer in flight by default.
pub const DEFAULT_MQTT_QOS1_WINDOW_MESSAGES: u64 = 500;
/// Most bytes of bodies in flight through the target, over all deliveries: in a fan-out every
/// subscriber's copy counts, so the window shrinks as subscribers are added (with the message
/// window per subscriber, 1,000 subscribers had 10 million deliveries, 640 MB of 64-byte
/// bodies, in flight after the warm-up's first burst: a broker spent the measured window
/// queueing them and delivered nothing in it).
pub const WINDOW_BYTES: u64 = 32 * 1024 * 1024;
/// Shortest measurement (or hold) a run may ask for: rates over a few milliseconds are noise.
pub const MIN_DURATION: Duration = Duration::from_millis(100);
/// How long the latency scenario measures the maximum rate when `--max-rate` is absent.
pub const MAX_RATE_PROBE: Duration = Duration::from_secs(3);

/// The exit codes, shown at the end of every `--help`.
const EXIT_CODES: &str = "Exit codes: 0 success (also `durable` on a target without durable sends); 1 connection, \
                          protocol or target error (also the target closing held connections, or the JSON \
                          result not written); 2 bad usage (flags, URL, a --json path that cannot be written).";

#[derive(Parser, Debug)]
#[command(
    name = "mbws-bench",
    version,
    about = "Load generator for MBWS brokers and the NATS, MQTT and relay baselines",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: ScenarioArgs,
}

#[derive(Subcommand, Debug)]
pub enum ScenarioArgs {
    /// Unpaced publishers -> competing consumers; messages per second at the consumers.
    #[command(after_help = EXIT_CODES)]
    Throughput {
        #[command(flatten)]
        common: CommonArgs,
        /// Publishing connections, each sending as fast as the window allows.
        #[arg(long, default_value_t = 1)]
        publishers: usize,
        /// Competing consumers (mqtt: every consumer of an address gets all of its messages).
        #[arg(long, default_value_t = 1)]
        consumers: usize,
        /// Addresses (subjects, topics); publishers cycle through them, consumers split them.
        #[arg(long, default_value_t = 1)]
        addresses: usize,
    },
    /// 1 publisher -> 1 consumer at fixed rates; coordinated-omission corrected percentiles.
    #[command(after_help = EXIT_CODES)]
    Latency {
        #[command(flatten)]
        common: CommonArgs,
        /// Rates to step through, in percent of --max-rate.
        #[arg(long, default_value = "10,25,50,75,90")]
        rates: String,
        /// Messages per second that 100% stands for; measured first when absent.
        #[arg(long)]
        max_rate: Option<f64>,
        /// Seconds each rate step lasts.
        #[arg(long, default_value_t = 5.0)]
        step_s: f64,
    },
    /// 1 publisher -> M multicast subscribers; deliveries per second.
    #[command(after_help = EXIT_CODES)]
    Fanout {
        #[command(flatten)]
        common: CommonArgs,
        /// Multicast subscribers, each receiving every message.
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
    },
    /// Open K idle sessions, hold them for --duration-s, measure the broker's memory per session.
    #[command(after_help = EXIT_CODES)]
    Connections {
        #[command(flatten)]
        common: CommonArgs,
        /// Idle sessions to open and hold.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Spread connections over source addresses 127.0.0.1 .. 127.0.0.N.
        #[arg(long, default_value_t = 1)]
        source_ips: u8,
    },
    /// Like throughput 1 -> 1 with durable SENDs; records each SEND's receipt latency (mbws).
    #[command(after_help = EXIT_CODES)]
    Durable {
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CommonArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    pub target: TargetKind,
    /// ws://HOST:PORT/ or wss://HOST:PORT/ (mbws, nats, mqtt), or HOST:PORT (relay).
    #[arg(long)]
    pub url: String,
    /// wss://: the PEM file of the certificates to trust (a self-signed broker certificate
    /// will do) [default: the system's, /etc/ssl/certs/ca-certificates.crt].
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Message body bytes (at least 8: the first 8 carry the send timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Seconds of measurement, at least 0.1 (connections: seconds to hold the sessions).
    #[arg(long, default_value_t = 5.0)]
    pub duration_s: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Broker process: CPU seconds from /proc/PID/stat, RSS from /proc/PID/status. Repeatable
    /// or comma-separated for a cluster: the CPU is summed over every process given, the RSS
    /// is the first one's.
    #[arg(long, value_delimiter = ',')]
    pub broker_pid: Vec<u32>,
    /// Consumers connect here instead of to --url (another node of a cluster: the publisher on
    /// one node, the consumer on another); the same scheme rules and --ca-file as --url.
    /// Repeatable or comma-separated: consumer i connects to the (i mod N)-th URL, so a fan-out
    /// spreads its subscribers evenly over the nodes given.
    #[arg(long, value_delimiter = ',')]
    pub consumer_url: Vec<String>,
    /// Makes the run's address names and client ids (`bench-ID-0` for mbws) [default: this
    /// process's id and the time]; a cluster benchmark places `bench-ID-0` on a node first.
    /// 1 to 32 of A-Z a-z 0-9 -.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Also write the result as a JSON object to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// mbws: MBLWS.huawei.com (light) instead of MBWS.huawei.com.
    #[arg(long)]
    pub light: bool,
    /// mqtt: QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Most messages a publisher may be ahead of its slowest consumer
    /// [default: 10000, mqtt qos 1: 500; at most 32 MiB of bodies in flight, each fan-out
    /// subscriber's copy counted].
    #[arg(long)]
    pub window: Option<u64>,
    /// mbws: credit of each subscription (cumulative ACK every credit/4 deliveries).
    #[arg(long, default_value_t = 1000)]
    pub credit: u32,
    /// mbws: acknowledgement mode of subscriptions.
    #[arg(long, value_enum, default_value_t = AckArg::Client)]
    pub ack: AckArg,
}

/// How the generator starts TLS with a `wss://` target: whom it trusts and the name the
/// target's certificate must carry.
#[derive(Clone)]
pub struct TlsTarget {
    pub config: std::sync::Arc<rustls::ClientConfig>,
    pub name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("TlsTarget").field("name", &self.name).finish_non_exhaustive()
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Mbws,
    Nats,
    Mqtt,
    Relay,
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Mbws => "mbws",
            TargetKind::Nats => "nats",
            TargetKind::Mqtt => "mqtt",
            TargetKind::Relay => "relay",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckArg {
    Client,
    Auto,
}

/// Where a connection goes: the socket address, the upgrade's `Host` header and path, and how
/// to start TLS (`wss://`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub tls: Option<TlsTarget>,
}

impl Endpoint {
    /// `url` (the flag `flag`) checked for `common`'s target and CA file.
    fn parse(flag: &str, url: &str, common: &CommonArgs) -> Result<Endpoint, BenchError> {
        let (addr, parsed) = mbws_client::parse_url(url).map_err(|error| usage(format!("{flag}: {error}")))?;
        let tls = if parsed.tls {
            if common.target == TargetKind::Relay {
                return Err(usage(format!("{flag} {url}: the relay speaks no TLS; give HOST:PORT")));
            }
            let config = mbws_client::tls_client_config(common.ca_file.as_deref())
                .map_err(|error| usage(format!("--ca-file: {error}")))?;
            let name = mbws_client::tls_server_name(&parsed).map_err(|error| usage(format!("{flag}: {error}")))?;
            Some(TlsTarget { config, name })
        } else {
            None
        };
        let mbws_client::BrokerUrl { host, path, .. } = parsed;
        Ok(Endpoint { addr, host, path, tls })
    }
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub enum Scenario {
    Throughput { publishers: usize, consumers: usize, addresses: usize },
    Latency { rates_percent: Vec<f64>, max_rate: Option<f64>, step: Duration },
    Fanout { subscribers: usize },
    Connections { connections: usize, source_ips: u8 },
    Durable,
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Throughput { .. } => "throughput",
            Scenario::Latency { .. } => "latency",
            Scenario::Fanout { .. } => "fanout",
            Scenario::Connections { .. } => "connections",
            Scenario::Durable => "durable",
        }
    }
}

/// Everything a run needs, checked.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub target: TargetKind,
    pub url: String,
    pub addr: SocketAddr,
    /// `Host` header and request path of the WebSocket upgrade.
    pub host: String,
    pub path: String,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// The first `--broker-pid` (its RSS is reported), and all of them (their CPU is summed).
    pub broker_pid: Option<u32>,
    pub broker_pids: Vec<u32>,
    /// `--consumer-url`: where consumers connect (round robin), when not to `url`.
    pub consumer_endpoints: Vec<Endpoint>,
    pub json: Option<PathBuf>,
    pub light: bool,
    pub qos: u8,
    pub window: u64,
    pub credit: u32,
    pub auto_ack: bool,
    /// `wss://`: how to start TLS.
    pub tls: Option<TlsTarget>,
    /// The flags as given, for the JSON `params` object.
    pub common: CommonArgs,
}

impl Plan {
    pub fn from_cli(cli: Cli) -> Result<Plan, BenchError> {
        let (common, scenario) = match cli.scenario {
            ScenarioArgs::Throughput { common, publishers, consumers, addresses } => {
                check_range("--publishers", publishers, 1, MAX_PUBLISHERS)?;
                check_range("--consumers", consumers, 1, MAX_CONSUMERS)?;
                check_range("--addresses", addresses, 1, MAX_ADDRESSES)?;
                (common, Scenario::Throughput { publishers, consumers, addresses })
            }
            ScenarioArgs::Latency { common, rates, max_rate, step_s } => {
                let rates_percent = parse_rates(&rates)?;
                if let Some(rate) = max_rate {
                    if !(rate.is_finite() && rate >= 1.0) {
                        return Err(usage(format!("--max-rate {rate}: give at least 1 message per second")));
                    }
                }
                let step = seconds("--step-s", step_s, false)?;
                (common, Scenario::Latency { rates_percent, max_rate, step })
            }
            ScenarioArgs::Fanout { common, subscribers } => {
                check_range("--subscribers", subscribers, 1, MAX_SUBSCRIBERS)?;
                (common, Scenario::Fanout { subscribers })
            }
            ScenarioArgs::Connections { common, connections, source_ips } => {
                check_range("--connections", connections, 1, MAX_CONNECTIONS)?;
                check_range("--source-ips", usize::from(source_ips), 1, 254)?;
                (common, Scenario::Connections { connections, source_ips })
            }
            ScenarioArgs::Durable { common } => (common, Scenario::Durable),
        };
        Plan::with_common(common, scenario)
    }

    fn with_common(common: CommonArgs, scenario: Scenario) -> Result<Plan, BenchError> {
        let Endpoint { addr, host, path, tls } = Endpoint::parse("--url", &common.url, &common)?;
        if tls.is_none() && common.ca_file.is_some() {
            eprintln!("mbws-bench: note: --ca-file only applies to wss:// URLs; ignored");
        }
        if let Some(id) = &common.run_id {
            if id.is_empty() || id.len() > 32 || !id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-') {
                return Err(usage(format!("--run-id \"{id}\": give 1 to 32 of A-Z a-z 0-9 -")));
            }
        }
        let consumer_endpoints = common
            .consumer_url
            .iter()
            .map(|url| Endpoint::parse("--consumer-url", url, &common))
            .collect::<Result<Vec<_>, _>>()?;
        if common.size < STAMP_BYTES || common.size > MAX_SIZE_BYTES {
            return Err(usage(format!(
                "--size {}: give {STAMP_BYTES} to {MAX_SIZE_BYTES} bytes (the first {STAMP_BYTES} carry the send time)",
                common.size
            )));
        }
        if common.target == TargetKind::Mqtt && common.size > MQTT_MAX_SIZE_BYTES {
            return Err(usage(format!(
                "--size {} with --target mqtt: mosquitto stalls on WebSocket deliveries over about 4 KB; \
                 use --size {MQTT_MAX_SIZE_BYTES} or less",
                common.size
            )));
        }
        if common.light && common.target != TargetKind::Mbws {
            eprintln!("mbws-bench: note: --light only applies to --target mbws; ignored");
        }
        if common.qos != 0 && common.target != TargetKind::Mqtt {
            eprintln!("mbws-bench: note: --qos only applies to --target mqtt; ignored");
        }
        if common.credit == 0 || common.credit > u32::from(u16::MAX) {
            return Err(usage(format!("--credit {}: give 1 to 65535 (the broker's max-credit)", common.credit)));
        }
        if let Some(path) = &common.json {
            check_writable(path)?;
        }
        let duration = seconds("--duration-s", common.duration_s, false)?;
        if duration < MIN_DURATION {
            return Err(usage(format!(
                "--duration-s {}: give at least {} s (a rate over a shorter run is noise)",
                common.duration_s,
                MIN_DURATION.as_secs_f64()
            )));
        }
        let warmup = seconds("--warmup-s", common.warmup_s, true)?;
        let default_window = if common.target == TargetKind::Mqtt && common.qos == 1 {
            DEFAULT_MQTT_QOS1_WINDOW_MESSAGES
        } else {
            DEFAULT_WINDOW_MESSAGES
        };
        let copies = match scenario {
            Scenario::Fanout { subscribers } => subscribers as u64,
            _ => 1,
        };
        let byte_bound = (WINDOW_BYTES / (common.size as u64 * copies)).max(16);
        let window = match common.window {
            Some(0) => return Err(usage("--window 0: give at least 1 message".to_string())),
            Some(window) => window.min(byte_bound),
            None => default_window.min(byte_bound),
        };
        Ok(Plan {
            scenario,
            target: common.target,
            url: common.url.clone(),
            addr,
            host,
            path,
            size: common.size,
            duration,
            warmup,
            broker_pid: common.broker_pid.first().copied(),
            broker_pids: common.broker_pid.clone(),
            consumer_endpoints,
            json: common.json.clone(),
            light: common.light && common.target == TargetKind::Mbws,
            qos: if common.target == TargetKind::Mqtt { common.qos } else { 0 },
            window,
            credit: common.credit,
            auto_ack: common.ack == AckArg::Auto,
            tls,
            common,
        })
    }
}

/// Fails early (usage) when `--json PATH` cannot be written, rather than after the whole run.
/// A file that did not exist is created to try, and removed again.
fn check_writable(path: &Path) -> Result<(), BenchError> {
    let existed = path.exists();
    match std::fs::OpenOptions::new().append(true).create(true).open(path) {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(error) => Err(usage(format!(
            "--json {}: cannot write there ({error}); give a path in a writable directory",
            path.display()
        ))),
    }
}

fn usage(message: String) -> BenchError {
    BenchError::Usage(message)
}

fn check_range(flag: &str, value: usize, min: usize, max: usize) -> Result<(), BenchError> {
    if value < min || value > max {
        return Err(usage(format!("{flag} {value}: give {min} to {max}")));
    }
    Ok(())
}

fn seconds(flag: &str, value: f64, zero_allowed: bool) -> Result<Duration, BenchError> {
    let valid = value.is_finite() && value <= 86_400.0 && (value > 0.0 || (zero_allowed && value == 0.0));
    if !valid {
        let least = if zero_allowed { "0" } else { "more than 0" };
        return Err(usage(format!("{flag} {value}: give {least} and at most 86400 seconds")));
    }
    Ok(Duration::from_secs_f64(value))
}

/// `"10,25,50"` -> `[10.0, 25.0, 50.0]`: each a percentage above 0 and at most 1000.
pub fn parse_rates(text: &str) -> Result<Vec<f64>, BenchError> {
    let mut rates = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let rate: f64 = part.parse().map_err(|_| {
            usage(format!("--rates \"{text}\": \"{part}\" is not a number (give percents like 10,50,90)"))
        })?;
        if !(rate.is_finite() && rate > 0.0 && rate <= 1000.0) {
            return Err(usage(format!("--rates \"{text}\": {rate} is not a percentage above 0 and at most 1000")));
        }
        rates.push(rate);
    }
    if rates.len() > 100 {
        return Err(usage(format!("--rates \"{text}\": at most 100 steps")));
    }
    Ok(rates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, BenchError> {
        let cli = Cli::try_parse_from(std::iter::once("mbws-bench").chain(args.iter().copied()))
            .map_err(|error| BenchError::Usage(error.to_string()))?;
        Plan::from_cli(cli)
    }

    #[test]
    fn parses_the_contract_flags() {
        let plan = plan(&[
            "throughput",
            "--target",
            "mbws",
            "--url",
            "ws://127.0.0.1:7447/",
            "--publishers",
            "2",
            "--consumers",
            "3",
            "--addresses",
            "2",
            "--size",
            "128",
            "--duration-s",
            "2",
            "--warmup-s",
            "0",
            "--light",
        ])
        .unwrap();
        assert!(matches!(plan.scenario, Scenario::Throughput { publishers: 2, consumers: 3, addresses: 2 }));
        assert_eq!(plan.size, 128);
        assert!(plan.light);
        assert_eq!(plan.warmup, Duration::ZERO);
        assert_eq!(plan.window, DEFAULT_WINDOW_MESSAGES);
    }

    #[test]
    fn refuses_large_mqtt_messages_and_tiny_bodies() {
        let mqtt = plan(&["fanout", "--target", "mqtt", "--url", "ws://127.0.0.1:1/", "--size", "5000"]);
        assert!(matches!(mqtt, Err(BenchError::Usage(message)) if message.contains("4 KB")));
        let tiny = plan(&["durable", "--target", "mbws", "--url", "ws://127.0.0.1:1/", "--size", "4"]);
        assert!(matches!(tiny, Err(BenchError::Usage(_))));
    }

    #[test]
    fn runs_too_short_to_measure_are_refused() {
        let short = plan(&["throughput", "--target", "mbws", "--url", "ws://127.0.0.1:1/", "--duration-s", "0.01"]);
        assert!(matches!(short, Err(BenchError::Usage(message)) if message.contains("at least 0.1 s")));
        let enough = plan(&["throughput", "--target", "mbws", "--url", "ws://127.0.0.1:1/", "--duration-s", "0.1"]);
        assert!(enough.is_ok());
    }

    #[test]
    fn rates_are_percentages() {
        assert_eq!(parse_rates("10, 50,90").unwrap(), vec![10.0, 50.0, 90.0]);
        assert!(parse_rates("10,x").is_err());
        assert!(parse_rates("0").is_err());
    }

    #[test]
    fn a_fanout_window_bounds_the_bytes_of_every_subscriber_copy() {
        let fanout = |subscribers: &str| {
            let args = ["fanout", "--target", "mbws", "--url", "ws://127.0.0.1:1/", "--size", "64"];
            plan(&[&args[..], &["--subscribers", subscribers]].concat()).unwrap().window
        };
        assert_eq!(fanout("10"), DEFAULT_WINDOW_MESSAGES, "10 x 64 B x 10,000 is within 32 MiB");
        assert_eq!(fanout("1000"), WINDOW_BYTES / (64 * 1000));
        assert_eq!(fanout("10000"), 52);
    }

    #[test]
    fn consumer_urls_are_repeatable_or_comma_separated_and_each_is_checked() {
        let args = ["fanout", "--target", "mbws", "--url", "ws://127.0.0.1:1/"];
        let spread = plan(&[&args[..], &["--consumer-url", "ws://127.0.0.1:2/,ws://127.0.0.1:3/"]].concat()).unwrap();
        let repeated = plan(
            &[&args[..], &["--consumer-url", "ws://127.0.0.1:2/", "--consumer-url", "ws://127.0.0.1:3/"]].concat(),
        )
        .unwrap();
        for plan in [spread, repeated] {
            let ports: Vec<u16> = plan.consumer_endpoints.iter().map(|endpoint| endpoint.addr.port()).collect();
            assert_eq!(ports, [2, 3]);
        }
        let bad = plan(&[&args[..], &["--consumer-url", "ws://127.0.0.1:2/,http://x/"]].concat());
        assert!(matches!(bad, Err(BenchError::Usage(message)) if message.contains("--consumer-url")));
    }

    #[test]
    fn mqtt_qos1_keeps_a_small_window() {
        let plan = plan(&["throughput", "--target", "mqtt", "--url", "ws://127.0.0.1:1/", "--qos", "1"]).unwrap();
        assert_eq!(plan.window, DEFAULT_MQTT_QOS1_WINDOW_MESSAGES);
    }
}
