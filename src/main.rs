//! `mbws-broker`: flags, start-up, signals.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use mbws::config::{Config, DEFAULT_LISTEN};
use mbws::log;
use mbws::logging::{self, Level};

/// mimalloc instead of glibc's malloc: the broker allocates and frees a few small objects per
/// message (the shared message, a queued message's compact copy), and glibc's allocator spent
/// about 15% of the broker's instructions on them (docs/PERFORMANCE.md, "Optimisation pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A thread-per-core io_uring message broker for the MessageBroker WebSocket Subprotocol
/// (subprotocols MBWS.huawei.com and MBLWS.huawei.com). WebSocket upgrades are accepted at `/`.
#[derive(Parser, Debug)]
#[command(name = "mbws-broker", version)]
struct Args {
    /// Address to listen on (every shard listens on it with SO_REUSEPORT).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: std::net::SocketAddr,
    /// Number of shard threads [default: cores available to the process].
    #[arg(long)]
    shards: Option<usize>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// Largest WebSocket frame accepted (close 1009 beyond).
    #[arg(long, default_value_t = Config::default().max_frame_bytes)]
    max_frame_bytes: usize,
    /// Largest WebSocket message (one MBWS frame) accepted (close 1009 beyond).
    #[arg(long, default_value_t = Config::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Most messages waiting in one address queue; a SEND beyond gets ERROR 4429.
    #[arg(long, default_value_t = Config::default().max_queued_messages)]
    max_queued_messages: u32,
    /// Body bytes waiting in one address queue; a SEND beyond gets ERROR 4429.
    #[arg(long, default_value_t = Config::default().max_queued_bytes)]
    max_queued_bytes: usize,
    /// Body bytes waiting in all queues (split over the shards); a SEND beyond gets ERROR 4429.
    #[arg(long, default_value_t = Config::default().memory_budget_bytes)]
    memory_budget_bytes: usize,
    /// Most unanswered SENDs per session before the broker stops reading from it.
    #[arg(long, default_value_t = Config::default().max_inflight_sends)]
    max_inflight_sends: u32,
    /// Bytes queued for one connection beyond which the broker stops reading from it.
    #[arg(long, default_value_t = Config::default().max_outbound_bytes)]
    max_outbound_bytes: usize,
    /// Most subscriptions per session.
    #[arg(long, default_value_t = Config::default().max_subscriptions)]
    max_subscriptions: u32,
    /// Largest credit (unacknowledged deliveries) per subscription.
    #[arg(long, default_value_t = Config::default().max_credit)]
    max_credit: u32,
    /// Milliseconds an MBWS session is kept after its connection is lost, for resume (0: never).
    #[arg(long, default_value_t = Config::default().session_expiry_ms)]
    session_expiry_ms: u32,
    /// Milliseconds a client-ack delivery may stay unacknowledged before it is redelivered (0: no limit).
    #[arg(long, default_value_t = 0)]
    ack_timeout_ms: u64,
    /// Deliveries of one message before it moves to the dead-letter address DLQ.<address> (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_deliveries: u32,
    /// Milliseconds a connection may take to complete its WebSocket upgrade.
    #[arg(long, default_value_t = 10_000)]
    handshake_timeout_ms: u64,
    /// Milliseconds a connection may take to send OPEN after the upgrade.
    #[arg(long, default_value_t = 10_000)]
    open_timeout_ms: u64,
    /// Directory for the durable message log (one subdirectory per shard).
    #[arg(long, default_value = "mbws-data")]
    data_dir: std::path::PathBuf,
    /// Address whose every message is durable (exact name, or a prefix ending in *); repeatable.
    #[arg(long = "durable-address", value_name = "ADDRESS")]
    durable_addresses: Vec<String>,
    /// Group-commit window in microseconds: how long a durable write waits for company (0: none).
    #[arg(long, default_value_t = 0)]
    log_batch_delay_us: u64,
    /// Most bytes written (and fsynced) by one group commit.
    #[arg(long, default_value_t = Config::default().log_batch_bytes)]
    log_batch_bytes: usize,
    /// Durable log segment size in bytes.
    #[arg(long, default_value_t = Config::default().log_segment_bytes)]
    log_segment_bytes: u64,
    /// What to do with a damaged record that valid records follow: strict (refuse to start) or
    /// skip-corrupt (skip it, keep the rest, keep the original file aside).
    #[arg(long, default_value = "strict", value_parser = parse_recovery)]
    log_recovery: mbws::store::RecoveryMode,
    /// Log level: error, warn, info or debug.
    #[arg(long, default_value = "info", value_parser = parse_level)]
    log_level: Level,
}

fn parse_recovery(text: &str) -> Result<mbws::store::RecoveryMode, String> {
    match text {
        "strict" => Ok(mbws::store::RecoveryMode::Strict),
        "skip-corrupt" => Ok(mbws::store::RecoveryMode::SkipCorrupt),
        _ => Err(format!("unknown recovery mode \"{text}\": use strict or skip-corrupt")),
    }
}

fn parse_level(text: &str) -> Result<Level, String> {
    Level::parse(text).ok_or_else(|| format!("unknown log level \"{text}\": use error, warn, info or debug"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::set_level(args.log_level);
    let config = Config {
        listen: args.listen,
        shards: args.shards.unwrap_or_else(mbws::config::available_cores),
        pin_threads: !args.no_pin,
        max_frame_bytes: args.max_frame_bytes,
        max_message_bytes: args.max_message_bytes,
        max_queued_messages: args.max_queued_messages,
        max_inflight_sends: args.max_inflight_sends,
        max_outbound_bytes: args.max_outbound_bytes,
        max_subscriptions: args.max_subscriptions,
        max_credit: args.max_credit,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        open_timeout: Duration::from_millis(args.open_timeout_ms),
        session_expiry_ms: args.session_expiry_ms,
        ack_timeout_ms: args.ack_timeout_ms,
        max_deliveries: args.max_deliveries,
        max_queued_bytes: args.max_queued_bytes,
        memory_budget_bytes: args.memory_budget_bytes,
        data_dir: args.data_dir,
        durable_addresses: args.durable_addresses,
        log_batch_delay: Duration::from_micros(args.log_batch_delay_us),
        log_batch_bytes: args.log_batch_bytes,
        log_segment_bytes: args.log_segment_bytes,
        log_recovery: args.log_recovery,
        ..Config::default()
    };
    if let Err(problem) = config.validate() {
        eprintln!("mbws-broker: {problem}");
        return ExitCode::from(2);
    }
    // Block the stop signals in every thread (shard threads inherit the mask); the main thread
    // waits for them with sigwait and then shuts the shards down in order.
    let signals = match block_stop_signals() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("mbws-broker: cannot set up signal handling: {error}");
            return ExitCode::FAILURE;
        }
    };
    let shards = config.shards;
    let running = match mbws::shard::start(config) {
        Ok(running) => running,
        Err(error) => {
            eprintln!("mbws-broker: {error}");
            return ExitCode::FAILURE;
        }
    };
    log!(
        Level::Info,
        "mbws-broker {} listening on {} (ws://{}/) shards={} io={}",
        env!("CARGO_PKG_VERSION"),
        running.local_addr,
        running.local_addr,
        shards,
        running.io_driver
    );
    let signal = wait_for_signal(&signals);
    log!(Level::Info, "received signal {signal}; closing connections (1001) and stopping");
    running.shutdown();
    log!(Level::Info, "stopped");
    ExitCode::SUCCESS
}

fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data initialized by sigemptyset before use; pthread_sigmask
    // gets valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut signal: libc::c_int = 0;
    // SAFETY: `set` holds blocked signals; `signal` is a live c_int.
    unsafe { libc::sigwait(set, &mut signal) };
    signal
}
