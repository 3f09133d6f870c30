//! The deterministic simulator: the broker's shard cores, driven by simulated clients over a
//! simulated network, in virtual time, from one seed (in the spirit of FoundationDB's
//! simulation testing and TigerBeetle's VOPR).
//!
//! A run (`world::World`) holds N [`ShardCore`](crate::shard::core::ShardCore)s and does
//! what the IO shell (`shard/mod.rs`, `conn/mod.rs`) does around them, as events on one
//! queue ordered by virtual time: it reads client bytes into a connection
//! (`ShardCore::bytes_read`), runs rounds of work, carries their envelopes between shards
//! (in order per pair of shards, in any order across pairs), writes what a connection queued
//! (`take_write_batch`, `write_completed`), fires the ack timers and the session expiries,
//! hands a resumed socket over to the session's home shard, and supersedes stale
//! connections. Nothing in a run reads a clock, a socket or the kernel's randomness: the
//! seed draws every delay, every fault and every client decision (`rng::Rng`), and also the
//! session tokens the core takes as an input. A failing seed therefore replays exactly.
//!
//! The clients (`client`) speak MBWS with the protocol crate's codecs, as a real client
//! would: publishers send numbered SENDs and resend what was not receipted after a resume;
//! consumers subscribe (anycast, client ack, bounded credit), acknowledge late or never (so
//! ack timeouts redeliver), and resume with their last delivery-seq. The network delays each
//! direction of each connection, reorders across connections, cuts connections (both ends
//! see it, at different times) and lets clients abandon a connection the broker still thinks
//! alive (so a resume supersedes it). In durable runs the logs sit on a simulated disk that
//! knows what was synced, and the whole broker crashes: files lose what was not synced (or
//! keep a torn part of it), and the logs are recovered into fresh cores.
//!
//! Invariants are checked on every frame a client receives and at the end of a run
//! (`world::Ledger`): no duplicate or out-of-order delivery-seq within a session; no
//! message delivered for the first time twice; per-publisher order of first deliveries on an
//! address; credit never exceeded; no unexpected fatal error; and, once the faults stop and
//! the clients have caught up, every receipted message was acknowledged by a consumer, every
//! SEND was answered, every connection's write queue drained, and every session is open,
//! resumable or gone.
//!
//! Bugs can be planted (`crate::planted`, in test builds only) to show that the invariants catch what they
//! claim to; `tests.rs` counts the seeds each needs. `scripts/simulate.sh` runs many seeds.

pub mod client;
pub mod rng;
mod tests;
pub mod world;
