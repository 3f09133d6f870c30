//! Where a text SEND's message is encoded. A text SEND's address and body are copied into a
//! [`MessageTail`] (the binary layout every stored message has); the tails go one after
//! another into the chunks of this thread's arena (a [`CompactionArena`]: `ARENA_CHUNK_BYTES`
//! chunks, 64 KiB, filled front to back), instead of an allocation each. So a text message holds a slice of
//! a shared chunk, as a binary SEND's message holds a slice of its read buffer, and it is
//! treated the same way:
//! - consecutive text SENDs lie next to each other in their chunk, so those queued one after
//!   another on an address count as one run against `MAX_UNCOMPACTED_RUNS`
//!   (`address::compaction`), and are compacted only once they wait;
//! - their messages take slab slots ([`SharedMessage::in_slab`](super::SharedMessage::in_slab)).
//!
//! Memory bound: a chunk is freed when the last message in it is gone (a message that waits
//! long is compacted out of it, as out of a read buffer), plus the one chunk each thread is
//! filling (at most 64 KiB, the size of a busy read buffer). A tail larger than
//! `MAX_ARENA_MESSAGE_BYTES` (8 KiB) gets an allocation of
//! its own, exactly its size.

use std::cell::RefCell;

use super::CompactionArena;
use crate::mbws::binary::{MessageTail, SendTail};
use crate::mbws::{self, CodecLimits};

thread_local! {
    /// The chunk this thread encodes text tails into.
    static TEXT_TAILS: RefCell<CompactionArena> = RefCell::new(CompactionArena::default());
}

/// [`mbws::decode_plain_text_send`] with the tail in this thread's arena: a text SEND of the
/// common shape, or `None` for any other payload (which `mbws::decode` then reads).
pub fn decode_plain_send(payload: &[u8], limits: &CodecLimits) -> Option<SendTail> {
    // The tail is never longer than its payload: room for that is room enough.
    in_arena(payload.len(), |chunk| mbws::decode_plain_text_send(payload, limits, chunk))
}

/// A decoded SEND (a text SEND with properties or application headers) with its tail encoded
/// into this thread's arena.
pub fn encode_send(send: &mbws::Send) -> SendTail {
    let length = MessageTail::encoded_len(&send.address, &send.properties, send.body.len());
    in_arena(length, |chunk| SendTail::encode_into(send, chunk))
}

/// Runs `encode` with a chunk of this thread's arena that has room for `bytes`.
fn in_arena<T>(bytes: usize, encode: impl FnOnce(&mut bytes::BytesMut) -> T) -> T {
    TEXT_TAILS.with_borrow_mut(|arena| arena.with_room(bytes, encode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain_send(address: &str, body: &str) -> Vec<u8> {
        format!("SEND\nseq:1\naddress:{address}\n\n{body}").into_bytes()
    }

    // Each test runs on a thread of its own, so its arena starts empty (no chunk yet).

    #[test]
    fn consecutive_text_sends_share_a_chunk_and_lie_next_to_each_other() {
        let limits = CodecLimits::default();
        let first = decode_plain_send(&plain_send("orders", "one"), &limits).expect("a plain SEND");
        assert_eq!(decode_plain_send(b"SEND\nseq:1\n\nno address", &limits), None, "left to decode");
        let second = decode_plain_send(&plain_send("orders", "two"), &limits).expect("a plain SEND");
        assert_eq!(second.tail.body(), b"two");
        let first = first.tail.as_bytes();
        assert_eq!(second.tail.as_bytes().as_ptr(), first.as_ptr().wrapping_add(first.len()), "next in the chunk");
    }

    #[test]
    fn a_text_send_with_properties_is_encoded_into_the_arena_too() {
        let send = mbws::Send {
            seq: 3,
            address: bytes::Bytes::from_static(b"orders"),
            body: bytes::Bytes::from_static(b"body"),
            properties: mbws::Properties {
                content_type: bytes::Bytes::from_static(b"text/plain"),
                ..Default::default()
            },
            ..Default::default()
        };
        let before = decode_plain_send(&plain_send("a", "b"), &CodecLimits::default()).expect("a plain SEND");
        let encoded = encode_send(&send);
        assert_eq!(encoded, SendTail::encode(&send));
        let before = before.tail.as_bytes();
        assert_eq!(encoded.tail.as_bytes().as_ptr(), before.as_ptr().wrapping_add(before.len()), "next in the chunk");
    }

    #[test]
    fn a_large_text_tail_gets_an_allocation_of_its_own_and_leaves_the_chunk_as_it_was() {
        let limits = CodecLimits::default();
        let small = decode_plain_send(&plain_send("a", "small"), &limits).expect("a plain SEND");
        let body = "x".repeat(super::super::MAX_ARENA_MESSAGE_BYTES + 1);
        let large = decode_plain_send(&plain_send("a", &body), &limits).expect("a plain SEND");
        assert_eq!(large.tail.body(), body.as_bytes());
        let next = decode_plain_send(&plain_send("a", "next"), &limits).expect("a plain SEND");
        let small = small.tail.as_bytes();
        assert_eq!(next.tail.as_bytes().as_ptr(), small.as_ptr().wrapping_add(small.len()), "the chunk's next tail");
    }
}
