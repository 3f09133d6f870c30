//! Broker configuration: every bound the broker enforces, with its unit in its name.
//!
//! `Config` is built once by `main` (from flags) and shared read-only by every shard.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::mbws::{CodecLimits, Limits};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7447";

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
    pub max_headers: usize,
    pub max_header_bytes: usize,
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
    /// Commands one shard may have waiting in another shard's inbox (channel bound).
    pub mailbox_capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
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
            max_address_bytes: 255,
            max_headers: 64,
            max_header_bytes: 16 * 1024,
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
            data_dir: PathBuf::from("mbws-data"),
            log_segment_bytes: crate::store::DEFAULT_SEGMENT_BYTES,
            log_batch_bytes: crate::store::DEFAULT_MAX_BATCH_BYTES,
            log_batch_delay: Duration::ZERO,
            log_recovery: crate::store::RecoveryMode::Strict,
            durable_addresses: Vec::new(),
            mailbox_capacity: 65_536,
        }
    }
}

impl Config {
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

    /// Checks relations between settings; the message says which flag to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards == 0 || self.shards > 1024 {
            return Err(format!("--shards {} is out of range: use 1..=1024", self.shards));
        }
        if self.max_frame_bytes > self.max_message_bytes {
            return Err(format!(
                "--max-frame-bytes {} exceeds --max-message-bytes {}: a frame cannot be larger than a message",
                self.max_frame_bytes, self.max_message_bytes
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(format!("--max-message-bytes {} is below the minimum of 1024", self.max_message_bytes));
        }
        if self.max_address_bytes == 0 || self.max_address_bytes > 255 {
            return Err(format!("--max-address-bytes {} is out of range: use 1..=255", self.max_address_bytes));
        }
        self.log_config().validate().map_err(|error| error.to_string())?;
        if self.max_queued_messages == 0 || self.max_credit == 0 || self.max_inflight_sends == 0 {
            return Err("--max-queued-messages, --max-credit and --max-inflight-sends must be at least 1".into());
        }
        Ok(())
    }
}

/// Cores this process may run on (its CPU affinity mask), at least 1.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
