//! `mbws-broker`: flags, start-up, signals.

// The `///` comments on the argument structs are clap's help texts, shown verbatim by `--help`
// (`[IPv6]:PORT`, `DLQ.<address>`, `https://HOST`), not rustdoc markdown.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags, rustdoc::bare_urls)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};

use mbws::config::file::{parse_level, parse_log_format, parse_recovery, recovery_name, ConfigFile};
use mbws::config::{AdminListen, Config, Origins, Secret, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, FLAG_RANGES};
use mbws::log;
use mbws::logging::{self, Level, LogFormat};
use mbws::summary::Summary;

/// mimalloc instead of glibc's malloc: the broker allocates and frees a few small objects per
/// message (the shared message, a queued message's compact copy), and glibc's allocator spent
/// about 15% of the broker's instructions on them (docs/PERFORMANCE.md, "Optimisation pass").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for the broker (`PR_SET_THP_DISABLE`), unless
/// `MIMALLOC_ALLOW_THP` is set, which then decides (mimalloc's own option).
///
/// mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), so with the kernel's usual
/// `madvise` setting every first touch of a fresh 2 MiB region zeroes (and may compact) the
/// whole region on the shard's thread. A fan-out grows the broker's heap in small pieces over
/// many connections (write chunks, unacknowledged rings): with 1,000 subscribers that zeroing
/// took most of the broker's CPU, and halved its deliveries per second
/// (docs/PERFORMANCE.md, "Session 10: fan-out without huge pages"). With 4 KiB pages only
/// what is touched is zeroed. nats-server's Go runtime does not ask for huge pages either.
fn disable_transparent_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointers.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        // Only a cost, never a fault: the broker runs the same with huge pages.
        log!(
            Level::Debug,
            "transparent huge pages stay on (prctl PR_SET_THP_DISABLE: {})",
            std::io::Error::last_os_error()
        );
    }
}

/// A thread-per-core io_uring message broker for the MessageBroker WebSocket Subprotocol
/// (subprotocols MBWS.huawei.com and MBLWS.huawei.com). WebSocket upgrades are accepted at `/`.
#[derive(Parser, Debug)]
#[command(name = "mbws-broker", version)]
struct Args {
    /// Address to listen on: HOST:PORT (a host name is resolved, its first address used),
    /// IP:PORT, [IPv6]:PORT, or a bare PORT (on 127.0.0.1). Every shard listens on it with
    /// SO_REUSEPORT; a port another process listens on is refused.
    #[arg(long, default_value = DEFAULT_LISTEN, value_parser = mbws::config::parse_listen)]
    listen: std::net::SocketAddr,
    /// Number of shard threads [default: cores available to the process]; more than the cores
    /// available is allowed with a warning.
    #[arg(long)]
    shards: Option<usize>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// Largest WebSocket frame accepted (close 1009 beyond); when not given, the default or
    /// --max-message-bytes, whichever is lower.
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
    /// Most application headers on one message (fatal ERROR 4413 beyond).
    #[arg(long, default_value_t = Config::default().max_headers)]
    max_headers: usize,
    /// Most bytes of content-type, correlation-id, reply-to and application headers on one
    /// message (fatal ERROR 4413 beyond).
    #[arg(long, default_value_t = Config::default().max_header_bytes)]
    max_header_bytes: usize,
    /// Longest heartbeat interval agreed in OPENED (also the interval for a client that asks for
    /// more); a connection silent for twice its interval is closed (ERROR 4408).
    #[arg(long, default_value_t = Config::default().max_heartbeat_ms)]
    max_heartbeat_ms: u32,
    /// Most TCP connections open at once in the broker; beyond, an upgrade is answered 503.
    #[arg(long, default_value_t = Config::default().max_connections)]
    max_connections: usize,
    /// Most TCP connections open at once from one IP address; beyond, an upgrade is answered 503.
    #[arg(long, default_value_t = Config::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Most sessions in the broker, detached ones (kept for resume) included; beyond, OPEN gets
    /// fatal ERROR 4503.
    #[arg(long, default_value_t = Config::default().max_sessions)]
    max_sessions: usize,
    /// Most addresses in the broker (split over the shards); a SEND or SUBSCRIBE that would
    /// create one more gets ERROR 4429.
    #[arg(long, default_value_t = Config::default().max_addresses)]
    max_addresses: usize,
    /// Milliseconds an MBWS session is kept after its connection is lost, for resume (0: never).
    #[arg(long, default_value_t = Config::default().session_expiry_ms)]
    session_expiry_ms: u32,
    /// Milliseconds a client-ack delivery may stay unacknowledged before it is redelivered (0: no limit).
    #[arg(long, default_value_t = Config::default().ack_timeout_ms)]
    ack_timeout_ms: u64,
    /// Deliveries of one message before it moves to the dead-letter address DLQ.<address> (0: no limit).
    #[arg(long, default_value_t = Config::default().max_deliveries)]
    max_deliveries: u32,
    /// Milliseconds a connection may take to complete its WebSocket upgrade.
    #[arg(long, default_value_t = Config::default().handshake_timeout.as_millis() as u64)]
    handshake_timeout_ms: u64,
    /// Milliseconds a connection may take to send OPEN after the upgrade.
    #[arg(long, default_value_t = Config::default().open_timeout.as_millis() as u64)]
    open_timeout_ms: u64,
    /// Directory for the durable message log (one subdirectory per shard); created if missing,
    /// and only once the broker can run.
    #[arg(long, default_value_os_t = Config::default().data_dir)]
    data_dir: std::path::PathBuf,
    /// Address whose every message is durable (exact name, or a prefix ending in *); repeatable.
    #[arg(long = "durable-address", value_name = "ADDRESS")]
    durable_addresses: Vec<String>,
    /// Group-commit window in microseconds: how long a durable write waits for company (0: none).
    #[arg(long, default_value_t = Config::default().log_batch_delay.as_micros() as u64)]
    log_batch_delay_us: u64,
    /// Most bytes written (and fsynced) by one group commit.
    #[arg(long, default_value_t = Config::default().log_batch_bytes)]
    log_batch_bytes: usize,
    /// Durable log segment size in bytes.
    #[arg(long, default_value_t = Config::default().log_segment_bytes)]
    log_segment_bytes: u64,
    /// What to do with a damaged record that valid records follow: strict (refuse to start) or
    /// skip-corrupt (skip it, keep the rest, keep the original file aside).
    #[arg(long, default_value = recovery_name(Config::default().log_recovery), value_parser = parse_recovery)]
    log_recovery: mbws::store::RecoveryMode,
    /// Serve wss:// (TLS 1.3 and 1.2) with this PEM certificate chain, the broker's own
    /// certificate first; needs --tls-key. Re-read on SIGHUP.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1); needs --tls-cert. Re-read on
    /// SIGHUP.
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// The record layer of wss:// sessions once rustls has done the handshake: in-place
    /// (decrypted in the connection's buffer, sealed from its batch, with rustls's ciphers and
    /// key schedule) or rustls (rustls's buffered connection). Same protocol either way.
    #[arg(long, default_value = Config::default().tls_records.name(), value_parser = mbws::tls::TlsRecords::parse)]
    tls_records: mbws::tls::TlsRecords,
    /// Origin whose web pages may open a WebSocket here, exactly as browsers send it
    /// (https://app.example.com, https://app.example.com:8443); repeatable; no patterns. Upgrades
    /// with another Origin header are refused (403); upgrades without one (clients that are not
    /// browsers) are not checked. Without this flag any origin is accepted.
    #[arg(long = "allowed-origin", value_name = "ORIGIN", value_parser = mbws::config::parse_origin)]
    allowed_origins: Vec<String>,
    /// Let sessions without credentials in (anonymous: every address, unless the configuration's
    /// [auth.anonymous] says less). The default when the configuration has no [[auth.user]] or
    /// [[auth.token]]; beyond loopback it needs --allow-anonymous-remote too.
    #[arg(long)]
    allow_anonymous: bool,
    /// Allow anonymous sessions when listening beyond loopback (anyone who reaches the port can
    /// send and consume); without it, such a broker refuses to start.
    #[arg(long)]
    allow_anonymous_remote: bool,
    /// Log level: error, warn, info or debug (debug adds a line per connection step).
    #[arg(long, default_value = Config::default().log_level.name(), value_parser = parse_level)]
    log_level: Level,
    /// Log line format: text, or json (one object per line: ts, level, target, shard, msg and
    /// the event's fields).
    #[arg(long, default_value = Config::default().log_format.name(), value_parser = parse_log_format)]
    log_format: LogFormat,
    /// Seconds between two one-line summaries logged at info (message rates, sessions, queued
    /// messages and bytes); 0: none.
    #[arg(long, default_value_t = Config::default().summary_interval_secs)]
    summary_interval_secs: u64,
    /// Milliseconds a stop (SIGTERM, SIGINT, the end of a drain) may take: in-flight SENDs are
    /// answered, connections closed with 1001, the durable log synced; what is not done by then
    /// is abandoned (and logged). A second SIGTERM or SIGINT exits at once.
    #[arg(long, default_value_t = Config::default().shutdown_grace_ms)]
    shutdown_grace_ms: u64,
    /// Milliseconds a drain (POST /api/drain, SIGUSR2) spreads the closing of the connections
    /// over (new upgrades get 503 meanwhile); then the broker stops.
    #[arg(long, default_value_t = Config::default().drain_duration_ms)]
    drain_duration_ms: u64,
    /// Address of the admin API (health, Prometheus metrics, addresses, sessions over HTTP), as
    /// for --listen, or off. Beyond loopback it requires --admin-token.
    #[arg(long, default_value = DEFAULT_ADMIN_LISTEN, value_parser = mbws::config::parse_admin_listen)]
    admin_listen: AdminListen,
    /// Bearer token the admin API requires (`Authorization: Bearer TOKEN`); required when
    /// --admin-listen is beyond loopback. Prefer the configuration file or MBWS_ADMIN_TOKEN
    /// to the command line, which other users can read in the process list.
    #[arg(long, env = "MBWS_ADMIN_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    admin_token: Option<String>,
    /// Join the cluster NAME (docs/CLUSTER.md): membership and address placement live in etcd
    /// under /mbws/NAME/; needs --etcd.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// etcd's client URL (http://HOST:PORT) for --cluster; repeatable, or comma-separated.
    #[arg(long = "etcd", value_name = "URL", value_delimiter = ',')]
    etcd: Vec<String>,
    /// This node's name in the cluster [default: host name, a dash and the listen port].
    #[arg(long, value_name = "NAME")]
    node_name: Option<String>,
    /// The URL clients and other nodes use to reach this node (ws://HOST:PORT/), named in the
    /// 4421 redirect hint [default: ws:// and the listen address].
    #[arg(long, value_name = "URL")]
    advertise_url: Option<String>,
    /// Milliseconds of the node's lease at etcd: a node silent this long is taken for dead and
    /// its non-durable addresses are re-placed; a node that cannot renew it stops serving
    /// (fenced) before then.
    #[arg(long, default_value_t = Config::default().cluster_lease_ms)]
    cluster_lease_ms: u64,
    /// The user name the forwarders' and relays' sessions to the other nodes log in with, when the nodes
    /// require authentication (with --cluster-passcode; without it, a bearer token alone).
    #[arg(long, value_name = "USER")]
    cluster_login: Option<String>,
    /// The password of --cluster-login, or a bearer token when no login is given, for the
    /// forwarders' and relays' sessions to the other nodes. Prefer the configuration file or
    /// MBWS_CLUSTER_PASSCODE to the command line, which other users can read in the process list.
    #[arg(long, env = "MBWS_CLUSTER_PASSCODE", hide_env_values = true, value_name = "SECRET")]
    cluster_passcode: Option<String>,
    /// PEM file of the certificate authorities the forwarders and relays trust when the other
    /// nodes serve wss:// [default: the system's, /etc/ssl/certs/ca-certificates.crt].
    #[arg(long, value_name = "PATH")]
    cluster_ca_file: Option<std::path::PathBuf>,
    /// Configuration file (TOML): every flag is also a key, spelled as the flag without its
    /// dashes in front (max-message-bytes = 65536); a flag given here overrides the file.
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Check the configuration (the file and the flags) and exit: 0 if the broker would start
    /// with it, 1 (with the reason) if not. Nothing is written and nothing listens.
    #[arg(long)]
    check_config: bool,
    /// Print the effective configuration (the file, then the flags, then the defaults) as TOML
    /// and exit (1 if it is not valid). Secrets are printed as "<redacted>".
    #[arg(long)]
    print_config: bool,
}
/// Builds the command line with each numeric flag's valid range ([`FLAG_RANGES`]) appended
/// to its help text, so `--help`, the start-up check and the README share one source.
fn command() -> clap::Command {
    let mut command = Args::command();
    for range in FLAG_RANGES {
        let id = range.flag.trim_start_matches("--").replace('-', "_");
        command = command.mut_arg(id, |arg| {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            arg.help(format!("{help} [range: {}]", range.range_text()))
        });
    }
    command.after_help(
        "Exit status: 0 after SIGINT or SIGTERM (or the end of a drain, SIGUSR2), 1 when the broker cannot start or \
         a second SIGINT or SIGTERM cut the stop short, 2 on bad usage (a bad flag, \
         or a bad key or value in the configuration file). With --check-config or --print-config: 0 for a valid \
         configuration, 1 otherwise.",
    )
}

fn main() -> ExitCode {
    install_panic_hook();
    let matches = command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let checking = args.check_config || args.print_config;
    let config_path = args.config.clone();
    let (mut config, origins) = match config_from(args, &matches)
        .and_then(|(config, origins)| config.validate_from(&origins).map(|()| (config, origins)))
        .and_then(|(config, origins)| mbws::config::check_data_dir(&config.data_dir).map(|()| (config, origins)))
    {
        Ok(valid) => valid,
        Err(problem) => {
            eprintln!("mbws-broker: {problem}");
            return ExitCode::from(if checking { 1 } else { 2 });
        }
    };
    if checking {
        if matches.get_flag("print_config") {
            print!("{}", ConfigFile::effective(&config).to_toml());
        } else {
            println!("mbws-broker: the configuration is valid");
        }
        return ExitCode::SUCCESS;
    }
    logging::set_level(config.log_level);
    logging::set_format(config.log_format);
    disable_transparent_huge_pages();
    let cores = mbws::config::available_cores();
    if config.shards > cores {
        // Allowed (a container's CPU quota or a test may call for it), but every shard is a
        // thread with its own io_uring and buffers that then share cores: say what it costs.
        log!(
            Level::Warn,
            "--shards {} is more than the {cores} cores this process may use: shards will share cores, \
             which costs memory and latency; use --shards {cores} or fewer",
            config.shards
        );
    }
    raise_open_file_limit();
    // Block the signals the main thread handles in every thread (shard threads inherit the
    // mask); the main thread waits for them with sigwait.
    let signals = match block_handled_signals() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("mbws-broker: cannot set up signal handling: {error}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match config.tls.clone().map(mbws::tls::TlsContext::load).transpose() {
        Ok(tls) => tls,
        Err(problem) => {
            eprintln!("mbws-broker: {problem}");
            return ExitCode::from(2);
        }
    };
    warn_about_exposure(&config);
    let shards = config.shards;
    // What runs, for a SIGHUP reload to compare the re-read configuration with.
    let mut current = config.clone();
    if let Some(file) = origins.file() {
        log!(Level::Info, "configuration from {} (flags given override it)", file.display());
    }
    // What the admin API changed before (declared addresses, users), from the data directory.
    if let Err(problem) = restore_admin_state(&mut config) {
        eprintln!("mbws-broker: {problem}");
        return ExitCode::FAILURE;
    }
    let admin_token = config.admin_token.clone();
    let mut admin_settings = mbws::admin::AdminSettings::from_config(&config, Vec::new());
    let declared = config.declared_addresses.clone();
    let auth = config.auth.clone();
    // Bound before the shards start, so a taken port stops the start before anything is written.
    let admin_listener = match config.admin_listen.map(mbws::admin::bind).transpose() {
        Ok(listener) => listener,
        Err(problem) => {
            eprintln!("mbws-broker: {problem}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let cluster_config = config.clone();
    let running = match mbws::shard::start(config, tls) {
        Ok(running) => running,
        Err(error) => {
            eprintln!("mbws-broker: {error}");
            return ExitCode::FAILURE;
        }
    };
    log!(
        Level::Info,
        "mbws-broker {} listening on {} ({}://{}/) shards={} io={}",
        env!("CARGO_PKG_VERSION"),
        running.local_addr,
        if running.tls.is_some() { "wss" } else { "ws" },
        running.local_addr,
        shards,
        running.io_driver
    );
    if let Some(settings) = mbws::cluster::ClusterSettings::from_config(&cluster_config, running.local_addr) {
        if let Err(error) = mbws::cluster::start(settings, running.post_office()) {
            eprintln!("mbws-broker: cannot start the cluster control-plane thread: {error}");
            running.shutdown();
            return ExitCode::FAILURE;
        }
    }
    // Links to other brokers (src/link/): a thread each, reaching this broker over loopback.
    let links = match start_links(&current.links, &running) {
        Ok(links) => links,
        Err(problem) => {
            eprintln!("mbws-broker: {problem}");
            running.shutdown();
            return ExitCode::FAILURE;
        }
    };
    admin_settings.links = links.statuses();
    if let Some(listener) = admin_listener {
        let admin_addr = listener.local_addr().map_or_else(|_| "?".to_string(), |addr| addr.to_string());
        admin_settings.origins.extend(broker_origins(running.local_addr, running.tls.is_some()));
        if let Err(error) = mbws::admin::spawn(listener, admin_settings, &declared, running.inspector()) {
            eprintln!("mbws-broker: cannot start the admin API thread: {error}");
            running.shutdown();
            return ExitCode::FAILURE;
        }
        let access = if admin_token.is_some() { "bearer token required" } else { "no token: loopback only" };
        log!(
            Level::Info,
            "admin API at http://{admin_addr}/ ({access}): /healthz /readyz /metrics /api/addresses /api/sessions \
             /api/users /api/links"
        );
    }
    let mut summary = Summary::new(started);
    let mut next_summary = started + Duration::from_secs(current.summary_interval_secs);
    // When a drain (SIGUSR2, POST /api/drain) is over and the broker stops.
    let mut drain_ends: Option<Instant> = None;
    let why = loop {
        let now = Instant::now();
        let summary_wait = (current.summary_interval_secs > 0).then(|| next_summary.saturating_duration_since(now));
        let drain_wait = drain_ends.map(|end| end.saturating_duration_since(now));
        let wait = match (summary_wait, drain_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match wait_for_signal(&signals, wait) {
            Some(libc::SIGHUP) => {
                let interval_before = current.summary_interval_secs;
                reload(&running, &matches, &mut current, config_path.as_deref(), &auth);
                if current.summary_interval_secs != interval_before {
                    next_summary = Instant::now() + Duration::from_secs(current.summary_interval_secs);
                }
            }
            Some(libc::SIGUSR2) => {
                let duration = Duration::from_millis(current.drain_duration_ms);
                if running.drain(duration) {
                    drain_ends = Some(Instant::now() + duration);
                    log!(
                        Level::Info,
                        "draining (lame duck): new upgrades get 503, the connections are closed over {} ms, then the \
                         broker stops",
                        duration.as_millis()
                    );
                } else {
                    log!(Level::Info, "received SIGUSR2: already draining");
                }
            }
            Some(signal) => break format!("received {}", signal_name(signal)),
            None if drain_ends.is_some_and(|end| Instant::now() >= end) => break "the drain is over".to_string(),
            None if current.summary_interval_secs > 0 && Instant::now() >= next_summary => {
                log_summary(&mut summary, &running, shards);
                // The next one an interval later; after a stall (a suspended machine), from now.
                let interval = Duration::from_secs(current.summary_interval_secs);
                next_summary = (next_summary + interval).max(Instant::now());
            }
            None => {} // Woken early (EINTR): wait for the rest.
        }
    };
    // The links finish their round first (a quarter of the grace), while the shards still answer.
    links.stop(Duration::from_millis(current.shutdown_grace_ms / 4));
    stop(running, &signals, Duration::from_millis(current.shutdown_grace_ms), &why)
}

fn start_links(specs: &[mbws::link::LinkSpec], running: &mbws::shard::Running) -> Result<mbws::link::Links, String> {
    if specs.is_empty() {
        return Ok(mbws::link::Links::default());
    }
    let local = mbws::link::LocalBroker::for_listener(running.local_addr, running.tls.is_some())?;
    mbws::link::Links::start(specs, &local).map_err(|error| format!("cannot start the link threads: {error}"))
}

/// A graceful stop within `grace` (docs/OPERATIONS.md, "Stop"): the shards stop accepting and
/// reading, the SENDs they took are answered (for up to half the grace), every connection is
/// closed with 1001 (until three quarters of it), the durable logs are synced, and the process
/// exits 0; what is not done by then is abandoned, and logged. A second SIGINT or SIGTERM
/// meanwhile exits at once, with status 1.
fn stop(running: mbws::shard::Running, signals: &libc::sigset_t, grace: Duration, why: &str) -> ExitCode {
    let started = Instant::now();
    let deadline = started + grace;
    log!(
        Level::Info,
        "{why}: stopping within {} ms: answering the SENDs in flight, then closing connections (1001)",
        grace.as_millis()
    );
    let shards = running.shard_count();
    let answered = running.stop_input();
    let mut quiet = 0;
    let answers_by = started + grace / 2;
    while quiet < shards && Instant::now() < answers_by {
        if let Err(code) = exit_on_second_signal(signals, Duration::ZERO) {
            return code;
        }
        if answered.recv_timeout(STOP_POLL.min(answers_by.saturating_duration_since(Instant::now()))).is_ok() {
            quiet += 1;
        }
    }
    if quiet < shards {
        log!(
            Level::Warn,
            "{} of {shards} shards still had SENDs in flight after {} ms (half the shutdown grace); closing anyway",
            shards - quiet,
            (grace / 2).as_millis()
        );
    }
    // A little before the deadline, so that the main thread can still exit on time.
    let exit_by = deadline.checked_sub(STOP_POLL).unwrap_or(deadline).max(Instant::now());
    running.begin_shutdown(started + grace * 3 / 4, exit_by);
    while running.running_shards() > 0 && Instant::now() < deadline {
        if let Err(code) =
            exit_on_second_signal(signals, STOP_POLL.min(deadline.saturating_duration_since(Instant::now())))
        {
            return code;
        }
    }
    let unfinished = running.running_shards();
    if unfinished > 0 {
        log!(
            Level::Warn,
            "the shutdown grace ({} ms) ran out with {unfinished} shards still stopping; exiting without them (a durable \
             message is receipted only once synced, so none receipted is lost)",
            grace.as_millis()
        );
        // Exits without joining the shards (a clean ExitCode return would wait for them).
        std::process::exit(0);
    }
    running.join();
    log!(Level::Info, "stopped");
    ExitCode::SUCCESS
}

/// How often the stopping main thread looks at the shards and for a second signal.
const STOP_POLL: Duration = Duration::from_millis(20);

/// Waits up to `timeout` for a signal; a second SIGINT or SIGTERM exits the process at once
/// (status 1: the stop was cut short), others are ignored while stopping.
fn exit_on_second_signal(signals: &libc::sigset_t, timeout: Duration) -> Result<(), ExitCode> {
    match wait_for_signal(signals, Some(timeout)) {
        Some(signal @ (libc::SIGINT | libc::SIGTERM)) => {
            log!(
                Level::Warn,
                "received {} while stopping: exiting at once (status 1); connections are cut without a close frame, \
                 SENDs not receipted yet are lost to their clients (they were not receipted), receipted durable \
                 messages are safe",
                signal_name(signal)
            );
            std::process::exit(1);
        }
        Some(signal) => {
            log!(Level::Info, "ignoring {} while stopping", signal_name(signal));
            Ok(())
        }
        None => Ok(()),
    }
}

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGINT => "SIGINT".to_string(),
        libc::SIGTERM => "SIGTERM".to_string(),
        libc::SIGHUP => "SIGHUP".to_string(),
        libc::SIGUSR2 => "SIGUSR2".to_string(),
        other => format!("signal {other}"),
    }
}

/// A setting that a SIGHUP reload applies while the broker runs, by its configuration key:
/// `apply` copies it from the re-read configuration into the running one. Everything else
/// takes a restart (docs/OPERATIONS.md, "Reload" lists both).
struct Reloadable {
    key: &'static str,
    apply: fn(running: &mut Config, reread: &Config),
}

/// What a SIGHUP reloads. The logging and the summary interval apply at once; the limits go to
/// the shards (through their inboxes) and apply to sessions opened from then on; the grace and
/// drain durations apply to the next stop or drain. The TLS certificate and key files are
/// re-read as well (not their paths).
const RELOADABLE: &[Reloadable] = &[
    Reloadable { key: "log-level", apply: |running, reread| running.log_level = reread.log_level },
    Reloadable { key: "log-format", apply: |running, reread| running.log_format = reread.log_format },
    Reloadable {
        key: "summary-interval-secs",
        apply: |running, reread| running.summary_interval_secs = reread.summary_interval_secs,
    },
    Reloadable {
        key: "max-inflight-sends",
        apply: |running, reread| running.max_inflight_sends = reread.max_inflight_sends,
    },
    Reloadable {
        key: "max-subscriptions",
        apply: |running, reread| running.max_subscriptions = reread.max_subscriptions,
    },
    Reloadable { key: "max-credit", apply: |running, reread| running.max_credit = reread.max_credit },
    Reloadable {
        key: "max-outbound-bytes",
        apply: |running, reread| running.max_outbound_bytes = reread.max_outbound_bytes,
    },
    Reloadable {
        key: "shutdown-grace-ms",
        apply: |running, reread| running.shutdown_grace_ms = reread.shutdown_grace_ms,
    },
    Reloadable {
        key: "drain-duration-ms",
        apply: |running, reread| running.drain_duration_ms = reread.drain_duration_ms,
    },
];

/// SIGHUP: re-reads the configuration file (the flags given at start still override it),
/// checks all of it, and applies what can change at run time ([`RELOADABLE`]), logging one
/// line with each change; a file that is not valid changes nothing (the line says why). Then
/// the file's `[auth]` users and tokens ([`reload_credentials`]), and the TLS certificate and
/// key; open connections keep the session they have.
fn reload(
    running: &mbws::shard::Running,
    matches: &clap::ArgMatches,
    current: &mut Config,
    config_path: Option<&std::path::Path>,
    auth: &mbws::auth::Auth,
) {
    let reread = Args::from_arg_matches(matches)
        .map_err(|error| error.to_string())
        .and_then(|args| config_from(args, matches))
        .and_then(|(config, origins)| config.validate_from(&origins).map(|()| config));
    match reread {
        Err(problem) => log!(
            Level::Warn,
            "received SIGHUP: the configuration is not valid, nothing reloaded (still running with the previous \
             one): {problem}"
        ),
        Ok(reread) => {
            apply_reload(running, current, &reread);
            reload_credentials(running, config_path, auth);
        }
    }
    let Some(tls) = &running.tls else { return };
    let files = tls.files();
    match tls.reload() {
        Ok(()) => log!(
            Level::Info,
            "received SIGHUP: reloaded the TLS certificate {} and key {}; new connections get them, open ones keep \
             theirs",
            files.cert.display(),
            files.key.display()
        ),
        Err(problem) => log!(Level::Warn, "received SIGHUP: keeping the TLS certificate in use: {problem}"),
    }
}

/// Applies the reloadable changes of `reread` to `current` and to the shards, and logs them.
fn apply_reload(running: &mbws::shard::Running, current: &mut Config, reread: &Config) {
    let before = effective_keys(current);
    let after = effective_keys(reread);
    let mut changed = Vec::new();
    let mut needs_restart = Vec::new();
    for (key, old) in &before {
        let new = after.get(key).cloned().unwrap_or_default();
        // `[auth]`'s users and tokens reload through `reload_credentials`, which logs them by
        // name (never the section's text).
        if *old == new || key == "auth" {
            continue;
        }
        match RELOADABLE.iter().find(|reloadable| reloadable.key == key) {
            Some(reloadable) => {
                (reloadable.apply)(current, reread);
                changed.push(format!("{key} {old} -> {new}"));
            }
            None => needs_restart.push(format!("{key} ({old} -> {new})")),
        }
    }
    logging::set_level(current.log_level);
    logging::set_format(current.log_format);
    running.reload_limits(current.runtime_limits());
    if changed.is_empty() {
        log!(Level::Info, "received SIGHUP: the configuration is valid; no setting that reloads changed");
    } else {
        log!(
            Level::Info,
            "received SIGHUP: reloaded: {} (limits apply to sessions opened from now on)",
            changed.join(", ")
        );
    }
    if !needs_restart.is_empty() {
        log!(
            Level::Warn,
            "received SIGHUP: changed but taking a restart (still running with the old values): {}",
            needs_restart.join(", ")
        );
    }
}

/// Every key of `config` and its value as TOML text (sections as one key each), to compare two
/// configurations key by key.
fn effective_keys(config: &Config) -> std::collections::BTreeMap<String, String> {
    let text = ConfigFile::effective(config).to_toml();
    let table: toml::Table = text.parse().expect("the effective configuration reads back as TOML");
    table.into_iter().map(|(key, value)| (key, value.to_string())).collect()
}

/// SIGHUP: re-reads `[auth]`'s users and tokens from the configuration file and logs what
/// changed (names only, never a secret). Live sessions of a changed user get its new
/// permissions, those of a removed user are closed (4401), as for the admin API's changes
/// (docs/OPERATIONS.md, "Users"); a file that does not load changes nothing.
fn reload_credentials(running: &mbws::shard::Running, config_path: Option<&std::path::Path>, auth: &mbws::auth::Auth) {
    let Some(path) = config_path else { return };
    let section = match ConfigFile::read(path) {
        Ok(file) => file.auth.unwrap_or_default(),
        Err(problem) => {
            log!(Level::Warn, "received SIGHUP: keeping the users and tokens in use: {problem}");
            return;
        }
    };
    match auth.reload_file(&section) {
        Ok((changes, tokens)) => {
            let (updated, closed) = mbws::admin::apply_user_changes(&running.inspector(), &changes);
            log!(
                Level::Info,
                "received SIGHUP: reloaded the users and tokens of {}", path.display();
                users_added = changes.added.join(","),
                users_removed = changes.removed.join(","),
                users_changed = changes.changed.join(","),
                tokens = tokens,
                sessions_updated = updated,
                sessions_closed = closed,
            );
        }
        Err(problem) => {
            log!(Level::Warn, "received SIGHUP: keeping the users and tokens in use: {}: {problem}", path.display())
        }
    }
}

/// Re-applies what the admin API changed (`admin::state`): its users to the `[auth]` users,
/// its declared addresses to the shards' tables.
fn restore_admin_state(config: &mut Config) -> Result<(), String> {
    let state = mbws::admin::state::load(&config.data_dir)?;
    let path = mbws::admin::state::path(&config.data_dir);
    config.auth.restore_api_users(&state.users).map_err(|problem| format!("{}: {problem}", path.display()))?;
    for (name, stored) in &state.addresses {
        let settings = stored.settings().map_err(|problem| format!("{}: {name:?}: {problem}", path.display()))?;
        config.declared_addresses.push((bytes::Bytes::from(name.clone()), settings));
    }
    if !state.addresses.is_empty() || !state.users.users.is_empty() || !state.users.deleted_users.is_empty() {
        log!(
            Level::Info,
            "re-applied what the admin API changed, from {}", path.display();
            declared_addresses = state.addresses.len(),
            users = state.users.users.len(),
            deleted_users = state.users.deleted_users.len(),
        );
    }
    Ok(())
}

/// The origins of the broker's own pages (`/console`): web pages there may call the admin API.
fn broker_origins(local: std::net::SocketAddr, tls: bool) -> Vec<String> {
    let scheme = if tls { "https" } else { "http" };
    let mut origins = vec![format!("{scheme}://{local}")];
    if local.ip().is_loopback() {
        origins.push(format!("{scheme}://localhost:{}", local.port()));
    }
    origins
}

/// Warns when the broker can be reached from other machines without the protections a
/// network exposure calls for (docs/SECURITY.md).
fn warn_about_exposure(config: &Config) {
    if config.listen.ip().is_loopback() {
        return;
    }
    if config.allow_anonymous {
        log!(
            Level::Warn,
            "listening on {} beyond loopback with anonymous sessions allowed (--allow-anonymous-remote): anyone who \
             can reach the port can send to and consume from {}; configure users or tokens in [auth] \
             (docs/SECURITY.md)",
            config.listen,
            if config.auth.section.anonymous.is_some() { "what [auth.anonymous] allows" } else { "every address" }
        );
    }
    if config.allowed_origins.is_empty() {
        log!(
            Level::Warn,
            "listening on {} beyond loopback without --allowed-origin: a web page on any site that a browser on the \
             network opens can connect to this broker (cross-site WebSocket hijacking); list the origins of your web \
             applications with --allowed-origin (docs/SECURITY.md)",
            config.listen
        );
    }
}

/// The broker's settings: [`Config::default`], then the configuration file's keys (if
/// `--config`), then the flags given on the command line, each overriding what came before.
/// Every flag's default is read from `Config::default()` too, so a flag left out and a
/// setting without a flag agree. The [`Origins`] say which values came from the file.
fn config_from(args: Args, matches: &clap::ArgMatches) -> Result<(Config, Origins), String> {
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut config = Config::default();
    let mut origins = Origins::default();
    let mut file = ConfigFile::default();
    if let Some(path) = &args.config {
        file = ConfigFile::read(path)?;
        origins = Origins::from_file(path.clone(), file.keys());
        file.apply(&mut config, &origins)?;
    }
    for id in matches.ids().map(clap::Id::as_str).filter(|id| given(id)) {
        origins.overridden_by_flag(&format!("--{}", id.replace('_', "-")));
    }
    if given("durable_addresses") {
        origins.overridden_by_flag("--durable-address");
    }
    if matches.value_source("admin_token") == Some(ValueSource::EnvVariable) {
        origins.overridden_by_flag("--admin-token");
    }
    if matches.value_source("cluster_passcode") == Some(ValueSource::EnvVariable) {
        origins.overridden_by_flag("--cluster-passcode");
    }
    if given("listen") {
        config.listen = args.listen;
    }
    if let Some(shards) = args.shards {
        config.shards = shards;
    }
    if args.no_pin {
        config.pin_threads = false;
    }
    // A default the user did not set follows the setting it must agree with.
    if given("max_frame_bytes") {
        config.max_frame_bytes = args.max_frame_bytes;
    }
    if given("max_message_bytes") {
        config.max_message_bytes = args.max_message_bytes;
    }
    if !given("max_frame_bytes") && file.max_frame_bytes.is_none() {
        config.max_frame_bytes = Config::default().max_frame_bytes.min(config.max_message_bytes);
    }
    macro_rules! flags_override {
        ($($field:ident),+ $(,)?) => {
            $(if given(stringify!($field)) {
                config.$field = args.$field;
            })+
        };
    }
    flags_override!(
        max_queued_messages,
        max_inflight_sends,
        max_outbound_bytes,
        max_subscriptions,
        max_credit,
        max_headers,
        max_header_bytes,
        max_heartbeat_ms,
        max_connections,
        max_connections_per_ip,
        max_sessions,
        max_addresses,
        session_expiry_ms,
        ack_timeout_ms,
        max_deliveries,
        max_queued_bytes,
        memory_budget_bytes,
        data_dir,
        durable_addresses,
        log_batch_bytes,
        log_segment_bytes,
        log_recovery,
        tls_records,
        log_level,
        log_format,
        summary_interval_secs,
        shutdown_grace_ms,
        drain_duration_ms,
        cluster_lease_ms,
    );
    if let Some(cluster) = args.cluster {
        config.cluster = Some(cluster);
    }
    if given("etcd") {
        config.etcd_endpoints = args.etcd;
    }
    if let Some(node) = args.node_name {
        config.node_name = Some(node);
    }
    if let Some(url) = args.advertise_url {
        config.advertise_url = Some(url);
    }
    if let Some(login) = args.cluster_login {
        config.cluster_login = Some(login);
    }
    if let Some(passcode) = args.cluster_passcode {
        config.cluster_passcode = Some(Secret::new(passcode));
    }
    if let Some(ca_file) = args.cluster_ca_file {
        config.cluster_ca_file = Some(ca_file);
    }
    if given("handshake_timeout_ms") {
        config.handshake_timeout = Duration::from_millis(args.handshake_timeout_ms);
    }
    if given("open_timeout_ms") {
        config.open_timeout = Duration::from_millis(args.open_timeout_ms);
    }
    if given("log_batch_delay_us") {
        config.log_batch_delay = Duration::from_micros(args.log_batch_delay_us);
    }
    // clap makes each of the two require the other.
    if let Some((cert, key)) = args.tls_cert.zip(args.tls_key) {
        config.tls = Some(mbws::tls::TlsFiles { cert, key });
    }
    if given("allowed_origins") {
        config.allowed_origins = args.allowed_origins;
    }
    if given("admin_listen") {
        config.admin_listen = args.admin_listen.0;
    }
    if let Some(token) = args.admin_token {
        config.admin_token = Some(Secret::new(token));
    }
    if args.allow_anonymous {
        config.allow_anonymous = true;
    }
    if args.allow_anonymous_remote {
        config.allow_anonymous_remote = true;
    }
    Ok((config, origins))
}

/// A panic anywhere (a shard thread included) is a broken invariant: log it with its thread
/// and location, then abort the whole process. A broker with a dead shard would drop every
/// message for the addresses and connections that shard owns while looking alive.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let location = info.location().map_or_else(|| "unknown".to_string(), ToString::to_string);
        log!(
            Level::Error,
            "thread {} panicked at {location}: {message}; aborting the whole broker (a bug: please report it \
             with this line)",
            thread.name().unwrap_or("unnamed")
        );
        std::process::abort();
    }));
}

/// Raises the soft open-file limit to the hard limit (each connection is a descriptor) and
/// logs the figure.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the live struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log!(Level::Warn, "cannot read the open-file limit: {}", std::io::Error::last_os_error());
        return;
    }
    let before = limit.rlim_cur;
    // An unlimited hard limit is not a valid soft limit for descriptors: the kernel caps it.
    let target = if limit.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|text| text.trim().parse().ok()).unwrap_or(before)
    } else {
        limit.rlim_max
    };
    if target > before {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the live struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log!(Level::Info, "open-file limit {target} (raised from {before}, the hard limit)");
            return;
        }
        log!(
            Level::Warn,
            "open-file limit {before}: raising it to {target} failed: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    log!(Level::Info, "open-file limit {before} (the hard limit; each connection takes one)");
}

/// SIGINT and SIGTERM stop the broker (a second one exits at once); SIGHUP (what a service
/// manager's reload or a closed terminal sends) reloads what can be reloaded; SIGUSR2 starts a
/// drain (lame duck).
fn block_handled_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is an array of integers, for which all-zero bytes are valid; sigemptyset
    // below makes it the empty set whatever its representation.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigemptyset writes the live `set` it is given.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR2] {
        // SAFETY: sigaddset writes the live, initialized `set`; each signal number is valid.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    // SAFETY: `set` is a live, initialized sigset_t; a null old-mask pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits for one of the blocked signals in `set`, for at most `timeout` (`None`: for ever).
/// `None` when the time ran out (or the wait was interrupted) without a signal.
fn wait_for_signal(set: &libc::sigset_t, timeout: Option<Duration>) -> Option<i32> {
    let Some(timeout) = timeout else {
        let mut signal: libc::c_int = 0;
        // SAFETY: `set` holds blocked signals; `signal` is a live c_int.
        unsafe { libc::sigwait(set, &mut signal) };
        return Some(signal);
    };
    let timeout = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as _ };
    // SAFETY: `set` holds blocked signals and `timeout` is a live timespec; a null siginfo
    // pointer is allowed.
    let signal = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &timeout) };
    (signal > 0).then_some(signal)
}

/// How long the summary waits for the shards' reports (each answers between two rounds of
/// work, well within this unless a shard is stuck, which the summary then shows).
const SUMMARY_REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Logs one summary line at info: message rates since the last one, sessions, queue depth.
fn log_summary(summary: &mut Summary, running: &mbws::shard::Running, shards: usize) {
    let reports = running.report(SUMMARY_REPORT_TIMEOUT);
    let line = summary.next(&reports, shards, Instant::now());
    if line.shards_reporting < line.shards {
        log!(
            Level::Warn,
            "summary: only {} of {} shards answered within {} ms; the figures below leave the others out",
            line.shards_reporting,
            line.shards,
            SUMMARY_REPORT_TIMEOUT.as_millis()
        );
    }
    log!(
        Level::Info,
        "summary";
        received_per_sec = line.received_per_sec,
        delivered_per_sec = line.delivered_per_sec,
        sessions = line.sessions,
        queued_messages = line.queued_messages,
        queued_bytes = line.queued_bytes,
        received_total = line.messages_received,
        delivered_total = line.messages_delivered,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One source for every default: a broker started without flags runs with exactly
    /// `Config::default()`, so no flag carries a default of its own that could drift from it.
    #[test]
    fn every_flag_defaults_to_config_default() {
        let matches = command().try_get_matches_from(["mbws-broker"]).unwrap();
        let args = Args::from_arg_matches(&matches).unwrap();
        let (config, _) = config_from(args, &matches).unwrap();
        assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
    }

    /// Flags that are not settings of the broker (they say what to do with them): not keys of
    /// the configuration file.
    const COMMAND_FLAGS: &[&str] = &["config", "check_config", "print_config"];

    /// Every flag that is a setting is a key of the configuration file, spelled as the flag,
    /// and every key of the file is a flag: the two cannot drift apart.
    #[test]
    fn every_flag_is_a_key_of_the_configuration_file() {
        let mut flags: Vec<String> = command()
            .get_arguments()
            .filter(|arg| !COMMAND_FLAGS.contains(&arg.get_id().as_str()))
            .filter_map(|arg| arg.get_long().map(str::to_string))
            .filter(|long| long != "help" && long != "version")
            .collect();
        let mut keys = ConfigFile::every_key();
        flags.sort();
        keys.sort();
        assert_eq!(flags, keys, "the flags (left) and the configuration file's keys (right) differ");
    }
}
