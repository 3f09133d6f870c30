//! The configuration file: `mbws-broker --config broker.toml`.
//!
//! TOML, one key per flag, spelled as the flag without its `--` (`max-message-bytes = 65536`
//! for `--max-message-bytes 65536`; `durable-address` takes a list, as the flag may be
//! repeated). A flag given on the command line overrides the file's key. Every value goes
//! through the flag's own check ([`FLAG_RANGES`] for numbers), and an unknown key or a value of
//! the wrong kind stops the start with the key, the value and the reason.
//!
//! The file is read into [`ConfigFile`], a plain struct of optional values (`None`: not in the
//! file) with `deny_unknown_fields`, and applied onto a [`Config`] ([`ConfigFile::apply`]);
//! [`ConfigFile::effective`] goes the other way, for `--print-config`. Sections other issues
//! add (`[auth]`, `[tls]`, `[admin]`) are nested structs of their own, with
//! `deny_unknown_fields` too, declared after the top-level keys; a secret in them is a
//! [`Secret`], which `--print-config` prints as `"<redacted>"`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{flag_range, Config, Origins, FLAG_RANGES};
use crate::logging::{Level, LogFormat};
use crate::store::RecoveryMode;

/// Largest configuration file read (a sane file is a few KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1024 * 1024;

/// The keys of a configuration file, each optional (see the module doc). Numbers are read as
/// `u64` and checked against the flag's range before they are narrowed, so `max-credit =
/// 5000000000` is reported as out of range rather than wrapped.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    pub listen: Option<String>,
    pub shards: Option<u64>,
    pub no_pin: Option<bool>,
    pub max_message_bytes: Option<u64>,
    pub max_frame_bytes: Option<u64>,
    pub max_queued_messages: Option<u64>,
    pub max_queued_bytes: Option<u64>,
    pub memory_budget_bytes: Option<u64>,
    pub max_inflight_sends: Option<u64>,
    pub max_outbound_bytes: Option<u64>,
    pub max_subscriptions: Option<u64>,
    pub max_credit: Option<u64>,
    pub max_headers: Option<u64>,
    pub max_header_bytes: Option<u64>,
    pub max_heartbeat_ms: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_connections_per_ip: Option<u64>,
    pub max_sessions: Option<u64>,
    pub max_addresses: Option<u64>,
    pub handshake_timeout_ms: Option<u64>,
    pub open_timeout_ms: Option<u64>,
    pub session_expiry_ms: Option<u64>,
    pub ack_timeout_ms: Option<u64>,
    pub max_deliveries: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub durable_address: Option<Vec<String>>,
    pub log_batch_delay_us: Option<u64>,
    pub log_batch_bytes: Option<u64>,
    pub log_segment_bytes: Option<u64>,
    pub log_recovery: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
    pub summary_interval_secs: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
    pub drain_duration_ms: Option<u64>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_records: Option<String>,
    pub allowed_origin: Option<Vec<String>>,
    pub admin_listen: Option<String>,
    pub admin_token: Option<Secret>,
    pub cluster: Option<String>,
    pub etcd: Option<Vec<String>>,
    pub node_name: Option<String>,
    pub advertise_url: Option<String>,
    pub cluster_lease_ms: Option<u64>,
    pub cluster_login: Option<String>,
    pub cluster_passcode: Option<Secret>,
    pub cluster_ca_file: Option<PathBuf>,
    // Sections come after the top-level keys (TOML puts a table's keys after its header), each
    // `deny_unknown_fields`, secrets as `Secret`.
    pub auth: Option<AuthSection>,
    /// `[[link]]`: links to other brokers ([`crate::link::config`]); not flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub link: Vec<crate::link::LinkSection>,
}

/// `[auth]`: who may open a session and what it may do (docs/SECURITY.md; checked into a
/// [`crate::auth::Auth`]).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AuthSection {
    /// Sessions without credentials (`--allow-anonymous`); default: only when no user or token
    /// is configured.
    pub allow_anonymous: Option<bool>,
    /// Anonymous sessions also when listening beyond loopback (`--allow-anonymous-remote`).
    pub allow_anonymous_remote: Option<bool>,
    /// What anonymous sessions may do; default: everything.
    pub anonymous: Option<GrantSection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub user: Vec<UserSection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token: Vec<TokenSection>,
    /// Signed tokens (JWT) from an application's auth server.
    pub jwt: Option<JwtSection>,
}

/// `[auth.jwt]`: the keys that verify JWTs, and what their claims must say
/// ([`crate::auth::jwt`]; docs/SECURITY.md, "JWT").
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct JwtSection {
    /// The HS256 shared secret (at least 32 bytes).
    pub hs256_secret: Option<Secret>,
    /// A PEM public key: RSA (RS256) or EC P-256 (ES256).
    pub public_key_file: Option<PathBuf>,
    /// The algorithms accepted; default: those whose key is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<String>,
    /// The `iss` a token must have, if given.
    pub issuer: Option<String>,
    /// The `aud` a token must name, if given.
    pub audience: Option<String>,
    /// Clock difference allowed on `exp` and `nbf` (default 30 s).
    pub leeway_secs: Option<u64>,
}

/// `[auth.anonymous]`: permissions without an identity (also the patterns of a user put
/// through the admin API, [`crate::auth::PermissionPatterns`]).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GrantSection {
    #[serde(default)]
    pub send: Vec<String>,
    #[serde(default)]
    pub consume: Vec<String>,
    #[serde(default)]
    pub deny_send: Vec<String>,
    #[serde(default)]
    pub deny_consume: Vec<String>,
}

/// `[[auth.user]]`: a user, its argon2id password hash (`mbws hash-password`) and permissions.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserSection {
    pub name: String,
    pub password_hash: Secret,
    #[serde(default)]
    pub send: Vec<String>,
    #[serde(default)]
    pub consume: Vec<String>,
    #[serde(default)]
    pub deny_send: Vec<String>,
    #[serde(default)]
    pub deny_consume: Vec<String>,
}

/// `[[auth.token]]`: a static bearer token, stored as its SHA-256 (hex), and its permissions;
/// `name` only names it in errors.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TokenSection {
    pub name: String,
    pub sha256: Secret,
    #[serde(default)]
    pub send: Vec<String>,
    #[serde(default)]
    pub consume: Vec<String>,
    #[serde(default)]
    pub deny_send: Vec<String>,
    #[serde(default)]
    pub deny_consume: Vec<String>,
}

macro_rules! permission_lists {
    ($($section:ty),*) => {$(
        impl $section {
            /// The permission patterns of this entry.
            pub fn lists(&self) -> crate::auth::PermissionLists<'_> {
                crate::auth::PermissionLists {
                    send: &self.send,
                    consume: &self.consume,
                    deny_send: &self.deny_send,
                    deny_consume: &self.deny_consume,
                }
            }
        }
    )*};
}
permission_lists!(GrantSection, UserSection, TokenSection);

/// A secret value of the configuration (a password hash, a token, a key): read as a string,
/// never shown: `--print-config` and `{:?}` write `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the code that uses it (never for a log line or an answer).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// What `--print-config` and `{:?}` show instead of a secret.
pub const REDACTED: &str = "<redacted>";

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Secret({REDACTED})")
    }
}

impl ConfigFile {
    /// Reads and parses the file at `path` (at most [`MAX_CONFIG_FILE_BYTES`]).
    pub fn read(path: &Path) -> Result<ConfigFile, String> {
        use std::io::Read;
        let mut text = String::new();
        let read =
            std::fs::File::open(path).and_then(|file| file.take(MAX_CONFIG_FILE_BYTES + 1).read_to_string(&mut text));
        match read {
            Err(error) => Err(format!("--config {}: cannot read it: {error}", path.display())),
            Ok(bytes) if bytes as u64 > MAX_CONFIG_FILE_BYTES => Err(format!(
                "--config {}: the file is larger than {MAX_CONFIG_FILE_BYTES} bytes; is it the right file?",
                path.display()
            )),
            Ok(_) => ConfigFile::parse(&text, path),
        }
    }

    /// Parses `text`, the content of `path` (named in errors): an unknown key, or a value of
    /// the wrong kind, is refused with its line, the key, the value and the reason.
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile, String> {
        toml::from_str(text).map_err(|error| {
            let location = error.span().map_or_else(String::new, |span| {
                let line = text[..span.start].matches('\n').count() + 1;
                let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
                format!(" line {line} (`{line_text}`)")
            });
            let reason = error.message().trim_end().replace('\n', " ");
            format!("{}{location}: {reason}", path.display())
        })
    }

    /// The keys this file sets, as spelled in it (for [`Origins`]): the top-level keys, and
    /// the plain keys of each section (`[auth]`'s `allow-anonymous`, which is a flag too), not
    /// its tables.
    pub fn keys(&self) -> Vec<String> {
        let is_table = |value: &toml::Value| match value {
            toml::Value::Table(_) => true,
            toml::Value::Array(items) => items.first().is_some_and(toml::Value::is_table),
            _ => false,
        };
        match toml::Table::try_from(self) {
            Ok(table) => table
                .into_iter()
                .flat_map(|(key, value)| match value {
                    toml::Value::Table(section) => {
                        section.into_iter().filter(|(_, value)| !is_table(value)).map(|(key, _)| key).collect()
                    }
                    _ => vec![key],
                })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Sets every value the file gives on `config`, each checked as its flag is
    /// ([`FLAG_RANGES`] for numbers; `origins` names the file in errors). Relations between
    /// settings are checked later, once the flags are applied too ([`Config::validate_from`]).
    pub fn apply(&self, config: &mut Config, origins: &Origins) -> Result<(), String> {
        // A number in the flag's range: the check of `--flag`, named as this file's key.
        let number = |flag: &str, value: Option<u64>| -> Result<Option<u64>, String> {
            let Some(value) = value else { return Ok(None) };
            let range = flag_range(flag).unwrap_or_else(|| panic!("{flag} has a range in FLAG_RANGES"));
            range.check(value, origins)?;
            Ok(Some(value))
        };
        // Every narrowing below is lossless: each range fits the field's type (a unit test checks).
        if let Some(listen) = &self.listen {
            config.listen =
                super::parse_listen(listen).map_err(|reason| bad_value(origins, "listen", listen, &reason))?;
        }
        if let Some(shards) = number("--shards", self.shards)? {
            config.shards = shards as usize;
        }
        if let Some(no_pin) = self.no_pin {
            config.pin_threads = !no_pin;
        }
        if let Some(value) = number("--max-message-bytes", self.max_message_bytes)? {
            config.max_message_bytes = value as usize;
        }
        if let Some(value) = number("--max-frame-bytes", self.max_frame_bytes)? {
            config.max_frame_bytes = value as usize;
        }
        if let Some(value) = number("--max-queued-messages", self.max_queued_messages)? {
            config.max_queued_messages = value as u32;
        }
        if let Some(value) = number("--max-queued-bytes", self.max_queued_bytes)? {
            config.max_queued_bytes = value as usize;
        }
        if let Some(value) = number("--memory-budget-bytes", self.memory_budget_bytes)? {
            config.memory_budget_bytes = value as usize;
        }
        if let Some(value) = number("--max-inflight-sends", self.max_inflight_sends)? {
            config.max_inflight_sends = value as u32;
        }
        if let Some(value) = number("--max-outbound-bytes", self.max_outbound_bytes)? {
            config.max_outbound_bytes = value as usize;
        }
        if let Some(value) = number("--max-subscriptions", self.max_subscriptions)? {
            config.max_subscriptions = value as u32;
        }
        if let Some(value) = number("--max-credit", self.max_credit)? {
            config.max_credit = value as u32;
        }
        if let Some(value) = number("--max-headers", self.max_headers)? {
            config.max_headers = value as usize;
        }
        if let Some(value) = number("--max-header-bytes", self.max_header_bytes)? {
            config.max_header_bytes = value as usize;
        }
        if let Some(value) = number("--max-heartbeat-ms", self.max_heartbeat_ms)? {
            config.max_heartbeat_ms = value as u32;
        }
        if let Some(value) = number("--max-connections", self.max_connections)? {
            config.max_connections = value as usize;
        }
        if let Some(value) = number("--max-connections-per-ip", self.max_connections_per_ip)? {
            config.max_connections_per_ip = value as usize;
        }
        if let Some(value) = number("--max-sessions", self.max_sessions)? {
            config.max_sessions = value as usize;
        }
        if let Some(value) = number("--max-addresses", self.max_addresses)? {
            config.max_addresses = value as usize;
        }
        if let Some(value) = number("--handshake-timeout-ms", self.handshake_timeout_ms)? {
            config.handshake_timeout = Duration::from_millis(value);
        }
        if let Some(value) = number("--open-timeout-ms", self.open_timeout_ms)? {
            config.open_timeout = Duration::from_millis(value);
        }
        if let Some(value) = number("--session-expiry-ms", self.session_expiry_ms)? {
            config.session_expiry_ms = value as u32;
        }
        if let Some(value) = number("--ack-timeout-ms", self.ack_timeout_ms)? {
            config.ack_timeout_ms = value;
        }
        if let Some(value) = number("--max-deliveries", self.max_deliveries)? {
            config.max_deliveries = value as u32;
        }
        if let Some(data_dir) = &self.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(patterns) = &self.durable_address {
            config.durable_addresses = patterns.clone();
        }
        if let Some(value) = number("--log-batch-delay-us", self.log_batch_delay_us)? {
            config.log_batch_delay = Duration::from_micros(value);
        }
        if let Some(value) = number("--log-batch-bytes", self.log_batch_bytes)? {
            config.log_batch_bytes = value as usize;
        }
        if let Some(value) = number("--log-segment-bytes", self.log_segment_bytes)? {
            config.log_segment_bytes = value;
        }
        if let Some(mode) = &self.log_recovery {
            config.log_recovery =
                parse_recovery(mode).map_err(|reason| bad_value(origins, "log-recovery", mode, &reason))?;
        }
        if let Some(level) = &self.log_level {
            config.log_level = parse_level(level).map_err(|reason| bad_value(origins, "log-level", level, &reason))?;
        }
        if let Some(format) = &self.log_format {
            config.log_format =
                parse_log_format(format).map_err(|reason| bad_value(origins, "log-format", format, &reason))?;
        }
        if let Some(value) = number("--summary-interval-secs", self.summary_interval_secs)? {
            config.summary_interval_secs = value;
        }
        if let Some(value) = number("--shutdown-grace-ms", self.shutdown_grace_ms)? {
            config.shutdown_grace_ms = value;
        }
        if let Some(value) = number("--drain-duration-ms", self.drain_duration_ms)? {
            config.drain_duration_ms = value;
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                config.tls = Some(crate::tls::TlsFiles { cert: cert.clone(), key: key.clone() });
            }
            (None, None) => {}
            (Some(cert), None) => {
                let cert = cert.display().to_string();
                return Err(bad_value(origins, "tls-cert", &cert, "it needs tls-key (the certificate's private key)"));
            }
            (None, Some(key)) => {
                let key = key.display().to_string();
                return Err(bad_value(
                    origins,
                    "tls-key",
                    &key,
                    "it needs tls-cert (the certificate it is the key of)",
                ));
            }
        }
        if let Some(records) = &self.tls_records {
            config.tls_records = crate::tls::TlsRecords::parse(records)
                .map_err(|reason| bad_value(origins, "tls-records", records, &reason))?;
        }
        if let Some(list) = &self.allowed_origin {
            config.allowed_origins = list
                .iter()
                .map(|origin| {
                    super::parse_origin(origin).map_err(|reason| bad_value(origins, "allowed-origin", origin, &reason))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(admin) = &self.admin_listen {
            config.admin_listen = super::parse_admin_listen(admin)
                .map_err(|reason| bad_value(origins, "admin-listen", admin, &reason))?
                .0;
        }
        if let Some(token) = &self.admin_token {
            config.admin_token = Some(token.clone());
        }
        if let Some(cluster) = &self.cluster {
            config.cluster = Some(cluster.clone());
        }
        if let Some(endpoints) = &self.etcd {
            config.etcd_endpoints = endpoints.clone();
        }
        if let Some(node) = &self.node_name {
            config.node_name = Some(node.clone());
        }
        if let Some(url) = &self.advertise_url {
            config.advertise_url = Some(url.clone());
        }
        if let Some(value) = number("--cluster-lease-ms", self.cluster_lease_ms)? {
            config.cluster_lease_ms = value;
        }
        if let Some(login) = &self.cluster_login {
            config.cluster_login = Some(login.clone());
        }
        if let Some(passcode) = &self.cluster_passcode {
            config.cluster_passcode = Some(passcode.clone());
        }
        if let Some(ca_file) = &self.cluster_ca_file {
            config.cluster_ca_file = Some(ca_file.clone());
        }
        if let Some(section) = &self.auth {
            let file = origins.file().map_or_else(|| "the configuration".into(), |file| file.display().to_string());
            let auth = crate::auth::Auth::from_section(section).map_err(|error| format!("{file}: {error}"))?;
            // Without the key, anonymous sessions are allowed only when nobody has credentials.
            config.allow_anonymous = section.allow_anonymous.unwrap_or(!auth.has_credentials());
            if let Some(allow) = section.allow_anonymous_remote {
                config.allow_anonymous_remote = allow;
            }
            config.auth = std::sync::Arc::new(auth);
        }
        if !self.link.is_empty() {
            let file = origins.file().map_or_else(|| "the configuration".into(), |file| file.display().to_string());
            config.links = crate::link::LinkSpec::from_sections(&self.link, &file)?;
        }
        Ok(())
    }

    /// Every setting of `config` as a key, for `--print-config` (secrets, once there are any,
    /// are [`Secret`]s and print redacted). Read back, it gives the same `config`.
    pub fn effective(config: &Config) -> ConfigFile {
        ConfigFile {
            listen: Some(config.listen.to_string()),
            shards: Some(config.shards as u64),
            no_pin: Some(!config.pin_threads),
            max_message_bytes: Some(config.max_message_bytes as u64),
            max_frame_bytes: Some(config.max_frame_bytes as u64),
            max_queued_messages: Some(config.max_queued_messages.into()),
            max_queued_bytes: Some(config.max_queued_bytes as u64),
            memory_budget_bytes: Some(config.memory_budget_bytes as u64),
            max_inflight_sends: Some(config.max_inflight_sends.into()),
            max_outbound_bytes: Some(config.max_outbound_bytes as u64),
            max_subscriptions: Some(config.max_subscriptions.into()),
            max_credit: Some(config.max_credit.into()),
            max_headers: Some(config.max_headers as u64),
            max_header_bytes: Some(config.max_header_bytes as u64),
            max_heartbeat_ms: Some(config.max_heartbeat_ms.into()),
            max_connections: Some(config.max_connections as u64),
            max_connections_per_ip: Some(config.max_connections_per_ip as u64),
            max_sessions: Some(config.max_sessions as u64),
            max_addresses: Some(config.max_addresses as u64),
            handshake_timeout_ms: Some(config.handshake_timeout.as_millis() as u64),
            open_timeout_ms: Some(config.open_timeout.as_millis() as u64),
            session_expiry_ms: Some(config.session_expiry_ms.into()),
            ack_timeout_ms: Some(config.ack_timeout_ms),
            max_deliveries: Some(config.max_deliveries.into()),
            data_dir: Some(config.data_dir.clone()),
            durable_address: Some(config.durable_addresses.clone()),
            log_batch_delay_us: Some(config.log_batch_delay.as_micros() as u64),
            log_batch_bytes: Some(config.log_batch_bytes as u64),
            log_segment_bytes: Some(config.log_segment_bytes),
            log_recovery: Some(recovery_name(config.log_recovery).to_string()),
            log_level: Some(config.log_level.name().to_string()),
            log_format: Some(config.log_format.name().to_string()),
            summary_interval_secs: Some(config.summary_interval_secs),
            shutdown_grace_ms: Some(config.shutdown_grace_ms),
            drain_duration_ms: Some(config.drain_duration_ms),
            tls_cert: config.tls.as_ref().map(|tls| tls.cert.clone()),
            tls_key: config.tls.as_ref().map(|tls| tls.key.clone()),
            tls_records: Some(config.tls_records.name().to_string()),
            allowed_origin: Some(config.allowed_origins.clone()),
            admin_listen: Some(super::AdminListen(config.admin_listen).to_string()),
            admin_token: config.admin_token.clone(),
            cluster: config.cluster.clone(),
            etcd: Some(config.etcd_endpoints.clone()),
            node_name: config.node_name.clone(),
            advertise_url: config.advertise_url.clone(),
            cluster_lease_ms: Some(config.cluster_lease_ms),
            cluster_login: config.cluster_login.clone(),
            cluster_passcode: config.cluster_passcode.clone(),
            cluster_ca_file: config.cluster_ca_file.clone(),
            auth: Some(AuthSection {
                allow_anonymous: Some(config.allow_anonymous),
                allow_anonymous_remote: Some(config.allow_anonymous_remote),
                ..config.auth.section.clone()
            }),
            link: config.links.iter().map(crate::link::LinkSpec::to_section).collect(),
        }
    }

    /// Every key a file may have: [`ConfigFile::effective`] leaves out a setting that has no
    /// value (a secret not given), so it is given one here.
    pub fn every_key() -> Vec<String> {
        let everything = Config {
            admin_token: Some(Secret::new("any")),
            cluster: Some("any".into()),
            node_name: Some("any".into()),
            advertise_url: Some("ws://any/".into()),
            cluster_login: Some("any".into()),
            cluster_passcode: Some(Secret::new("any")),
            cluster_ca_file: Some("ca.pem".into()),
            tls: Some(crate::tls::TlsFiles { cert: "cert.pem".into(), key: "key.pem".into() }),
            ..Config::default()
        };
        ConfigFile::effective(&everything).keys()
    }

    /// This file as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a ConfigFile always serializes: plain keys, strings, numbers and lists")
    }
}

/// `log-level = "loud" (in broker.toml) is not valid: use error, warn, info or debug`.
fn bad_value(origins: &Origins, key: &str, value: &str, reason: &str) -> String {
    format!("{} is not valid: {reason}", origins.describe(&format!("--{key}"), &format_args!("\"{value}\"")))
}

/// `--log-recovery`: strict or skip-corrupt.
pub fn parse_recovery(text: &str) -> Result<RecoveryMode, String> {
    match text {
        "strict" => Ok(RecoveryMode::Strict),
        "skip-corrupt" => Ok(RecoveryMode::SkipCorrupt),
        _ => Err(format!("unknown recovery mode \"{text}\": use strict or skip-corrupt")),
    }
}

pub fn recovery_name(mode: RecoveryMode) -> &'static str {
    match mode {
        RecoveryMode::Strict => "strict",
        RecoveryMode::SkipCorrupt => "skip-corrupt",
    }
}

/// `--log-level`: error, warn, info or debug.
pub fn parse_level(text: &str) -> Result<Level, String> {
    Level::parse(text).ok_or_else(|| format!("unknown log level \"{text}\": use error, warn, info or debug"))
}

/// `--log-format`: text or json.
pub fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    LogFormat::parse(text).ok_or_else(|| format!("unknown log format \"{text}\": use text or json"))
}

/// The keys that take numbers, each a flag of [`FLAG_RANGES`] (a test checks the file's
/// numeric keys against this list).
pub fn numeric_keys() -> impl Iterator<Item = &'static str> {
    FLAG_RANGES.iter().map(|range| range.flag.trim_start_matches("--"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("broker.toml")
    }

    fn load(text: &str) -> Result<Config, String> {
        let file = ConfigFile::parse(text, path())?;
        let origins = Origins::from_file(path().to_path_buf(), file.keys());
        let mut config = Config::default();
        file.apply(&mut config, &origins)?;
        config.validate_from(&origins)?;
        Ok(config)
    }

    #[test]
    fn keys_set_the_settings_of_their_flags() {
        let config =
            load("shards = 3\nmax-credit = 10\nlog-format = \"json\"\ndurable-address = [\"a\", \"b.*\"]\n").unwrap();
        assert_eq!((config.shards, config.max_credit, config.log_format), (3, 10, LogFormat::Json));
        assert_eq!(config.durable_addresses, ["a", "b.*"]);
    }

    #[test]
    fn an_unknown_key_is_refused_with_its_line_and_the_keys_known() {
        let error = load("shards = 2\nshard = 3\n").unwrap_err();
        assert!(error.starts_with("broker.toml line 2 (`shard = 3`): unknown field `shard`"), "{error}");
        assert!(error.contains("expected one of") && error.contains("`shards`"), "{error}");
    }

    #[test]
    fn a_value_out_of_range_names_the_key_the_value_the_file_and_the_range() {
        let error = load("max-credit = 5000000000\n").unwrap_err();
        assert_eq!(
            error,
            "max-credit = 5000000000 (in broker.toml) is out of range: use 1..=1000000 (deliveries per subscription)"
        );
        let error = load("shards = \"four\"\n").unwrap_err();
        assert!(
            error.starts_with("broker.toml line 1 (`shards = \"four\"`): invalid type: string \"four\""),
            "{error}"
        );
        let error = load("log-level = \"loud\"\n").unwrap_err();
        assert_eq!(error, "log-level = \"loud\" (in broker.toml) is not valid: unknown log level \"loud\": use error, warn, info or debug");
    }

    #[test]
    fn relations_name_the_keys_from_the_file() {
        let error = load("max-message-bytes = 65536\nmax-frame-bytes = 131072\n").unwrap_err();
        assert!(
            error.starts_with(
                "max-frame-bytes = 131072 (in broker.toml) exceeds max-message-bytes = 65536 (in broker.toml)"
            ),
            "{error}"
        );
    }

    #[test]
    fn the_effective_configuration_reads_back_as_itself() {
        let config = Config { shards: 3, durable_addresses: vec!["x*".into()], ..Config::default() };
        let text = ConfigFile::effective(&config).to_toml();
        let again = load(&text).unwrap();
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
    }

    #[test]
    fn every_numeric_key_has_a_flag_range_that_fits_its_field() {
        let keys = ConfigFile::every_key();
        let numeric: Vec<&str> = numeric_keys().collect();
        for key in &numeric {
            assert!(keys.iter().any(|known| known == key), "{key} has a range but is no key of the file");
        }
        // A value at the top of each range survives apply and effective unchanged (no wrap).
        for range in FLAG_RANGES {
            let key = range.flag.trim_start_matches("--");
            let mut table = toml::Table::new();
            table.insert(key.into(), toml::Value::Integer(range.max as i64));
            let file: ConfigFile = table.try_into().unwrap();
            let mut config = Config::default();
            file.apply(&mut config, &Origins::default()).unwrap();
            assert_eq!((range.value)(&config), range.max, "{key}");
        }
    }

    #[test]
    fn secrets_print_redacted() {
        #[derive(Serialize, Deserialize)]
        struct Section {
            token: Secret,
        }
        let section: Section = toml::from_str("token = \"hunter2\"").unwrap();
        assert_eq!(section.token.expose(), "hunter2");
        let printed = toml::to_string(&section).unwrap();
        assert_eq!(printed.trim(), "token = \"<redacted>\"");
        assert!(!format!("{:?}", section.token).contains("hunter2"));
    }
}
