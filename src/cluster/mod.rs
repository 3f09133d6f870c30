//! The cluster: N brokers that share one address space, coordinated by etcd (issue 13;
//! docs/CLUSTER.md).
//!
//! Two halves, joined only by the shards' inboxes:
//! - [`control`]: the control-plane thread. It alone talks to etcd (the `etcd-client` crate on
//!   a current-thread tokio runtime of its own): the node's lease and registration, the watch
//!   on membership and placement, first placements by transaction, re-placement of a dead
//!   node's non-durable addresses, fencing when the lease cannot be renewed in time, and the
//!   operator's moves. It tells each shard what concerns the addresses hashed to it, as
//!   [`view::ClusterUpdate`]s posted to its inbox.
//! - [`view`]: each shard's sans-IO placement view, consulted before a SEND or SUBSCRIBE reaches
//!   the address table: run here, refuse with 4421 naming the owner, or wait (bounded) for the
//!   first placement. The message path never waits for etcd.
//! - [`forward`]: the IO side of the view's forwarding: per shard, one forwarder per owner
//!   node, a thread with an MBWS session to it that carries SENDs and brings back the owner's
//!   RECEIPTs as the clients' answers.
//! - [`relay`]: the IO side of relayed subscriptions: per shard, one relay per owner node, a
//!   thread with an MBWS session to it that holds a client-ack subscription at the owner for
//!   each relayed one, delivers its MESSAGEs to the consumer's shard and carries back its ACK,
//!   NACK, FLOW and UNSUBSCRIBE (end-to-end credit).
//! - [`metrics`]: the `mbws_cluster_*` figures of `GET /metrics`, plain atomics: the control
//!   plane's view of the cluster, and per owner node what was forwarded to it and relayed from it.
//!
//! What lives in etcd, under `/mbws/<cluster>/`: `nodes/<node>` (the node's URL and shard
//! count, attached to its lease: it disappears when the node stops renewing), and
//! `addresses/<name>` (the owner node and whether the address is durable; no lease: placement
//! outlives its owner's lease, so a durable address waits for its node).

pub mod control;
pub mod forward;
pub mod metrics;
pub mod relay;
pub mod view;
mod wait;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::config::{Config, Secret};

/// The settings of a cluster node, resolved from the configuration ([`ClusterSettings::from_config`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `--cluster`: the cluster's name, the etcd key prefix `/mbws/<name>/`.
    pub cluster: String,
    /// `--etcd`: etcd's client URLs (`http://127.0.0.1:2379`).
    pub endpoints: Vec<String>,
    /// `--node-name`: this node's name in the cluster (default: host name and listen port).
    pub node: String,
    /// `--advertise-url`: the URL clients and peers connect to for this node.
    pub url: String,
    /// `--cluster-lease-ms`: the lease's time to live (etcd counts whole seconds: rounded up).
    pub lease: Duration,
    /// `--durable-address` patterns: a durable address keeps its owner when the owner dies.
    pub durable_patterns: Vec<String>,
    pub shards: usize,
}

/// How this node's forwarders open their sessions to the other nodes: the credentials of
/// `--cluster-login` and `--cluster-passcode` (a user and its password, or an empty login and a
/// bearer token; both absent: anonymous) and the CA file of `--cluster-ca-file` for `wss://`
/// nodes. The passcode is a [`Secret`]: it is sent in the OPEN frame, never logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerLogin {
    pub login: String,
    pub passcode: Option<Secret>,
    pub ca_file: Option<PathBuf>,
}

impl PeerLogin {
    pub fn from_config(config: &Config) -> PeerLogin {
        PeerLogin {
            login: config.cluster_login.clone().unwrap_or_default(),
            passcode: config.cluster_passcode.clone(),
            ca_file: config.cluster_ca_file.clone(),
        }
    }

    /// Puts these credentials and this CA file into a client's options.
    pub fn apply(&self, options: &mut mbws_client::ClientOptions) {
        options.login = self.login.clone();
        options.passcode = self.passcode.as_ref().map(|secret| secret.expose().to_string()).unwrap_or_default();
        options.ca_file = self.ca_file.clone();
    }
}

/// Characters allowed in a cluster or node name (they are etcd key segments).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
}

/// This machine's host name (`gethostname`), or `localhost`.
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `buffer.len()` bytes into the live buffer.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return "localhost".into();
    }
    let end = buffer.iter().position(|&byte| byte == 0).unwrap_or(buffer.len());
    let name: String = String::from_utf8_lossy(&buffer[..end])
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

impl ClusterSettings {
    /// The settings of `config` once the broker listens on `local_addr`; `None` without `--cluster`.
    pub fn from_config(config: &Config, local_addr: std::net::SocketAddr) -> Option<ClusterSettings> {
        let cluster = config.cluster.clone()?;
        let node = config.node_name.clone().unwrap_or_else(|| format!("{}-{}", host_name(), local_addr.port()));
        let url = config.advertise_url.clone().unwrap_or_else(|| {
            let host = if local_addr.ip().is_unspecified() { host_name() } else { local_addr.ip().to_string() };
            let scheme = if config.tls.is_some() { "wss" } else { "ws" };
            match local_addr {
                std::net::SocketAddr::V6(_) if !local_addr.ip().is_unspecified() => {
                    format!("{scheme}://[{host}]:{}/", local_addr.port())
                }
                _ => format!("{scheme}://{host}:{}/", local_addr.port()),
            }
        });
        Some(ClusterSettings {
            cluster,
            endpoints: config.etcd_endpoints.clone(),
            node,
            url,
            lease: Duration::from_millis(config.cluster_lease_ms),
            durable_patterns: config.durable_addresses.clone(),
            shards: config.shards,
        })
    }

    /// Whether `address` is durable by `--durable-address` (an exact name or a `prefix*`).
    pub fn is_durable(&self, address: &[u8]) -> bool {
        self.durable_patterns.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => address.starts_with(prefix.as_bytes()),
            None => address == pattern.as_bytes(),
        })
    }
}

/// Checks the cluster flags of `config` (called by [`Config::validate`]): a message naming the
/// flag, the value and what to do.
pub fn validate(config: &Config) -> Result<(), String> {
    let Some(cluster) = &config.cluster else {
        for (flag, given) in [
            ("--etcd", !config.etcd_endpoints.is_empty()),
            ("--node-name", config.node_name.is_some()),
            ("--advertise-url", config.advertise_url.is_some()),
            ("--cluster-login", config.cluster_login.is_some()),
            ("--cluster-passcode", config.cluster_passcode.is_some()),
            ("--cluster-ca-file", config.cluster_ca_file.is_some()),
        ] {
            if given {
                return Err(format!(
                    "{flag} is given without --cluster: name the cluster this node joins (--cluster NAME)"
                ));
            }
        }
        return Ok(());
    };
    if !is_valid_name(cluster) {
        return Err(format!(
            "--cluster \"{cluster}\" is not a valid cluster name: use 1 to 64 characters among A-Z a-z 0-9 - _ ."
        ));
    }
    if config.etcd_endpoints.is_empty() {
        return Err("--cluster needs --etcd URL (etcd's client URL, http://127.0.0.1:2379; repeatable)".into());
    }
    for endpoint in &config.etcd_endpoints {
        if !endpoint.starts_with("http://") || endpoint.len() <= "http://".len() {
            return Err(format!(
                "--etcd \"{endpoint}\" is not an etcd client URL: use http://HOST:PORT (TLS to etcd is not supported yet)"
            ));
        }
    }
    if let Some(node) = &config.node_name {
        if !is_valid_name(node) {
            return Err(format!(
                "--node-name \"{node}\" is not a valid node name: use 1 to 64 characters among A-Z a-z 0-9 - _ ."
            ));
        }
    }
    if let Some(url) = &config.advertise_url {
        if !(url.starts_with("ws://") || url.starts_with("wss://")) {
            return Err(format!(
                "--advertise-url \"{url}\" is not a WebSocket URL: use ws://HOST:PORT/ or wss://HOST:PORT/"
            ));
        }
    }
    validate_peer_login(config)
}

/// Checks `--cluster-login`, `--cluster-passcode` and `--cluster-ca-file` (never showing the
/// passcode).
fn validate_peer_login(config: &Config) -> Result<(), String> {
    if let Some(login) = &config.cluster_login {
        if login.is_empty() {
            return Err("--cluster-login is empty: give the user name the nodes know, or leave it out (a \
                        --cluster-passcode alone is sent as a bearer token)"
                .into());
        }
        if config.cluster_passcode.is_none() {
            return Err(format!(
                "--cluster-login \"{login}\" is given without --cluster-passcode: give the user's password \
                 (MBWS_CLUSTER_PASSCODE or cluster-passcode in the configuration file)"
            ));
        }
    }
    if let Some(passcode) = &config.cluster_passcode {
        if passcode.expose() == crate::config::file::REDACTED || passcode.expose().is_empty() {
            return Err(format!(
                "--cluster-passcode is empty or \"{}\" (what --print-config prints in place of a secret): put \
                 the password or token itself there",
                crate::config::file::REDACTED
            ));
        }
    }
    if let Some(ca_file) = &config.cluster_ca_file {
        mbws_client::tls_client_config(Some(ca_file))
            .map_err(|error| format!("--cluster-ca-file {}: {error}", ca_file.display()))?;
    }
    Ok(())
}

/// The running control plane, for the admin API (`GET /api/cluster`, `PUT
/// /api/cluster/addresses/NAME`); set once when the control plane starts.
static HANDLE: OnceLock<control::ClusterHandle> = OnceLock::new();

/// The control plane of this process, if it is a cluster node.
pub fn handle() -> Option<&'static control::ClusterHandle> {
    HANDLE.get()
}

/// Starts the control-plane thread for `settings`, posting to the shards of `post_office`.
pub fn start(
    settings: ClusterSettings,
    post_office: std::sync::Arc<crate::shard::mailbox::PostOffice>,
) -> std::io::Result<()> {
    let handle = control::spawn(settings, post_office)?;
    let _ = HANDLE.set(handle);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_flags_are_checked_with_a_message_naming_the_flag() {
        let mut config = Config { etcd_endpoints: vec!["http://127.0.0.1:2379".into()], ..Config::default() };
        assert!(validate(&config).unwrap_err().contains("--etcd is given without --cluster"));
        config.cluster = Some("a/b".into());
        assert!(validate(&config).unwrap_err().contains("not a valid cluster name"));
        config.cluster = Some("prod".into());
        assert_eq!(validate(&config), Ok(()));
        config.etcd_endpoints = vec!["127.0.0.1:2379".into()];
        assert!(validate(&config).unwrap_err().contains("http://HOST:PORT"));
    }

    #[test]
    fn peer_credentials_are_checked_without_showing_the_passcode() {
        let mut config = Config {
            cluster: Some("prod".into()),
            etcd_endpoints: vec!["http://127.0.0.1:2379".into()],
            cluster_login: Some("node".into()),
            ..Config::default()
        };
        assert!(validate(&config).unwrap_err().contains("without --cluster-passcode"));
        config.cluster_passcode = Some(Secret::new("s3cret-pass"));
        assert_eq!(validate(&config), Ok(()));
        let login = PeerLogin::from_config(&config);
        assert!(!format!("{login:?}").contains("s3cret-pass"), "{login:?}");
        config.cluster_ca_file = Some("/nonexistent/ca.pem".into());
        let error = validate(&config).unwrap_err();
        assert!(error.contains("--cluster-ca-file /nonexistent/ca.pem") && !error.contains("s3cret-pass"), "{error}");
        config.cluster = None;
        config.etcd_endpoints.clear();
        config.cluster_ca_file = None;
        config.cluster_login = None;
        assert!(validate(&config).unwrap_err().contains("--cluster-passcode is given without --cluster"));
    }

    #[test]
    fn durable_patterns_match_exact_names_and_prefixes() {
        let config = Config {
            cluster: Some("c".into()),
            durable_addresses: vec!["ledger".into(), "orders.*".into()],
            ..Config::default()
        };
        let settings = ClusterSettings::from_config(&config, "127.0.0.1:7447".parse().unwrap()).unwrap();
        assert!(settings.is_durable(b"ledger") && settings.is_durable(b"orders.eu"));
        assert!(!settings.is_durable(b"ledger2") && !settings.is_durable(b"news"));
        assert_eq!(settings.url, "ws://127.0.0.1:7447/");
        assert!(settings.node.ends_with("-7447"), "{}", settings.node);
    }
}
