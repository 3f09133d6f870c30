//! The MBWS wire protocol, sans-IO: bytes in, frames and events out; frames in, bytes out. No
//! socket, no clock, no runtime: the broker, the client, the load generator and the fuzzers all
//! parse and encode with this crate.
//!
//! - [`ws`]: RFC 6455, the upgrade handshake (both sides), frames, masking, message assembly and
//!   close codes. It knows no subprotocol: the caller names the ones it speaks through
//!   [`ws::handshake::Subprotocol`].
//! - [`mbws`]: the MBWS frame model and its binary and text bindings (docs/PROTOCOL.md). It
//!   builds on `ws` (its subprotocol tokens), never the other way round.

// Module docs also describe the private pieces (the text binding, the shared field rules): their
// links are for readers of the source and of `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod mbws;
pub mod ws;
