//! mbws: a thread-per-core io_uring message broker for the MessageBroker WebSocket Subprotocol.
//!
//! Layers, from the wire inwards (each sans-IO unless it says otherwise):
//! - [`ws`], [`mbws`]: the wire protocol (RFC 6455 and the MBWS codecs), from the `mbws-proto`
//!   crate, re-exported so the broker's modules name them `crate::ws` and `crate::mbws`.
//! - [`broker`]: address state (queues, subscribers, credit, acks) and session state, as state
//!   machines fed by commands and frames.
//! - [`shard`]: the per-core runtime (IO): threads, io_uring event loops, cross-shard mailboxes.
//! - [`conn`]: the connection tasks (IO): read loop, write queue, vectored writes.
//! - [`admin`]: the admin API (IO, its own thread): health, Prometheus metrics, addresses and
//!   sessions over HTTP, gathered from the shards through their inboxes.
//! - [`link`]: links to other brokers (IO, a thread each): MBWS sessions that carry messages
//!   from here to there or from there to here.
//!
//! The Rust client and the `mbws` CLI are the `mbws-client` crate; the load generator and the
//! relay are `mbws-bench`.

pub use mbws_proto::{mbws, ws};

pub mod admin;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod ids;
pub mod link;
pub mod logging;
pub mod planted;
pub mod shard;
#[cfg(test)]
mod sim;
pub mod store;
pub mod summary;
pub mod tls;
