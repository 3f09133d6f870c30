//! Broker configuration: every bound the broker enforces, with its unit in its name.
//!
//! `Config` is built once by `main` (from the configuration file, then the flags, which
//! override it) and shared read-only by every shard. [`Config::default`] is the one source of
//! defaults and [`FLAG_RANGES`] the one source of valid ranges, for the flags and the file's
//! keys alike ([`mod@file`]).

pub mod file;

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use file::Secret;

use crate::logging::{Level, LogFormat};
use crate::mbws::{CodecLimits, Limits};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7447";

/// Where the admin API (health, metrics, addresses, sessions) listens by default: loopback
/// only, so no token is needed until an operator opens it wider.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:7448";

/// Shortest `--admin-token` accepted: a bearer token is the only thing between the network and
/// the admin API, so a short guessable one is refused.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Number of shard threads; each owns one core, its connections and its addresses.
    pub shards: usize,
    /// Pin each shard thread to a core (shard i to the i-th core the process may use).
    pub pin_threads: bool,
    /// Largest HTTP upgrade request (request line and headers).
    pub max_handshake_bytes: usize,
    /// A connection that has not completed its WebSocket upgrade by then is closed.
    pub handshake_timeout: Duration,
    /// A WebSocket connection that has not sent OPEN by then is closed (ERROR 4408).
    pub open_timeout: Duration,
    /// Largest single WebSocket frame.
    pub max_frame_bytes: usize,
    /// Largest WebSocket message (after reassembly); one MBWS frame.
    pub max_message_bytes: usize,
    /// Bytes queued for writing to one connection beyond which the broker stops reading from it
    /// and stops handing it auto-ack deliveries.
    pub max_outbound_bytes: usize,
    /// Room of one read on a busy connection (a read that fills its room is followed by one
    /// with this much room). A caught-up connection's buffer shrinks to what its last read
    /// needed, at least `conn::read_buffer::IDLE_READ_BUFFER_BYTES`; a partly received frame
    /// grows it up to `max_message_bytes` plus a header.
    pub read_buffer_bytes: usize,
    pub max_address_bytes: usize,
    /// Application headers on one message, and their bytes with the properties (fatal 4413).
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// TCP connections open at once in the whole broker, and from one source IP address
    /// (`shard::admission`): beyond, an upgrade is answered 503.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Sessions in the whole broker, detached ones (kept for resume) included: beyond, OPEN
    /// gets fatal 4503.
    pub max_sessions: usize,
    /// Addresses in the whole broker (split evenly over the shards): a SEND or SUBSCRIBE that
    /// would create one more gets non-fatal 4429.
    pub max_addresses: usize,
    pub max_credit: u32,
    pub max_subscriptions: u32,
    pub max_inflight_sends: u32,
    /// Messages waiting in one address queue (and in one multicast subscriber's backlog).
    pub max_queued_messages: u32,
    /// Longest heartbeat interval the broker agrees to; also its default.
    pub max_heartbeat_ms: u32,
    /// How long a disconnected MBWS session is kept for resume (announced in OPENED).
    pub session_expiry_ms: u32,
    /// A client-ack delivery not acknowledged within this time is redelivered; 0 for never.
    pub ack_timeout_ms: u64,
    /// Deliveries of one message before it goes to `DLQ.<address>`; 0 for no limit.
    pub max_deliveries: u32,
    /// Body bytes waiting in one address queue.
    pub max_queued_bytes: usize,
    /// Body bytes waiting in all queues of the broker (split evenly over the shards).
    pub memory_budget_bytes: usize,
    /// Where each shard keeps its durable log (`<data_dir>/shard-<N>/`).
    pub data_dir: PathBuf,
    /// Durable log segment size, group-commit batch bound and window, recovery mode.
    pub log_segment_bytes: u64,
    pub log_batch_bytes: usize,
    pub log_batch_delay: Duration,
    pub log_recovery: crate::store::RecoveryMode,
    /// Addresses whose every message is durable: exact names, or prefixes ending in `*`.
    pub durable_addresses: Vec<String>,
    /// Credit a SUBSCRIBE with credit 0 gets (capped at `max_credit`).
    pub default_credit: u32,
    /// The most detailed level logged, and how each line is written (text or JSON).
    pub log_level: Level,
    pub log_format: LogFormat,
    /// Seconds between two one-line summaries at info level (0: none).
    pub summary_interval_secs: u64,
    /// How long a stop (SIGTERM, SIGINT, the end of a drain) may take: in-flight SENDs answered,
    /// connections closed with 1001, the durable log synced; what is left then is abandoned.
    pub shutdown_grace_ms: u64,
    /// How long a drain (`POST /api/drain`, SIGUSR2) spreads the closing of the connections
    /// over before the broker stops.
    pub drain_duration_ms: u64,
    /// Serve `wss://` with this certificate and key (docs/SECURITY.md); `None`: plain `ws://`.
    pub tls: Option<crate::tls::TlsFiles>,
    /// The record layer of `wss://` sessions after their handshake (`--tls-records`).
    pub tls_records: crate::tls::TlsRecords,
    /// Origins whose pages may open a WebSocket here ([`check_origin`]); empty: any.
    pub allowed_origins: Vec<String>,
    /// Where the admin API listens (`None`: `--admin-listen off`), and the bearer token it
    /// requires (required when it listens beyond loopback).
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<Secret>,
    /// Sessions without credentials are let in (`--allow-anonymous`; by default when no user
    /// or token is configured).
    pub allow_anonymous: bool,
    /// ... also when listening beyond loopback (`--allow-anonymous-remote`); without it such a
    /// broker refuses to start.
    pub allow_anonymous_remote: bool,
    /// Users, tokens and permissions (the `[auth]` section; docs/SECURITY.md).
    pub auth: std::sync::Arc<crate::auth::Auth>,
    /// The cluster this node joins (`--cluster`; docs/CLUSTER.md), `None` for a broker on its
    /// own; etcd's client URLs, this node's name and URL (defaults: `crate::cluster`), and the
    /// lease's time to live.
    pub cluster: Option<String>,
    pub etcd_endpoints: Vec<String>,
    pub node_name: Option<String>,
    pub advertise_url: Option<String>,
    pub cluster_lease_ms: u64,
    /// The credentials (`--cluster-login`, `--cluster-passcode`: a user and its password, or
    /// an empty login and a bearer token) and the CA file (`--cluster-ca-file`, for `wss://`
    /// nodes) of the sessions this node's forwarders open to the other nodes.
    pub cluster_login: Option<String>,
    pub cluster_passcode: Option<Secret>,
    pub cluster_ca_file: Option<PathBuf>,
    /// Addresses declared through the admin API, re-applied at start from the data directory
    /// (`admin::state`); not a flag.
    pub declared_addresses: Vec<(bytes::Bytes, crate::broker::address::AddressSettings)>,
    /// Links to other brokers (the `[[link]]` sections; [`crate::link`]); not a flag.
    pub links: Vec<crate::link::LinkSpec>,
    // No bound on the cross-shard mailboxes: they are unbounded on purpose, and what may wait
    // in them is bounded at its sources (see the module docs of `shard::mailbox`).
}

/// The one source of every default limit: `mbws-broker`'s flags take their defaults from here
/// (`Config::default()`), and so do the shard's session and address settings
/// ([`AddressLimits::default`](crate::broker::address::AddressLimits)) and the tests.
impl Default for Config {
    fn default() -> Self {
        let codec = CodecLimits::default();
        let log = crate::store::LogConfig::new("mbws-data");
        Config {
            listen: DEFAULT_LISTEN.parse().expect("default listen address parses"),
            shards: available_cores(),
            pin_threads: true,
            max_handshake_bytes: 8 * 1024,
            handshake_timeout: Duration::from_secs(10),
            open_timeout: Duration::from_secs(10),
            max_frame_bytes: 1024 * 1024,
            max_message_bytes: 1024 * 1024,
            max_outbound_bytes: 4 * 1024 * 1024,
            read_buffer_bytes: 64 * 1024,
            max_address_bytes: codec.max_address_bytes,
            max_headers: codec.max_headers,
            max_header_bytes: codec.max_header_bytes,
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            max_sessions: 100_000,
            max_addresses: 1_000_000,
            max_credit: 65_535,
            max_subscriptions: 1024,
            max_inflight_sends: 4096,
            max_queued_messages: 100_000,
            max_heartbeat_ms: 60_000,
            session_expiry_ms: 30_000,
            ack_timeout_ms: 0,
            max_deliveries: 0,
            max_queued_bytes: 256 * 1024 * 1024,
            memory_budget_bytes: 2 * 1024 * 1024 * 1024,
            data_dir: log.dir,
            log_segment_bytes: log.segment_bytes,
            log_batch_bytes: log.max_batch_bytes,
            log_batch_delay: log.max_batch_delay,
            log_recovery: log.recovery,
            durable_addresses: Vec::new(),
            default_credit: crate::mbws::DEFAULT_CREDIT,
            log_level: Level::Info,
            log_format: LogFormat::Text,
            summary_interval_secs: 60,
            shutdown_grace_ms: 10_000,
            drain_duration_ms: 30_000,
            tls: None,
            tls_records: crate::tls::TlsRecords::InPlace,
            allowed_origins: Vec::new(),
            admin_listen: Some(DEFAULT_ADMIN_LISTEN.parse().expect("default admin address parses")),
            admin_token: None,
            allow_anonymous: true,
            allow_anonymous_remote: false,
            auth: Default::default(),
            declared_addresses: Vec::new(),
            cluster: None,
            etcd_endpoints: Vec::new(),
            node_name: None,
            advertise_url: None,
            cluster_lease_ms: 5000,
            cluster_login: None,
            cluster_passcode: None,
            cluster_ca_file: None,
            links: Vec::new(),
        }
    }
}

/// The limits a SIGHUP reload changes while the broker runs (docs/OPERATIONS.md, "Reload"):
/// shards take them through their inbox, and sessions opened from then on get them. An open
/// session keeps the limits it was opened with, which its OPENED announced to its client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeLimits {
    pub max_inflight_sends: u32,
    pub max_subscriptions: u32,
    pub max_credit: u32,
    pub max_outbound_bytes: usize,
}

impl Config {
    /// The limits of this configuration that reload at run time.
    pub fn runtime_limits(&self) -> RuntimeLimits {
        RuntimeLimits {
            max_inflight_sends: self.max_inflight_sends,
            max_subscriptions: self.max_subscriptions,
            max_credit: self.max_credit,
            max_outbound_bytes: self.max_outbound_bytes,
        }
    }

    /// The durable log settings.
    pub fn log_config(&self) -> crate::store::LogConfig {
        crate::store::LogConfig {
            dir: self.data_dir.clone(),
            segment_bytes: self.log_segment_bytes,
            max_batch_bytes: self.log_batch_bytes,
            max_batch_delay: self.log_batch_delay,
            recovery: self.log_recovery,
        }
    }

    /// The limits announced to clients in OPENED.
    pub fn limits(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_message_bytes.min(u32::MAX as usize) as u32,
            max_address_bytes: self.max_address_bytes.min(u16::MAX as usize) as u16,
            max_headers: self.max_headers.min(u16::MAX as usize) as u16,
            max_header_bytes: self.max_header_bytes.min(u32::MAX as usize) as u32,
            max_credit: self.max_credit,
            max_subscriptions: self.max_subscriptions,
            max_inflight_sends: self.max_inflight_sends,
            max_queued_messages: self.max_queued_messages,
        }
    }

    pub fn codec_limits(&self) -> CodecLimits {
        CodecLimits {
            max_address_bytes: self.max_address_bytes,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
        }
    }

    /// Checks every flag against its range ([`FLAG_RANGES`]) and the relations between them;
    /// the message names the flag, the value, the range and what to do. Settings are named as
    /// flags (`--shards 0`); [`Config::validate_from`] names those from a configuration file as
    /// its keys.
    pub fn validate(&self) -> Result<(), String> {
        self.validate_from(&Origins::default())
    }

    /// [`Config::validate`], naming each setting as the user gave it ([`Origins`]).
    pub fn validate_from(&self, origins: &Origins) -> Result<(), String> {
        for range in FLAG_RANGES {
            range.check((range.value)(self), origins)?;
        }
        let setting = |flag: &str, value: &dyn Display| origins.describe(flag, value);
        if self.max_frame_bytes > self.max_message_bytes {
            return Err(format!(
                "{} exceeds {}: a frame cannot be larger than a message; \
                 lower --max-frame-bytes or raise --max-message-bytes",
                setting("--max-frame-bytes", &self.max_frame_bytes),
                setting("--max-message-bytes", &self.max_message_bytes)
            ));
        }
        if self.max_queued_bytes < self.max_message_bytes {
            return Err(format!(
                "{} is below {}: a message of the largest size could \
                 never be queued; raise --max-queued-bytes or lower --max-message-bytes",
                setting("--max-queued-bytes", &self.max_queued_bytes),
                setting("--max-message-bytes", &self.max_message_bytes)
            ));
        }
        let budget_per_shard = self.memory_budget_bytes / self.shards;
        if budget_per_shard < self.max_message_bytes {
            return Err(format!(
                "{} split over {} shards leaves {budget_per_shard} bytes per shard, below \
                 {}: a message of the largest size could never be queued; raise \
                 --memory-budget-bytes, or lower --shards or --max-message-bytes",
                setting("--memory-budget-bytes", &self.memory_budget_bytes),
                self.shards,
                setting("--max-message-bytes", &self.max_message_bytes)
            ));
        }
        if self.max_addresses < self.shards {
            return Err(format!(
                "{} is below {}: each shard holds its share of the addresses, at least one; raise \
                 --max-addresses or lower --shards",
                setting("--max-addresses", &self.max_addresses),
                setting("--shards", &self.shards)
            ));
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(format!(
                "{} exceeds {}: one address could never have that many; lower --max-connections-per-ip or raise \
                 --max-connections",
                setting("--max-connections-per-ip", &self.max_connections_per_ip),
                setting("--max-connections", &self.max_connections)
            ));
        }
        for pattern in &self.durable_addresses {
            let name = pattern.strip_suffix('*').unwrap_or(pattern);
            if name.contains('*') || pattern.is_empty() || pattern.len() > self.max_address_bytes {
                return Err(format!(
                    "{} is not an address name: use an exact name of 1 to {} bytes, \
                     or a prefix followed by one * at the end (orders.*)",
                    setting("--durable-address", &format_args!("\"{pattern}\"")),
                    self.max_address_bytes
                ));
            }
        }
        crate::cluster::validate(self)?;
        self.validate_admin(origins)?;
        if self.allow_anonymous && !self.listen.ip().is_loopback() && !self.allow_anonymous_remote {
            return Err(format!(
                "anonymous sessions are allowed ({}) and --listen {} is beyond loopback: anyone who can reach the \
                 port could send and consume every address. Give --allow-anonymous-remote if that is meant, or \
                 configure users or tokens in the [auth] section of --config (docs/SECURITY.md)",
                if self.auth.has_credentials() {
                    "--allow-anonymous"
                } else {
                    "the default when no user or token is configured"
                },
                self.listen
            ));
        }
        // Settings that are not flags (yet): named as the configuration keys they will become.
        if self.max_address_bytes == 0 || self.max_address_bytes > crate::mbws::binary::MAX_STR8_BYTES {
            return Err(format!(
                "max-address-bytes {} is out of range: use 1..={}",
                self.max_address_bytes,
                crate::mbws::binary::MAX_STR8_BYTES
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The admin API's address and token: a token is required beyond loopback, and a token
    /// given must be one an HTTP header can carry and long enough not to be guessed.
    fn validate_admin(&self, origins: &Origins) -> Result<(), String> {
        if let Some(token) = &self.admin_token {
            let token = token.expose();
            if token == crate::config::file::REDACTED {
                return Err(format!(
                    "{} is what --print-config prints in place of a token: put the token itself there",
                    origins.describe("--admin-token", &format_args!("\"{token}\""))
                ));
            }
            if token.len() < MIN_ADMIN_TOKEN_BYTES || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
                return Err(format!(
                    "{} is not a usable token: use at least {MIN_ADMIN_TOKEN_BYTES} printable ASCII characters \
                     without spaces (for example the output of `openssl rand -hex 24`)",
                    origins.describe("--admin-token", &crate::config::file::REDACTED)
                ));
            }
        }
        if let Some(admin) = self.admin_listen {
            if !admin.ip().is_loopback() && self.admin_token.is_none() {
                return Err(format!(
                    "{} is beyond loopback, and the admin API would then be open to anyone who can reach it: \
                     give --admin-token (or admin-token in the configuration file), or listen on 127.0.0.1",
                    origins.describe("--admin-listen", &admin)
                ));
            }
            if admin == self.listen && admin.port() != 0 {
                return Err(format!(
                    "{} is the address the broker listens on (--listen): give the admin API an address of its own",
                    origins.describe("--admin-listen", &admin)
                ));
            }
        }
        Ok(())
    }
}

/// `--admin-listen`: an address as for `--listen`, or `off` for no admin API.
pub fn parse_admin_listen(text: &str) -> Result<AdminListen, String> {
    if text == "off" {
        return Ok(AdminListen(None));
    }
    parse_listen(text).map(|addr| AdminListen(Some(addr))).map_err(|reason| format!("{reason}, or off"))
}

/// The value of `--admin-listen`: an address, or `None` for `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl Display for AdminListen {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => write!(formatter, "{addr}"),
            None => formatter.write_str("off"),
        }
    }
}

/// Where each setting came from, so that an error names it as the user wrote it: `--shards 0`
/// for a flag (and for a default), `shards = 0 (in /etc/mbws/broker.toml)` for a key of the
/// configuration file that no flag overrode. Keys are the flags without their `--`.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    /// The configuration file, and the keys whose values are still the file's.
    file: Option<PathBuf>,
    keys_from_file: Vec<String>,
}

impl Origins {
    /// Settings from `file`: `keys` are the ones it set (flags may override some later).
    pub fn from_file(file: PathBuf, keys: Vec<String>) -> Origins {
        Origins { file: Some(file), keys_from_file: keys }
    }

    /// The flag `--name` was given: its value is no longer the file's.
    pub fn overridden_by_flag(&mut self, flag: &str) {
        let key = flag.trim_start_matches("--");
        self.keys_from_file.retain(|from_file| from_file != key);
    }

    /// The configuration file, if one was read.
    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    /// `--shards 0`, or `shards = 0 (in broker.toml)` when the value came from the file.
    pub fn describe(&self, flag: &str, value: &dyn Display) -> String {
        let key = flag.trim_start_matches("--");
        match &self.file {
            Some(file) if self.keys_from_file.iter().any(|from_file| from_file == key) => {
                format!("{key} = {value} (in {})", file.display())
            }
            _ => format!("{flag} {value}"),
        }
    }
}

/// Headers dead-lettering adds to a message (`x-original-address`, `x-dead-letter-reason`,
/// `broker::address`): [`MAX_HEADERS`] leaves room for them.
pub const DEAD_LETTER_HEADER_COUNT: usize = 2;

/// Most application headers a client may put on one message: what the binary binding can
/// carry ([`MAX_HEADER_COUNT`](crate::mbws::binary::MAX_HEADER_COUNT)) less the headers
/// dead-lettering adds, so a dead-lettered message can always be encoded.
pub const MAX_HEADERS: usize = crate::mbws::binary::MAX_HEADER_COUNT - DEAD_LETTER_HEADER_COUNT;

/// One flag's valid values: the one source for the check at start ([`Config::validate`]), the
/// range in the flag's `--help` text and the README's flag table (a test compares them).
pub struct FlagRange {
    /// The flag as typed, `--max-frame-bytes`.
    pub flag: &'static str,
    pub min: u64,
    pub max: u64,
    /// What the value counts (bytes, ms, ...), for the error message.
    pub meaning: &'static str,
    /// The flag's value in a `Config`, in the flag's unit.
    pub value: fn(&Config) -> u64,
}

impl FlagRange {
    /// `1024..=67108864`.
    pub fn range_text(&self) -> String {
        format!("{}..={}", self.min, self.max)
    }

    /// The one range check, for a flag and for a key of the configuration file: the message
    /// names the setting as the user gave it, the value, the range and what it counts.
    pub fn check(&self, value: u64, origins: &Origins) -> Result<(), String> {
        if (self.min..=self.max).contains(&value) {
            return Ok(());
        }
        Err(format!(
            "{} is out of range: use {} ({})",
            origins.describe(self.flag, &value),
            self.range_text(),
            self.meaning
        ))
    }
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const TIB: u64 = 1024 * GIB;
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Largest `--max-message-bytes`: a durable message of this size still fits one log record
/// ([`MAX_RECORD_BYTES`](crate::store::MAX_RECORD_BYTES)) with its address and headers.
pub const MAX_MESSAGE_BYTES: u64 = 64 * MIB;

/// Every numeric flag of `mbws-broker` with its valid range, checked in this order: a flag
/// whose default follows another's value (`--max-frame-bytes` follows `--max-message-bytes`)
/// comes after it, so an error names the flag the user gave.
pub const FLAG_RANGES: &[FlagRange] = &[
    FlagRange { flag: "--shards", min: 1, max: 1024, meaning: "shard threads", value: |c| c.shards as u64 },
    FlagRange {
        flag: "--max-message-bytes",
        min: KIB,
        max: MAX_MESSAGE_BYTES,
        meaning: "bytes",
        value: |c| c.max_message_bytes as u64,
    },
    FlagRange {
        flag: "--max-frame-bytes",
        min: KIB,
        max: MAX_MESSAGE_BYTES,
        meaning: "bytes, at most --max-message-bytes",
        value: |c| c.max_frame_bytes as u64,
    },
    FlagRange {
        flag: "--max-queued-messages",
        min: 1,
        max: 100_000_000,
        meaning: "messages per address",
        value: |c| u64::from(c.max_queued_messages),
    },
    FlagRange {
        flag: "--max-queued-bytes",
        min: KIB,
        max: TIB,
        meaning: "bytes per address, at least --max-message-bytes",
        value: |c| c.max_queued_bytes as u64,
    },
    FlagRange {
        flag: "--memory-budget-bytes",
        min: KIB,
        max: TIB,
        meaning: "bytes, at least --max-message-bytes per shard",
        value: |c| c.memory_budget_bytes as u64,
    },
    FlagRange {
        flag: "--max-inflight-sends",
        min: 1,
        max: 1_000_000,
        meaning: "unanswered SENDs per session",
        value: |c| u64::from(c.max_inflight_sends),
    },
    FlagRange {
        flag: "--max-outbound-bytes",
        min: 4 * KIB,
        max: GIB,
        meaning: "bytes per connection",
        value: |c| c.max_outbound_bytes as u64,
    },
    FlagRange {
        flag: "--max-subscriptions",
        min: 1,
        max: 1_000_000,
        meaning: "subscriptions per session",
        value: |c| u64::from(c.max_subscriptions),
    },
    FlagRange {
        flag: "--max-headers",
        min: 0,
        max: MAX_HEADERS as u64,
        meaning: "application headers per message: the binary binding carries 255, dead-lettering adds 2",
        value: |c| c.max_headers as u64,
    },
    FlagRange {
        flag: "--max-header-bytes",
        min: 256,
        max: 16 * MIB,
        meaning: "bytes of properties and headers per message",
        value: |c| c.max_header_bytes as u64,
    },
    FlagRange {
        flag: "--max-heartbeat-ms",
        min: 1000,
        max: DAY_MS / 24,
        meaning: "milliseconds, the longest heartbeat interval agreed",
        value: |c| u64::from(c.max_heartbeat_ms),
    },
    FlagRange {
        flag: "--max-connections",
        min: 1,
        max: 10_000_000,
        meaning: "connections in the broker",
        value: |c| c.max_connections as u64,
    },
    FlagRange {
        flag: "--max-connections-per-ip",
        min: 1,
        max: 10_000_000,
        meaning: "connections from one IP address, at most --max-connections",
        value: |c| c.max_connections_per_ip as u64,
    },
    FlagRange {
        flag: "--max-sessions",
        min: 1,
        max: 10_000_000,
        meaning: "sessions in the broker, detached ones included",
        value: |c| c.max_sessions as u64,
    },
    FlagRange {
        flag: "--max-addresses",
        min: 1,
        max: 100_000_000,
        meaning: "addresses in the broker, split over the shards",
        value: |c| c.max_addresses as u64,
    },
    FlagRange {
        flag: "--max-credit",
        min: 1,
        max: 1_000_000,
        meaning: "deliveries per subscription",
        value: |c| u64::from(c.max_credit),
    },
    FlagRange {
        flag: "--session-expiry-ms",
        min: 0,
        max: DAY_MS,
        meaning: "milliseconds, 0 for no resume",
        value: |c| u64::from(c.session_expiry_ms),
    },
    FlagRange {
        flag: "--ack-timeout-ms",
        min: 0,
        max: DAY_MS,
        meaning: "milliseconds, 0 for no limit",
        value: |c| c.ack_timeout_ms,
    },
    FlagRange {
        flag: "--max-deliveries",
        min: 0,
        max: 1_000_000,
        meaning: "deliveries, 0 for no limit",
        value: |c| u64::from(c.max_deliveries),
    },
    FlagRange {
        flag: "--handshake-timeout-ms",
        min: 100,
        max: 600_000,
        meaning: "milliseconds",
        value: |c| c.handshake_timeout.as_millis() as u64,
    },
    FlagRange {
        flag: "--open-timeout-ms",
        min: 100,
        max: 600_000,
        meaning: "milliseconds",
        value: |c| c.open_timeout.as_millis() as u64,
    },
    FlagRange {
        flag: "--log-batch-delay-us",
        min: 0,
        max: crate::store::MAX_BATCH_DELAY.as_micros() as u64,
        meaning: "microseconds",
        value: |c| c.log_batch_delay.as_micros() as u64,
    },
    FlagRange {
        flag: "--log-batch-bytes",
        min: 1,
        max: crate::store::MAX_BATCH_BYTES as u64,
        meaning: "bytes",
        value: |c| c.log_batch_bytes as u64,
    },
    FlagRange {
        flag: "--log-segment-bytes",
        min: crate::store::MIN_SEGMENT_BYTES,
        max: crate::store::MAX_SEGMENT_BYTES,
        meaning: "bytes",
        value: |c| c.log_segment_bytes,
    },
    FlagRange {
        flag: "--summary-interval-secs",
        min: 0,
        max: DAY_MS / 1000,
        meaning: "seconds, 0 for no summary",
        value: |c| c.summary_interval_secs,
    },
    FlagRange {
        flag: "--shutdown-grace-ms",
        min: 100,
        max: 10 * 60 * 1000,
        meaning: "milliseconds",
        value: |c| c.shutdown_grace_ms,
    },
    FlagRange {
        flag: "--drain-duration-ms",
        min: 0,
        max: DAY_MS,
        meaning: "milliseconds",
        value: |c| c.drain_duration_ms,
    },
    FlagRange {
        flag: "--cluster-lease-ms",
        min: 2000,
        max: 10 * 60 * 1000,
        meaning: "milliseconds, rounded up to whole seconds for etcd",
        value: |c| c.cluster_lease_ms,
    },
];

/// The range of `flag` (`--shards`), for its `--help` text.
pub fn flag_range(flag: &str) -> Option<&'static FlagRange> {
    FLAG_RANGES.iter().find(|range| range.flag == flag)
}

/// Reads `--listen`: `HOST:PORT` (a host name is resolved, its first address used),
/// `IP:PORT`, `[IPv6]:PORT`, or a bare `PORT` (on 127.0.0.1).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
        let port: u16 =
            text.parse().map_err(|_| format!("port {text} is out of range: use 0..=65535 (0: any free port)"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| format!("\"{text}\" resolves to no address")),
        Err(error) => Err(format!("cannot use \"{text}\" ({error}): use HOST:PORT, IP:PORT or PORT")),
    }
}

/// Checks that `--data-dir` is a directory or can become one, before anything is written.
pub fn check_data_dir(dir: &std::path::Path) -> Result<(), String> {
    let mut existing = Some(dir);
    // The nearest part of the path that exists must be a directory.
    while let Some(path) = existing {
        match std::fs::metadata(path) {
            Ok(metadata) if metadata.is_dir() => return Ok(()),
            Ok(_) => {
                return Err(format!(
                    "--data-dir {}: {} is a file, not a directory; point --data-dir at a directory (it is \
                     created if missing), or move the file away",
                    dir.display(),
                    path.display()
                ))
            }
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                existing = path.parent().filter(|parent| !parent.as_os_str().is_empty())
            }
            Err(error) => {
                return Err(format!(
                    "--data-dir {}: cannot read {}: {error}; point --data-dir at a directory this user can use",
                    dir.display(),
                    path.display()
                ))
            }
        }
    }
    Ok(())
}

/// Cores this process may run on (its CPU affinity mask), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mbws::{Binding, Frame, Message, Properties};

    #[test]
    fn the_defaults_are_valid() {
        assert_eq!(Config::default().validate(), Ok(()));
    }

    #[test]
    fn the_shard_limits_follow_the_config_defaults() {
        let config = Config::default();
        let codec = CodecLimits::default();
        assert_eq!(config.codec_limits(), codec, "the codec limits' defaults are the broker's");
        let address = crate::broker::address::AddressLimits::default();
        assert_eq!(address.memory_budget_bytes, config.memory_budget_bytes, "one shard has the whole budget");
        assert_eq!(address.max_queued_bytes, config.max_queued_bytes);
        assert_eq!(address.max_queued_messages, config.max_queued_messages);
        assert_eq!(address.max_credit, config.max_credit);
        assert_eq!(address.max_frame_bytes, config.max_message_bytes);
        let halves = crate::broker::address::AddressLimits::from_config(&config, 2);
        assert_eq!(halves.memory_budget_bytes, config.memory_budget_bytes / 2, "each of two shards has half");
        let log = crate::store::LogConfig::new(&config.data_dir);
        assert_eq!(config.log_config(), log, "the log's defaults are the broker's");
    }

    #[test]
    fn max_headers_leaves_room_for_the_dead_letter_headers() {
        let at_limit = Config { max_headers: MAX_HEADERS, ..Config::default() };
        assert_eq!(at_limit.validate(), Ok(()));
        let over = Config { max_headers: MAX_HEADERS + 1, ..Config::default() };
        let error = over.validate().unwrap_err();
        assert!(error.contains(&format!("max-headers {} is out of range: use 0..={MAX_HEADERS}", MAX_HEADERS + 1)));
        // A message with as many headers as a client may send, plus what dead-lettering adds,
        // still encodes in the binary binding (the encoder panics beyond its u8 count).
        let header = (bytes::Bytes::from_static(b"h"), bytes::Bytes::from_static(b"v"));
        let headers = vec![header; MAX_HEADERS + DEAD_LETTER_HEADER_COUNT];
        let message = Frame::Message(Message {
            subscription_id: 1,
            delivery_seq: 1,
            message_id: 1,
            address: bytes::Bytes::from_static(b"DLQ.a"),
            redelivered: false,
            durable: false,
            properties: Properties { headers, ..Properties::default() },
            body: bytes::Bytes::new(),
        });
        assert!(!crate::mbws::encode(Binding::Binary, &message).is_empty());
    }

    #[test]
    fn relations_between_flags_name_both_flags() {
        let small_queue =
            Config { max_queued_bytes: 4096, max_message_bytes: 8192, max_frame_bytes: 8192, ..Config::default() };
        assert!(small_queue
            .validate()
            .unwrap_err()
            .starts_with("--max-queued-bytes 4096 is below --max-message-bytes 8192"));
        let small_budget = Config { memory_budget_bytes: 1024 * 1024, shards: 2, ..Config::default() };
        assert!(small_budget.validate().unwrap_err().starts_with("--memory-budget-bytes 1048576 split over 2 shards"));
        let bad_pattern = Config { durable_addresses: vec!["a*b".into()], ..Config::default() };
        assert!(bad_pattern.validate().unwrap_err().starts_with("--durable-address \"a*b\" is not an address name"));
    }

    #[test]
    fn listen_takes_ip_ports_host_names_and_bare_ports() {
        assert_eq!(parse_listen("7447"), Ok("127.0.0.1:7447".parse().unwrap()));
        assert_eq!(parse_listen("0.0.0.0:80"), Ok("0.0.0.0:80".parse().unwrap()));
        assert_eq!(parse_listen("[::1]:80"), Ok("[::1]:80".parse().unwrap()));
        assert!(parse_listen("localhost:7447").unwrap().ip().is_loopback());
        assert!(parse_listen("70000").unwrap_err().contains("out of range"));
        assert!(parse_listen("no port").unwrap_err().contains("use HOST:PORT, IP:PORT or PORT"));
    }
}

/// Checks an `--allowed-origin` value: an origin as browsers send it, `http://` or `https://`,
/// a host and an optional port, nothing after (no path, no trailing slash, no pattern). Returns
/// it in lower case, as browsers serialize it.
pub fn parse_origin(text: &str) -> Result<String, String> {
    let bad = |problem: &str| {
        Err(format!(
            "origin \"{text}\" {problem}; give it as the browser sends it in the Origin header: \
             https://HOST or https://HOST:PORT (exact origins only, no patterns)"
        ))
    };
    let lower = text.to_ascii_lowercase();
    let Some(rest) = lower.strip_prefix("https://").or_else(|| lower.strip_prefix("http://")) else {
        return bad("does not start with https:// or http://");
    };
    if rest.is_empty() {
        return bad("has no host");
    }
    if rest.contains('*') {
        return bad("is a pattern");
    }
    if rest.contains(['/', '?', '#']) {
        return bad("has a path (an origin ends after the host and port, without a slash)");
    }
    if rest.contains(|c: char| c.is_ascii_whitespace() || c.is_ascii_control() || c == '@') {
        return bad("is not a valid origin");
    }
    Ok(lower)
}

/// Whether a WebSocket upgrade with this `Origin` header may proceed: always without the
/// header (a client that is not a browser, which could send any Origin it likes anyway), and
/// with it only if it is one of `allowed` (or `allowed` is empty). `Err` is the reason for the
/// 403 answer.
pub fn check_origin(allowed: &[String], origin: Option<&str>) -> Result<(), String> {
    let Some(origin) = origin else { return Ok(()) };
    if allowed.is_empty() || allowed.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin.trim())) {
        return Ok(());
    }
    let shown: String = origin.chars().take(200).collect();
    Err(format!(
        "origin \"{shown}\" is not allowed to open a WebSocket to this broker; the broker's operator lists the \
         web applications' origins with --allowed-origin"
    ))
}

#[cfg(test)]
mod origin_tests {
    use super::*;

    #[test]
    fn origins_are_exact_and_checked_at_start() {
        assert_eq!(parse_origin("https://App.Example.com").unwrap(), "https://app.example.com");
        assert_eq!(parse_origin("http://localhost:8080").unwrap(), "http://localhost:8080");
        for (bad, says) in [
            ("app.example.com", "https://"),
            ("https://", "no host"),
            ("https://*.example.com", "pattern"),
            ("https://app.example.com/", "path"),
            ("*", "https://"),
            ("null", "https://"),
        ] {
            let error = parse_origin(bad).unwrap_err();
            assert!(error.contains(bad) && error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn an_upgrade_without_origin_passes_and_one_with_an_unlisted_origin_does_not() {
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(check_origin(&allowed, None).is_ok());
        assert!(check_origin(&allowed, Some("https://app.example.com")).is_ok());
        assert!(check_origin(&allowed, Some("https://APP.example.com")).is_ok());
        let refused = check_origin(&allowed, Some("https://evil.example")).unwrap_err();
        assert!(refused.contains("https://evil.example") && refused.contains("--allowed-origin"), "{refused}");
        assert!(check_origin(&[], Some("https://evil.example")).is_ok(), "no list: any origin");
    }
}
