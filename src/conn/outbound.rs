//! The write queue of one connection: frame headers in an arena, bodies as shared `Bytes`.
//!
//! Every outgoing WebSocket frame is queued as (header bytes, body): the WebSocket header and
//! the MBWS header are encoded into `arena`; a body above `INLINE_BODY_BYTES` is referenced,
//! never copied, and a smaller one is copied into `arena` behind its header. Adjacent
//! header-only frames (RECEIPT, PONG, ...) merge into one segment. [`Outbound::take_batch`]
//! hands everything queued so far to the writer as one [`WriteBatch`]: a list of iovecs for a
//! single vectored write (`writev` through io_uring), which keeps the memory it points at alive
//! until the write completes.
//!
//! Bound: `queued_bytes()` is what the connection owes its peer; the connection stops reading
//! and stops returning auto-ack credit while it is over `max_outbound_bytes`.
//!
//! Memory: nothing is allocated until a frame is queued. The arena is allocated in chunks of
//! [`ARENA_CHUNK_BYTES`] and reused while frames keep coming; once the writer has caught up,
//! [`Outbound::release_buffers`] gives the arena and the segment list back, so an idle
//! connection holds no write buffers. A busy connection does not ask the allocator for a chunk
//! at every fill: a chunk whose writes are all done is written into again (the current one,
//! or the one before it), and the first chunk after a pause is sized by the burst before it.
//! Fresh chunks at every fill cost fan-out to 1,000 subscribers half of the broker's CPU in
//! page faults (docs/PERFORMANCE.md, session 9).

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use crate::broker::{ShardId, SubscriptionId};
use crate::mbws::binary::MessageTail;
use crate::mbws::{self, text_message, Binding, Frame, MessageHeader};
use crate::ws::frame::encode_header;
use crate::ws::OpCode;

/// Bodies up to this size are copied into the arena next to their header; larger ones are
/// written from the buffer they arrived in (zero-copy). For small bodies the copy costs less
/// than what referencing costs: a reference count up and down, and one more iovec for the
/// kernel to walk.
pub const INLINE_BODY_BYTES: usize = 1024;

/// Longest WebSocket frame header (2 bytes, 8 of extended length, 4 of mask).
const MAX_WS_HEADER_BYTES: usize = 14;

/// Longest header of a frame the server sends (2 bytes, 8 of extended length; never masked).
const MAX_SERVER_HEADER_BYTES: usize = 10;

/// Writes the header of an unmasked, final WebSocket frame (RFC 6455 section 5.2) into `out`
/// and returns its length: what `encode_header` writes for a server's frame, without a
/// capacity check per byte.
#[inline]
fn server_frame_header(opcode: OpCode, payload_len: usize, out: &mut [u8]) -> usize {
    out[0] = 0x80 | opcode as u8;
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if let Ok(medium) = u16::try_from(payload_len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&medium.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// Most iovecs handed to one `writev` (Linux IOV_MAX is 1024).
pub const MAX_IOVECS_PER_WRITE: usize = 1024;

/// The first arena chunk after the queue was idle. A chunk that fills up is sealed (what is
/// queued in it stays where it is) and the next one is twice as large, up to
/// `MAX_ARENA_CHUNK_BYTES`: a burst never copies what it has queued, and an occasional frame
/// costs only a small chunk.
pub const ARENA_CHUNK_BYTES: usize = 4096;
/// The largest arena chunk (a frame larger than this gets a chunk of its own size).
pub const MAX_ARENA_CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug)]
enum Segment {
    /// `arena[start..end]`.
    Header {
        start: usize,
        end: usize,
    },
    Body(Bytes),
    /// Part of an arena chunk that filled up and was sealed before this batch was taken.
    Sealed(Bytes),
}

/// Auto-ack deliveries queued for writing, per owner shard and subscription: how many, and
/// their bytes ([`StoredMessage::held_bytes`](crate::broker::StoredMessage::held_bytes)).
/// Two inline: a batch rarely carries deliveries of more subscriptions.
pub type CreditReturns = SmallVec<[(ShardId, SubscriptionId, u32, u64); 2]>;

#[derive(Debug, Default)]
pub struct Outbound {
    arena: BytesMut,
    segments: Vec<Segment>,
    queued_bytes: usize,
    credits: CreditReturns,
    /// Set once a close frame is queued: nothing may follow it.
    close_queued: bool,
    /// Reused buffer for the MBWS header, encoded before the WebSocket header that needs its length.
    scratch: BytesMut,
    /// Segments from this index on may point into `arena` (earlier ones are bodies or sealed).
    unsealed_from: usize,
    /// Size of the next arena chunk (0 until the first: `ARENA_CHUNK_BYTES`).
    next_chunk_bytes: usize,
    /// The two chunks before the current one, newest first, as empty handles on their
    /// allocations: once every write from one is done it is the next chunk, instead of a new
    /// allocation (two, so that rounds of up to two chunks' worth reuse them all).
    previous_chunks: [BytesMut; 2],
    /// Bytes handed to writes since the buffers were last released: the first chunk after a
    /// pause is sized to hold as much (up to `MAX_ARENA_CHUNK_BYTES`).
    burst_bytes: usize,
    /// Chunks taken from the allocator (not reused) since the queue was made, for tests.
    chunks_allocated: u64,
}

impl Outbound {
    /// An empty queue; allocates nothing until a frame is queued.
    pub fn new() -> Outbound {
        Outbound::default()
    }

    /// Gives the buffers back to the allocator when nothing is queued (the writer has caught
    /// up): an idle connection then holds no write buffers. Batches being written keep what
    /// they point into alive themselves.
    pub fn release_buffers(&mut self) {
        if self.segments.is_empty() {
            self.arena = BytesMut::new();
            self.previous_chunks = Default::default();
            self.segments = Vec::new();
            self.scratch = BytesMut::new();
            self.unsealed_from = 0;
            // A connection that writes in rounds (a fan-out subscriber) is caught up after each:
            // its next round's first chunk holds a round, instead of growing from 4 KiB again.
            self.next_chunk_bytes = std::mem::take(&mut self.burst_bytes)
                .next_power_of_two()
                .clamp(ARENA_CHUNK_BYTES, MAX_ARENA_CHUNK_BYTES);
        }
    }

    /// Bytes queued and not yet handed to a write.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    pub fn close_queued(&self) -> bool {
        self.close_queued
    }

    /// Queues one MBWS frame as one WebSocket message in `binding` (text or binary opcode).
    /// Ignored once a close frame is queued, like every frame after it.
    pub fn push_frame(&mut self, binding: Binding, frame: &Frame) {
        if self.close_queued {
            return;
        }
        self.push_message_with(binding, |header| mbws::encode_header(binding, frame, header), frame.body());
    }

    /// Queues one MESSAGE delivery, encoded straight from the stored message's fields. In the
    /// binary binding the MESSAGE header's length is known up front, so the WebSocket header,
    /// the MESSAGE header and a small body are written into the arena in one pass.
    ///
    /// Ignored once a close frame is queued (RFC 6455 section 5.5.1: no data frame follows a
    /// close). A client-ack delivery stays with the session, which resends it on resume; an
    /// auto-ack one is lost with the connection (at most once), and its credit, noted by the
    /// caller, goes back with the queue's other credit.
    pub fn push_message(&mut self, binding: Binding, message: &MessageHeader<'_>, body: &Bytes) {
        if self.close_queued {
            return;
        }
        if binding == Binding::Text {
            let encode = |header: &mut BytesMut| mbws::encode_message_header(binding, message, header);
            return self.push_message_with(binding, encode, Some(body));
        }
        let header_len = mbws::binary::message_header_len(message);
        let payload_len = header_len + body.len();
        let inline = (body.len() <= INLINE_BODY_BYTES).then_some(body);
        let needed = MAX_WS_HEADER_BYTES + header_len + inline.map_or(0, Bytes::len);
        self.push_header(needed, |arena| {
            encode_header(arena, true, OpCode::Binary, payload_len, None);
            let start = arena.len();
            mbws::binary::encode_message_header(message, arena);
            debug_assert_eq!(arena.len() - start, header_len, "message_header_len disagrees with the encoder");
            if let Some(body) = inline {
                arena.extend_from_slice(body);
            }
        });
        if inline.is_none() {
            self.queued_bytes += body.len();
            self.segments.push(Segment::Body(body.clone()));
        }
    }

    /// Queues a binary MESSAGE made of this delivery's fixed fields and the message's shared
    /// tail (address, properties, body; see `MessageTail`): one MESSAGE of
    /// [`Outbound::binary_messages`]. Ignored once a close frame is queued, as
    /// [`Outbound::push_message`].
    pub fn push_binary_message(&mut self, fixed: &[u8; mbws::binary::MESSAGE_FIXED_BYTES], tail: &MessageTail) {
        if let Some(mut messages) = self.binary_messages() {
            messages.push(fixed, tail);
        }
    }

    /// A writer of consecutive binary MESSAGEs (a run of deliveries), `None` once a close
    /// frame is queued (nothing may follow it). What it writes is queued as one segment when
    /// it is dropped, instead of one segment update per MESSAGE.
    pub fn binary_messages(&mut self) -> Option<BinaryMessages<'_>> {
        if self.close_queued {
            return None;
        }
        let start = self.arena.len();
        Some(BinaryMessages { outbound: self, start })
    }

    /// Queues a text MESSAGE: this delivery's numbers (subscription id, delivery seq, message
    /// id) and `redelivered` flag, the header part the message's deliveries share (`shared`, from
    /// `text_message::encode_message_shared` for an address of `address_len` bytes), and the
    /// body. Ignored once a close frame is queued, as [`Outbound::push_message`].
    pub fn push_text_message(
        &mut self,
        (subscription_id, delivery_seq, message_id): (u32, u64, u64),
        redelivered: bool,
        shared: &[u8],
        address_len: usize,
        body: &Bytes,
    ) {
        if self.close_queued {
            return;
        }
        let encode = |header: &mut BytesMut| {
            text_message::encode_message_numbers(subscription_id, delivery_seq, message_id, header);
            header.reserve(text_message::message_shared_len(shared.len(), redelivered));
            text_message::put_message_shared(shared, address_len, redelivered, header);
        };
        self.push_message_with(Binding::Text, encode, Some(body));
    }

    /// Queues a WebSocket message whose MBWS header `encode` writes, followed by `body`: copied
    /// into the arena up to `INLINE_BODY_BYTES` (cheaper than one more iovec and a reference
    /// count), referenced without a copy above it.
    fn push_message_with(&mut self, binding: Binding, encode: impl FnOnce(&mut BytesMut), body: Option<&Bytes>) {
        let mut header = std::mem::take(&mut self.scratch);
        header.clear();
        encode(&mut header);
        let body = body.filter(|body| !body.is_empty());
        let opcode = match binding {
            Binding::Binary => OpCode::Binary,
            Binding::Text => OpCode::Text,
        };
        let payload_len = header.len() + body.map_or(0, Bytes::len);
        let inline = body.filter(|body| body.len() <= INLINE_BODY_BYTES);
        let needed = MAX_WS_HEADER_BYTES + header.len() + inline.map_or(0, Bytes::len);
        self.push_header(needed, |arena| {
            encode_header(arena, true, opcode, payload_len, None);
            arena.extend_from_slice(&header);
            if let Some(body) = inline {
                arena.extend_from_slice(body);
            }
        });
        self.scratch = header;
        if let Some(body) = body.filter(|body| body.len() > INLINE_BODY_BYTES) {
            self.queued_bytes += body.len();
            self.segments.push(Segment::Body(body.clone()));
        }
    }

    /// Queues a control frame (ping, pong, close) with a small payload (<= 125 bytes).
    pub fn push_control(&mut self, opcode: OpCode, payload: &[u8]) {
        debug_assert!(opcode.is_control() && payload.len() <= 125);
        if self.close_queued {
            return; // Nothing follows a close frame, not even a second one.
        }
        if opcode == OpCode::Close {
            self.close_queued = true;
        }
        self.push_header(MAX_WS_HEADER_BYTES + payload.len(), |arena| {
            encode_header(arena, true, opcode, payload.len(), None);
            arena.extend_from_slice(payload);
        });
    }

    /// Raw bytes (an HTTP response) that must precede any frame.
    pub fn push_raw(&mut self, bytes: &[u8]) {
        self.push_header(bytes.len(), |arena| arena.extend_from_slice(bytes));
    }

    /// Records that an auto-ack delivery of `subscription` (owned by `owner`) of `bytes` is
    /// queued, so its credit and bytes go back to the owner once the batch holding it is
    /// written.
    pub fn note_auto_delivery(&mut self, owner: ShardId, subscription: SubscriptionId, bytes: usize) {
        self.note_auto_deliveries(owner, subscription, 1, bytes as u64);
    }

    /// [`Outbound::note_auto_delivery`] of `count` deliveries of `bytes` in all (a run of
    /// them, noted once).
    pub fn note_auto_deliveries(&mut self, owner: ShardId, subscription: SubscriptionId, count: u32, bytes: u64) {
        match self.credits.iter_mut().find(|(shard, id, _, _)| *shard == owner && *id == subscription) {
            Some((_, _, noted, held)) => {
                *noted += count;
                *held += bytes;
            }
            None => self.credits.push((owner, subscription, count, bytes)),
        }
    }

    /// Appends at most `needed` bytes, written by `write`, to the arena as (part of) a segment.
    fn push_header(&mut self, needed: usize, write: impl FnOnce(&mut BytesMut)) {
        self.make_room(needed);
        let start = self.arena.len();
        write(&mut self.arena);
        self.queue_arena_from(start);
    }

    /// Queues what was written to the arena from `start` on: it joins the segment before it
    /// when that one ends at `start` (consecutive frames go out as one iovec).
    #[inline]
    fn queue_arena_from(&mut self, start: usize) {
        let end = self.arena.len();
        self.queued_bytes += end - start;
        match self.segments.last_mut() {
            Some(Segment::Header { end: last_end, .. }) if *last_end == start => *last_end = end,
            _ => self.segments.push(Segment::Header { start, end }),
        }
    }

    /// Makes sure `needed` bytes fit in the arena without moving anything queued in it. When
    /// they do not, the filled part is sealed: frozen, with the segments that point into it
    /// turned into references to it, and a new chunk is started. Queued bytes are never copied.
    #[inline]
    fn make_room(&mut self, needed: usize) {
        if self.arena.capacity() - self.arena.len() < needed {
            self.start_chunk(needed);
        }
    }

    /// [`Outbound::make_room`]'s rare part: seals the filled chunk and starts the next.
    #[cold]
    fn start_chunk(&mut self, needed: usize) {
        if !self.arena.is_empty() {
            let sealed = self.arena.split().freeze();
            for segment in &mut self.segments[self.unsealed_from..] {
                if let Segment::Header { start, end } = *segment {
                    *segment = Segment::Sealed(sealed.slice(start..end));
                }
            }
        }
        self.unsealed_from = self.segments.len();
        let chunk_bytes = self.next_chunk_bytes.max(ARENA_CHUNK_BYTES);
        self.next_chunk_bytes = (chunk_bytes * 2).min(MAX_ARENA_CHUNK_BYTES);
        let wanted = needed.max(chunk_bytes);
        // The current chunk again, from its start, once nothing queued or being written points
        // into it (`try_reclaim` succeeds only for the allocation's last handle); else one of
        // the chunks before it whose writes are done. None of this copies what is queued.
        if self.arena.try_reclaim(wanted) {
            return;
        }
        for previous in &mut self.previous_chunks {
            if previous.try_reclaim(wanted) {
                std::mem::swap(&mut self.arena, previous);
                return;
            }
        }
        // All still in use (by sealed segments or a write): a new allocation. The filled
        // chunk's empty handle becomes the newest to try next time; the oldest is let go.
        self.previous_chunks.rotate_right(1);
        self.previous_chunks[0] = std::mem::take(&mut self.arena);
        self.arena.reserve(wanted);
        self.chunks_allocated += 1;
    }

    /// Takes the auto-ack credit of frames that will never be written (their socket is gone).
    pub fn take_credits(&mut self) -> CreditReturns {
        std::mem::take(&mut self.credits)
    }

    /// Takes everything queued so far as one batch for a vectored write; `None` when empty.
    pub fn take_batch(&mut self, mut reuse: WriteBatch) -> Option<WriteBatch> {
        if self.segments.is_empty() {
            return None;
        }
        // The rest of the chunk stays for the next frames (until `release_buffers`).
        let arena = self.arena.split().freeze();
        reuse.clear();
        for segment in self.segments.drain(..) {
            let (base, len) = match &segment {
                Segment::Header { start, end } => (arena[*start..*end].as_ptr(), end - start),
                Segment::Body(bytes) | Segment::Sealed(bytes) => (bytes.as_ptr(), bytes.len()),
            };
            reuse.iovecs.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len });
            reuse.remaining_bytes += len;
            match segment {
                Segment::Body(body) => reuse.bodies.push(body),
                Segment::Sealed(chunk) => reuse.sealed.push(chunk),
                Segment::Header { .. } => {}
            }
        }
        self.unsealed_from = 0;
        reuse.arena = arena;
        reuse.credits = std::mem::take(&mut self.credits);
        // The bound (`max_outbound_bytes`) is checked against `queued_bytes`: it must be what
        // the batch will write. One compare per batch.
        assert_eq!(reuse.remaining_bytes, self.queued_bytes, "queued_bytes disagrees with the frames queued");
        self.burst_bytes += self.queued_bytes;
        self.queued_bytes = 0;
        Some(reuse)
    }
}

/// One vectored write in progress: iovecs plus the buffers they point into.
#[derive(Debug, Default)]
pub struct WriteBatch {
    iovecs: Vec<libc::iovec>,
    /// Index of the first iovec not completely written.
    first: usize,
    remaining_bytes: usize,
    arena: Bytes,
    /// Arena chunks sealed while this batch was queued.
    sealed: Vec<Bytes>,
    bodies: Vec<Bytes>,
    /// Auto-ack credit to return once this batch is written.
    pub credits: CreditReturns,
}

impl WriteBatch {
    fn clear(&mut self) {
        self.iovecs.clear();
        self.sealed.clear();
        self.bodies.clear();
        self.first = 0;
        self.remaining_bytes = 0;
        self.arena = Bytes::new();
        self.credits.clear();
    }

    pub fn remaining_bytes(&self) -> usize {
        self.remaining_bytes
    }

    pub fn is_done(&self) -> bool {
        self.remaining_bytes == 0
    }

    /// Base pointers of the queued bodies (tests use them to prove bodies are not copied).
    pub fn body_pointers(&self) -> Vec<*const u8> {
        self.bodies.iter().map(|body| body.as_ptr()).collect()
    }

    /// All bytes of the batch, concatenated (for tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.remaining_bytes);
        for iovec in &self.iovecs[self.first..] {
            // SAFETY: each iovec points into `arena`, one of `sealed` or one of `bodies`, which this batch owns
            // and which are immutable `Bytes`; `iov_len` never exceeds the buffer it points into.
            all.extend_from_slice(unsafe { std::slice::from_raw_parts(iovec.iov_base as *const u8, iovec.iov_len) });
        }
        all
    }

    /// The bytes not yet written, one slice per iovec, at most [`MAX_IOVECS_PER_WRITE`] of them
    /// (TLS encrypts them from here, as one vectored write into rustls).
    pub fn remaining_io_slices(&self) -> &[std::io::IoSlice<'_>] {
        let iovecs = &self.iovecs[self.first..][..self.iovecs_per_write()];
        // SAFETY: `IoSlice` is guaranteed ABI-compatible with `iovec` on Unix (std's documentation
        // of `IoSlice`), so the cast keeps length and layout. Each iovec points into a buffer this
        // batch owns and keeps immutable while borrowed (as in `to_vec`), and the returned slices
        // borrow `self`, so they cannot outlive those buffers or see `advance` change them.
        unsafe { std::slice::from_raw_parts(iovecs.as_ptr().cast::<std::io::IoSlice<'_>>(), iovecs.len()) }
    }

    fn iovecs_per_write(&self) -> usize {
        (self.iovecs.len() - self.first).min(MAX_IOVECS_PER_WRITE)
    }

    /// Marks `written` bytes as sent: drops whole iovecs, trims a partially written one.
    pub fn advance(&mut self, mut written: usize) {
        assert!(written <= self.remaining_bytes, "wrote more than was queued");
        self.remaining_bytes -= written;
        while written > 0 {
            let iovec = &mut self.iovecs[self.first];
            if written >= iovec.iov_len {
                written -= iovec.iov_len;
                self.first += 1;
            } else {
                // SAFETY: `written < iov_len`, so the new base stays inside the same buffer.
                iovec.iov_base = unsafe { (iovec.iov_base as *mut u8).add(written) } as *mut libc::c_void;
                iovec.iov_len -= written;
                written = 0;
            }
        }
        if self.remaining_bytes == 0 {
            // Release the buffers now rather than when the batch is reused.
            let credits = std::mem::take(&mut self.credits);
            self.clear();
            self.credits = credits;
        }
    }
}

// SAFETY: the iovecs point into `arena`, `sealed` and `bodies`, heap buffers owned by this struct whose
// addresses do not change when the struct moves; they are not modified while the runtime owns
// the batch (only `advance`, called after the write completes, changes them).
unsafe impl monoio::buf::IoVecBuf for WriteBatch {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iovecs[self.first..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        self.iovecs_per_write()
    }
}

/// Binary MESSAGEs written one after another into an [`Outbound`]'s arena
/// ([`Outbound::binary_messages`]): each is the WebSocket header, the delivery's fixed
/// fields and the message's stored tail, copied up to `INLINE_BODY_BYTES` of body and
/// referenced above it. The bytes written since `start` are queued (joined to the segment
/// before them where they follow it) when a body is referenced, when the chunk fills up, and
/// when the writer is dropped: until then the arena holds them unqueued, so every path that
/// seals the chunk queues them first.
pub struct BinaryMessages<'a> {
    outbound: &'a mut Outbound,
    /// Where the bytes not yet queued begin in the arena.
    start: usize,
}

impl BinaryMessages<'_> {
    /// Writes one MESSAGE: `fixed` (this delivery's own fields) and `tail`. One capacity
    /// check for the whole MESSAGE; inlined, as it runs once per delivery of a run.
    #[inline(always)]
    pub fn push(&mut self, fixed: &[u8; mbws::binary::MESSAGE_FIXED_BYTES], tail: &MessageTail) {
        let inline = tail.body().len() <= INLINE_BODY_BYTES;
        let tail = tail.as_bytes();
        let payload_len = fixed.len() + tail.len();
        let copied = if inline { tail } else { &[][..] };
        let mut ws_header = [0u8; MAX_SERVER_HEADER_BYTES];
        let ws_len = server_frame_header(OpCode::Binary, payload_len, &mut ws_header);
        let written = ws_len + fixed.len() + copied.len();
        // Room for the longest WebSocket header, so that the header is copied at its full,
        // constant size (moves, not a `memcpy` call) and the fixed fields then overwrite
        // what follows its `ws_len` bytes.
        let room = MAX_SERVER_HEADER_BYTES + fixed.len() + copied.len();
        let arena = &mut self.outbound.arena;
        if arena.capacity() - arena.len() < room {
            self.new_chunk(room);
        }
        let arena = &mut self.outbound.arena;
        let start = arena.len();
        let spare = arena.spare_capacity_mut();
        assert!(spare.len() >= room, "start_chunk left {} bytes for {room}", spare.len());
        // Each copy stays within `spare[..room]` (checked above) and comes from a buffer that
        // cannot overlap the arena's spare capacity (the stack, or the tail's own buffer). The
        // places are found by pointer offsets, not slicing: the one check above covers them
        // (a slice index each was a bounds check per delivery, about 20 instructions).
        let header_at = spare.as_mut_ptr().cast::<u8>();
        // SAFETY: `room` starts with `MAX_SERVER_HEADER_BYTES` (see above).
        unsafe { std::ptr::copy_nonoverlapping(ws_header.as_ptr(), header_at, MAX_SERVER_HEADER_BYTES) };
        // SAFETY: `ws_len` (at most `MAX_SERVER_HEADER_BYTES`) plus `fixed.len()` is at most
        // `room`, so the offset and the copy stay within `spare[..room]`.
        let fixed_at = unsafe { header_at.add(ws_len) };
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(fixed.as_ptr(), fixed_at, fixed.len()) };
        // SAFETY: `written` (`ws_len + fixed.len() + copied.len()`) is at most `room`.
        let tail_at = unsafe { fixed_at.add(fixed.len()) };
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(copied.as_ptr(), tail_at, copied.len()) };
        // SAFETY: the copies above initialised every byte from `start` to `start + written`.
        unsafe { arena.set_len(start + written) };
        if !inline {
            self.queue_written();
            self.outbound.queued_bytes += tail.len();
            self.outbound.segments.push(Segment::Body(tail.clone()));
        }
    }

    /// The chunk has less than `room` bytes left: queues what was written, then starts the
    /// next chunk (which seals this one).
    #[cold]
    fn new_chunk(&mut self, room: usize) {
        self.queue_written();
        self.outbound.start_chunk(room);
        self.start = self.outbound.arena.len();
    }

    /// Queues the bytes written since `start`.
    fn queue_written(&mut self) {
        if self.outbound.arena.len() > self.start {
            self.outbound.queue_arena_from(self.start);
        }
        self.start = self.outbound.arena.len();
    }
}

impl Drop for BinaryMessages<'_> {
    fn drop(&mut self) {
        self.queue_written();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mbws::{Ping, Receipt};

    #[test]
    fn header_only_frames_merge_and_partial_writes_advance() {
        let mut outbound = Outbound::new();
        outbound.push_frame(Binding::Binary, &Frame::Receipt(Receipt { seq: 1 }));
        outbound.push_frame(Binding::Binary, &Frame::Ping(Ping { token: 7 }));
        let mut batch = outbound.take_batch(WriteBatch::default()).unwrap();
        assert_eq!(batch.iovecs.len(), 1, "adjacent headers share one iovec");
        let all = batch.to_vec();
        batch.advance(3);
        assert_eq!(batch.to_vec(), all[3..]);
        batch.advance(all.len() - 3);
        assert!(batch.is_done());
        assert!(outbound.take_batch(WriteBatch::default()).is_none());
    }

    #[test]
    fn a_message_written_from_its_tail_is_the_message_encoded_field_by_field() {
        let mut properties = mbws::Properties { content_type: Bytes::from_static(b"text/plain"), ..Default::default() };
        properties.headers.push((Bytes::from_static(b"x-trace"), Bytes::from_static(b"7")));
        for body_len in [0, 64, INLINE_BODY_BYTES, INLINE_BODY_BYTES + 1] {
            for properties in [mbws::Properties::default(), properties.clone()] {
                let body = Bytes::from(vec![b'b'; body_len]);
                let tail = MessageTail::encode(b"orders", &properties, &body);
                let header = MessageHeader {
                    subscription_id: 3,
                    delivery_seq: 4,
                    message_id: 5,
                    address: b"orders",
                    redelivered: true,
                    durable: false,
                    properties: &properties,
                };
                let mut by_fields = Outbound::new();
                by_fields.push_message(Binding::Binary, &header, &body);
                let mut from_tail = Outbound::new();
                from_tail.push_binary_message(&mbws::binary::encode_message_fixed(3, 4, 5, true, false), &tail);
                let expected = by_fields.take_batch(WriteBatch::default()).unwrap();
                let written = from_tail.take_batch(WriteBatch::default()).unwrap();
                assert_eq!(written.to_vec(), expected.to_vec(), "body of {body_len} bytes");
                // A large body is referenced (the whole tail, in place), a small one copied.
                let referenced = written.body_pointers();
                if body_len > INLINE_BODY_BYTES {
                    assert_eq!(referenced, vec![tail.as_bytes().as_ptr()]);
                } else {
                    assert!(referenced.is_empty());
                }
            }
        }
    }

    /// A run of MESSAGEs written by one `binary_messages` writer is byte for byte the same
    /// MESSAGEs queued one by one, in order, also where the run fills chunks (sealed on the
    /// way) and references a large body between copied ones; nothing is written once a close
    /// frame is queued.
    #[test]
    fn a_run_of_binary_messages_is_each_message_queued_alone() {
        let small = MessageTail::encode(b"orders", &mbws::Properties::default(), &[b's'; 200]);
        let large = MessageTail::encode(b"orders", &mbws::Properties::default(), &[b'l'; INLINE_BODY_BYTES + 1]);
        let tails: Vec<&MessageTail> = (0..100).map(|i| if i % 37 == 5 { &large } else { &small }).collect();
        let fixed = |i: usize| mbws::binary::encode_message_fixed(3, 10 + i as u64, 100 + i as u64, i % 2 == 0, false);
        let mut one_by_one = Outbound::new();
        one_by_one.push_frame(Binding::Binary, &Frame::Receipt(Receipt { seq: 1 }));
        let mut as_run = Outbound::new();
        as_run.push_frame(Binding::Binary, &Frame::Receipt(Receipt { seq: 1 }));
        let mut writer = as_run.binary_messages().expect("no close frame queued");
        for (i, tail) in tails.iter().enumerate() {
            one_by_one.push_binary_message(&fixed(i), tail);
            writer.push(&fixed(i), tail);
        }
        drop(writer);
        assert_eq!(as_run.queued_bytes(), one_by_one.queued_bytes());
        assert!(as_run.chunks_allocated > 1, "the run filled at least one chunk");
        let expected = one_by_one.take_batch(WriteBatch::default()).unwrap();
        let written = as_run.take_batch(WriteBatch::default()).unwrap();
        assert_eq!(written.to_vec(), expected.to_vec());
        assert_eq!(written.body_pointers(), vec![large.as_bytes().as_ptr(); 3]);
        as_run.push_control(OpCode::Close, &[]);
        assert!(as_run.binary_messages().is_none(), "nothing follows a close frame");
    }

    #[test]
    fn a_text_message_from_its_shared_part_is_the_message_encoded_field_by_field() {
        let mut properties = mbws::Properties { reply_to: Bytes::from_static(b"replies"), ..Default::default() };
        properties.headers.push((Bytes::from_static(b"x-trace"), Bytes::from_static(b"7")));
        for body_len in [0, 64, INLINE_BODY_BYTES + 1] {
            for (properties, durable, redelivered) in
                [(mbws::Properties::default(), false, false), (properties.clone(), true, true)]
            {
                let body = Bytes::from(vec![b'b'; body_len]);
                let header = MessageHeader {
                    subscription_id: 3,
                    delivery_seq: 40_000,
                    message_id: 5,
                    address: b"orders",
                    redelivered,
                    durable,
                    properties: &properties,
                };
                let mut shared = Vec::new();
                text_message::encode_message_shared(b"orders", durable, &properties, &mut shared);
                let mut by_fields = Outbound::new();
                by_fields.push_message(Binding::Text, &header, &body);
                let mut from_shared = Outbound::new();
                from_shared.push_text_message((3, 40_000, 5), redelivered, &shared, b"orders".len(), &body);
                let expected = by_fields.take_batch(WriteBatch::default()).unwrap().to_vec();
                assert_eq!(from_shared.take_batch(WriteBatch::default()).unwrap().to_vec(), expected);
                let payload = &expected[if expected[1] == 126 { 4 } else { 2 }..];
                let decoded =
                    mbws::decode(Binding::Text, Bytes::copy_from_slice(payload), &mbws::CodecLimits::default());
                let Ok(Frame::Message(message)) = decoded else { panic!("not a MESSAGE: {decoded:?}") };
                assert_eq!(
                    (message.redelivered, message.durable, message.body.len()),
                    (redelivered, durable, body_len)
                );
                assert_eq!(message.properties, properties);
            }
        }
    }

    #[test]
    fn the_server_frame_header_is_the_encoders_for_every_length_class() {
        for payload_len in [0, 125, 126, 65_535, 65_536, 1 << 33] {
            let mut expected = BytesMut::new();
            encode_header(&mut expected, true, OpCode::Binary, payload_len, None);
            let mut header = [0u8; MAX_SERVER_HEADER_BYTES];
            let len = server_frame_header(OpCode::Binary, payload_len, &mut header);
            assert_eq!(&header[..len], &expected[..], "payload of {payload_len} bytes");
        }
    }

    #[test]
    fn large_bodies_are_referenced_not_copied() {
        let body = Bytes::from(vec![b'x'; INLINE_BODY_BYTES + 1]);
        let mut outbound = Outbound::new();
        let frame = Frame::Send(mbws::Send {
            seq: 1,
            address: Bytes::from_static(b"a"),
            body: body.clone(),
            ..Default::default()
        });
        outbound.push_frame(Binding::Binary, &frame);
        outbound.push_frame(Binding::Text, &frame);
        let batch = outbound.take_batch(WriteBatch::default()).unwrap();
        assert_eq!(batch.body_pointers(), vec![body.as_ptr(), body.as_ptr()]);
    }

    #[test]
    fn small_bodies_are_copied_behind_their_header_in_one_iovec() {
        let small = Bytes::from(vec![b'y'; INLINE_BODY_BYTES]);
        let mut outbound = Outbound::new();
        let properties = mbws::Properties::default();
        for delivery_seq in 1..=3 {
            let header = MessageHeader {
                subscription_id: 1,
                delivery_seq,
                message_id: delivery_seq,
                address: b"a",
                redelivered: false,
                durable: false,
                properties: &properties,
            };
            outbound.push_message(Binding::Binary, &header, &small);
        }
        let batch = outbound.take_batch(WriteBatch::default()).unwrap();
        assert!(batch.body_pointers().is_empty(), "nothing referenced");
        assert_eq!(batch.iovecs.len(), 1, "three whole messages in one iovec");
        // Each WebSocket message decodes to the MESSAGE it was built from, body included.
        let mut bytes = bytes::BytesMut::from(&batch.to_vec()[..]);
        for delivery_seq in 1..=3 {
            let frame = crate::ws::frame::decode_frame(&mut bytes, crate::ws::Role::Client, usize::MAX)
                .expect("a valid frame")
                .expect("a whole frame");
            let Frame::Message(message) =
                mbws::decode(Binding::Binary, frame.payload, &mbws::CodecLimits::default()).unwrap()
            else {
                panic!("not a MESSAGE")
            };
            assert_eq!(message.delivery_seq, delivery_seq);
            assert_eq!(message.body, small);
        }
        assert!(bytes.is_empty());
    }

    #[test]
    fn an_idle_queue_holds_no_buffers_and_release_keeps_what_is_queued() {
        let mut outbound = Outbound::new();
        assert_eq!((outbound.arena.capacity(), outbound.segments.capacity()), (0, 0), "nothing before a frame");
        outbound.push_frame(Binding::Binary, &Frame::Ping(Ping { token: 1 }));
        let queued = outbound.queued_bytes();
        outbound.release_buffers(); // Not caught up: a frame is queued.
        assert_eq!(outbound.queued_bytes(), queued);
        let batch = outbound.take_batch(WriteBatch::default()).unwrap();
        assert_eq!(batch.remaining_bytes(), queued, "the queued frame survived");
        outbound.release_buffers();
        assert_eq!(outbound.arena.capacity() + outbound.segments.capacity() + outbound.scratch.capacity(), 0);
        // The batch being written still owns its bytes, and the queue works again.
        assert_eq!(batch.to_vec().len(), queued);
        outbound.push_control(OpCode::Pong, b"x");
        assert_eq!(outbound.take_batch(WriteBatch::default()).unwrap().to_vec(), vec![0x8A, 0x01, b'x']);
    }

    #[test]
    fn a_burst_fills_sealed_chunks_without_moving_what_is_queued() {
        let mut outbound = Outbound::new();
        let mut expected = Vec::new();
        let mut first_frame_address = None;
        for index in 0..2_000u64 {
            let payload = index.to_be_bytes();
            outbound.push_control(OpCode::Ping, &payload);
            expected.extend_from_slice(&[0x89, 8]);
            expected.extend_from_slice(&payload);
            // The first frame stays where it was written, however much follows it.
            let first = match &outbound.segments[0] {
                Segment::Header { start, .. } => outbound.arena[*start..].as_ptr(),
                Segment::Sealed(chunk) => chunk.as_ptr(),
                Segment::Body(_) => unreachable!("no bodies queued"),
            };
            assert_eq!(*first_frame_address.get_or_insert(first), first, "queued bytes moved at frame {index}");
        }
        assert_eq!(outbound.queued_bytes(), expected.len());
        let batch = outbound.take_batch(WriteBatch::default()).unwrap();
        assert_eq!(batch.sealed.len(), 2, "20 KB of frames: chunks of 4 and 8 KiB sealed, the rest in a 16 KiB one");
        assert_eq!(batch.to_vec(), expected);
        assert!(batch.body_pointers().is_empty(), "sealed chunks are not bodies");
    }

    /// A connection that writes round after round (a fan-out subscriber) writes into the same
    /// two chunks once its writes are done, instead of a fresh allocation at every fill; a
    /// chunk a write still points into is never written into.
    #[test]
    fn chunks_whose_writes_are_done_are_written_into_again() {
        let mut outbound = Outbound::new();
        // 100 KB of 10-byte frames per round: chunks grow to 64 KiB in the first rounds.
        let round = |outbound: &mut Outbound, first: u64| {
            for index in first..first + 10_000 {
                outbound.push_control(OpCode::Ping, &index.to_be_bytes());
            }
        };
        let expected = |first: u64| {
            (first..first + 10_000)
                .flat_map(|index| [&[0x89, 8][..], &index.to_be_bytes()[..]].concat())
                .collect::<Vec<u8>>()
        };
        for number in 0..4 {
            round(&mut outbound, number * 10_000);
            let batch = outbound.take_batch(WriteBatch::default()).unwrap();
            assert_eq!(batch.to_vec(), expected(number * 10_000));
            // The write is done: the batch gives its chunks back.
        }
        let allocated = outbound.chunks_allocated;
        for number in 4..8 {
            round(&mut outbound, number * 10_000);
            let batch = outbound.take_batch(WriteBatch::default()).unwrap();
            assert_eq!(batch.to_vec(), expected(number * 10_000), "round {number}: reused chunks hold the right bytes");
        }
        assert_eq!(outbound.chunks_allocated, allocated, "no chunk allocated once the rounds are steady");
        // While a write is in flight its chunks are not written into: the next round allocates,
        // and the batch still reads what it was given.
        round(&mut outbound, 80_000);
        let in_flight = outbound.take_batch(WriteBatch::default()).unwrap();
        round(&mut outbound, 90_000);
        let next = outbound.take_batch(WriteBatch::default()).unwrap();
        assert!(outbound.chunks_allocated > allocated, "chunks in flight are not reclaimed");
        assert_eq!(in_flight.to_vec(), expected(80_000));
        assert_eq!(next.to_vec(), expected(90_000));
    }

    /// After a pause (the writer caught up, the buffers released), the first chunk is sized
    /// by the burst before it: a round of 30 KB starts in a 32 KiB chunk, not in 4 KiB.
    #[test]
    fn the_first_chunk_after_a_pause_holds_the_last_burst() {
        let mut outbound = Outbound::new();
        for index in 0..3_000u64 {
            outbound.push_control(OpCode::Ping, &index.to_be_bytes());
        }
        drop(outbound.take_batch(WriteBatch::default()).unwrap());
        outbound.release_buffers();
        assert_eq!(outbound.arena.capacity(), 0, "released: nothing held while idle");
        outbound.push_control(OpCode::Pong, b"x");
        assert_eq!(outbound.arena.capacity(), 32 * 1024);
        drop(outbound.take_batch(WriteBatch::default()).unwrap());
        outbound.release_buffers();
        outbound.push_control(OpCode::Pong, b"x");
        assert_eq!(outbound.arena.capacity(), ARENA_CHUNK_BYTES, "a burst of one frame: the smallest chunk");
    }

    #[test]
    fn nothing_follows_the_close_frame() {
        let mut outbound = Outbound::new();
        outbound.push_control(OpCode::Close, &[0x03, 0xE8]);
        outbound.push_control(OpCode::Close, &[0x03, 0xE9]);
        outbound.push_control(OpCode::Pong, b"x");
        outbound.push_frame(Binding::Binary, &Frame::Receipt(Receipt { seq: 1 }));
        let header = MessageHeader {
            subscription_id: 1,
            delivery_seq: 1,
            message_id: 1,
            address: b"a",
            redelivered: false,
            durable: false,
            properties: &Default::default(),
        };
        outbound.push_message(Binding::Binary, &header, &Bytes::from_static(b"late"));
        let batch = outbound.take_batch(WriteBatch::default()).unwrap();
        assert_eq!(batch.to_vec(), vec![0x88, 0x02, 0x03, 0xE8], "only the first close frame");
    }
}
