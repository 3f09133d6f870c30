//! mbws: a thread-per-core io_uring message broker for the MessageBroker WebSocket Subprotocol.
//!
//! Layers, from the wire inwards (each sans-IO unless it says otherwise):
//! - [`ws`]: RFC 6455 handshake, frames and message assembly.
//! - [`mbws`]: the MBWS frame model and its binary and text bindings (docs/PROTOCOL.md).
//! - [`broker`]: address state (queues, subscribers, credit, acks) and session state, as state
//!   machines fed by commands and frames.
//! - [`shard`]: the per-core runtime (IO): threads, io_uring event loops, cross-shard mailboxes.
//! - [`conn`]: the connection tasks (IO): read loop, write queue, vectored writes.
//! - [`client`]: a blocking Rust client used by the `mbws` CLI and the tests.

pub mod bench;
pub mod broker;
pub mod client;
pub mod config;
pub mod conn;
pub mod logging;
pub mod mbws;
pub mod shard;
pub mod store;
pub mod ws;
