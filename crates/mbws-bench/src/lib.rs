//! The load generator behind `mbws-bench` and the wire format of the `mbws-relay` baseline.
//!
//! One single-threaded monoio runtime on io_uring drives every connection of a run (the bench
//! script pins the generator to one core). Each connection is three small tasks: a reader that
//! decodes what the target sends, a writer that writes whole buffers, and for publishers a
//! producer that appends frames from a pre-encoded, pre-masked template (only the timestamp and
//! the sequence field are patched per message, so the hot path does no allocation).
//!
//! Layers, from the wire inwards:
//! - [`wire`]: WebSocket or length-prefixed framing, deframing, message templates, timestamps.
//! - [`net`]: TCP connect (optionally from a chosen source IP), reads into spare capacity,
//!   the per-connection write queue, a single-threaded notification.
//! - [`targets`]: one sans-IO codec per target (MBWS, NATS, MQTT 3.1.1, the relay) and the
//!   async set-up of a session (upgrade, open, subscribe).
//! - [`flow`]: the end-to-end window that keeps publishers at most `window` messages ahead of
//!   their consumers, so no broker ever has to drop or refuse a message.
//! - [`engine`]: the connection tasks, publisher pacing (coordinated-omission corrected),
//!   measurements.
//! - [`scenarios`]: throughput, latency, fanout, connections, durable.
//! - [`report`]: the JSON result, the table on stdout and the progress line on stderr.
//! - [`cli`], [`clock`], [`procfs`]: flags, the monotonic clock and pacing timer, /proc reads.
//!
//! Bounds: every buffer has a named limit (`OUTBOX_HIGH_WATER_BYTES`, `READ_BUFFERS_TOTAL_BYTES`, the
//! flow window, the protocol windows announced by the target); every wait on the target has a
//! timeout (`SETUP_TIMEOUT`, `STALL_TIMEOUT`, `DRAIN_TIMEOUT`).

// The module list above names private modules too: its links are for readers of the source and
// of `cargo doc --document-private-items`. Public: what the two binaries use.
#![allow(rustdoc::private_intra_doc_links)]

pub mod cli;
pub(crate) mod clock;
pub(crate) mod engine;
pub(crate) mod flow;
pub mod net;
pub(crate) mod procfs;
pub(crate) mod report;
pub mod scenarios;
pub mod stream;
pub mod targets;
pub mod wire;

use std::fmt;

/// Why a run failed; decides the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BenchError {
    /// Bad flags or a combination the target cannot run (exit 2).
    Usage(String),
    /// Connection, protocol or target error, or a local resource problem (exit 1).
    Failed(String),
}

impl BenchError {
    pub fn exit_code(&self) -> u8 {
        match self {
            BenchError::Usage(_) => 2,
            BenchError::Failed(_) => 1,
        }
    }
}

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Usage(message) | BenchError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for BenchError {}
