//! The relay target and the relay's wire format (shared with `mbws-relay`).
//!
//! Plain TCP, every frame a u32 big-endian length and a payload. A connection's first frame is
//! its hello: [`HELLO_PUBLISHER`], [`HELLO_ANYCAST`] (each frame from a publisher goes to one
//! such subscriber, round-robin) or [`HELLO_BROADCAST`] (every such subscriber gets every
//! frame). The relay answers a hello with [`READY`] once the connection is registered, and
//! after that forwards publishers' frames untouched: the payload is the message body itself.
//! There are no addresses and no acknowledgements.

use super::{Codec, Conn, CounterRule, Failure, Inbound, PublishWire, Role, TargetConfig};
use crate::wire::{read_stamp, Template};

pub const HELLO_PUBLISHER: &[u8] = b"PUB";
pub const HELLO_ANYCAST: &[u8] = b"SUB";
pub const HELLO_BROADCAST: &[u8] = b"SUBALL";
pub const READY: &[u8] = b"OK";

/// Relay state of one connection: none, every frame is a message.
#[derive(Debug, Default)]
pub struct RelayCodec;

impl RelayCodec {
    pub fn on_unit(&mut self, payload: &[u8], cx: &mut Inbound<'_>) -> Result<(), Failure> {
        cx.delivered(read_stamp(payload));
        Ok(())
    }
}

pub async fn setup(
    conn: &mut Conn,
    config: &TargetConfig,
    role: &Role,
) -> Result<(Codec, Option<PublishWire>), String> {
    let hello = match role {
        Role::Publisher { .. } => HELLO_PUBLISHER,
        Role::Consumer { multicast: true, .. } => HELLO_BROADCAST,
        Role::Consumer { .. } | Role::Idle => HELLO_ANYCAST,
    };
    conn.queue(hello);
    conn.flush().await?;
    let (answer, _) = conn.next_unit("the relay's READY").await?;
    if answer.as_ref() != READY {
        return Err(format!("expected the relay's READY, got {:?}", String::from_utf8_lossy(&answer)));
    }
    let publish = match role {
        Role::Publisher { .. } => {
            let body = vec![0u8; config.size];
            let template = Template::new(conn.framing(), &body, 0, None);
            Some(PublishWire { templates: vec![template], counter: CounterRule::None, window: None })
        }
        _ => None,
    };
    Ok((Codec::Relay(RelayCodec), publish))
}
