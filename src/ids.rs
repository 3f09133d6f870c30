//! Identifiers every layer shares (a leaf module: the durable log names its shard without
//! depending on the broker logic that uses it).

/// Index of a shard thread, `0..shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);
