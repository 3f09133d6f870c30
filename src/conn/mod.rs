//! A connection's decisions, sans-IO: its MBWS [`session`], its write queue ([`outbound`]),
//! its [`lifecycle`], the read buffer's sizing policy ([`read_buffer`]), and the
//! [`state::ConnState`] that joins them and answers each event (bytes read, a batch written,
//! the reader finished, the expiry came, a resume) with what the shell must do.
//!
//! The shard core (`crate::shard::core`) owns one `ConnState` per connection slot; the IO
//! shell that moves bytes between a socket and it is `crate::shard::connection`. Nothing here
//! reads a clock, touches a socket or wakes a task, so the deterministic simulator
//! (`crate::sim`, test builds) drives the same code as the broker.

pub mod lifecycle;
pub mod outbound;
pub mod read_buffer;
pub mod session;
pub mod state;
