//! The read buffer of one connection, sized by the traffic the connection receives.
//!
//! An io_uring read owns its buffer until data arrives, which for an idle connection is for
//! ever: whatever room an idle connection's pending read has is memory held per session. So the
//! room follows the traffic, decided before every read by `ReadBuffer::prepare`:
//! - *busy*: the last read filled all the room it was given, so more is probably waiting in the
//!   socket. The next read gets at least `busy_bytes` (`read_buffer_bytes`) of room, for big
//!   batches;
//! - *caught up*: everything read has been decoded (the buffer is empty) and the last read came
//!   back short. The buffer is swapped for one sized to that last read, at least
//!   [`IDLE_READ_BUFFER_BYTES`]: an idle session holds a few hundred bytes, not tens of KiB;
//! - *mid-frame*: a frame is partly buffered; it gets `busy_bytes` more room when fewer than
//!   [`MIN_READ_ROOM_BYTES`] are left behind it (a frame is decoded from one contiguous buffer,
//!   so the buffer grows to the frame's size, bounded by the decoder's limits).
//!
//! Zero copy is kept: decoded frames are `Bytes` views into the allocation they were read into
//! and keep it alive themselves; swapping the buffer only drops this reference to it.
//!
//! *Carried* bytes: a stream may leave bytes of its own in the spare room right after the
//! buffered ones (TLS: the record cut by the end of a read, kept where it was read so that the
//! next read appends to it and the record opens in place). The decoder never sees them (they
//! are past `len`); taking frames from the front (`split_to`, `advance`) does not move them
//! relative to the end of the buffered bytes; reshaping the buffer keeps them right after the
//! buffered bytes; the room of a read is what is left after them, at least
//! [`MIN_CARRIED_READ_ROOM_BYTES`] while there are any.
//!
//! Sans-IO: the IO shell takes the buffer for a read with [`ReadBuffer::take_for_read`] and
//! gives it back with what the read returned ([`ReadBuffer::put_back`]).

use bytes::BytesMut;

/// Size of the buffer a caught-up connection reads into: its least room for a read. Holds a
/// heartbeat PING, an ACK or a small SEND whole.
pub const IDLE_READ_BUFFER_BYTES: usize = 512;

/// A partly buffered frame with less room than this behind it gets `busy_bytes` more.
pub const MIN_READ_ROOM_BYTES: usize = 128;

/// The least room a read gets while the stream carries bytes (the start of a TLS record): the
/// rest of the largest record fits, so the record need not be copied out to be completed.
pub const MIN_CARRIED_READ_ROOM_BYTES: usize = crate::tls::records::MAX_RECORD_BYTES;

/// A shrunken buffer is swapped again only when it is more than this many times what the
/// traffic needs (hysteresis, so that reads of varying size do not reallocate every time).
const SHRINK_FACTOR: usize = 2;

#[derive(Debug)]
pub struct ReadBuffer {
    bytes: BytesMut,
    /// Room a read gets while reads fill their room (`read_buffer_bytes`).
    busy_bytes: usize,
    /// Size of the allocation `bytes` views, as far as is known (an upper bound after growth).
    allocated_bytes: usize,
    /// Room the last read was given and bytes it returned.
    last_room_bytes: usize,
    last_read_bytes: usize,
    /// Initialized bytes of the stream's own in the spare room right after `bytes` (see the
    /// module doc), at most the spare room.
    carried_bytes: usize,
}

impl ReadBuffer {
    /// Wraps bytes already read (the upgrade request's buffer, or a handed-over connection's).
    pub fn new(bytes: BytesMut, busy_bytes: usize) -> ReadBuffer {
        ReadBuffer {
            allocated_bytes: bytes.capacity(),
            bytes,
            busy_bytes: busy_bytes.max(IDLE_READ_BUFFER_BYTES),
            last_room_bytes: 0,
            last_read_bytes: 0,
            carried_bytes: 0,
        }
    }

    /// Bytes read and not yet decoded; the decoder takes whole frames from the front.
    pub fn bytes_mut(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }

    /// The bytes held, to hand the connection over; a stream carries none before its split.
    pub fn into_bytes(self) -> BytesMut {
        assert_eq!(self.carried_bytes, 0, "carried bytes would be lost");
        self.bytes
    }

    /// Room in the buffer for the next read (capacity after the bytes held and carried).
    pub fn room_bytes(&self) -> usize {
        self.bytes.capacity() - self.bytes.len() - self.carried_bytes
    }

    /// Sizes the room for the next read (see the module doc) and takes the buffer out for it,
    /// with the count of carried bytes in its spare room. Until [`ReadBuffer::put_back`], this
    /// buffer is empty (a read cancelled by a timeout loses what was buffered, and its
    /// connection ends).
    pub fn take_for_read(&mut self) -> (BytesMut, usize) {
        self.prepare();
        self.last_room_bytes = self.room_bytes();
        // A read with no room returns 0, which the connection would take for end of stream.
        assert!(self.last_room_bytes > 0, "a read is always given room");
        (std::mem::take(&mut self.bytes), std::mem::take(&mut self.carried_bytes))
    }

    /// Puts the buffer back after a read that appended `read_bytes` to it and left
    /// `carried_bytes` of the stream's own in its spare room, right after them.
    ///
    /// A plain read appends at most its room. A TLS read may append more: it opens the record
    /// carried from the read before as well as what it read, and it may grow the buffer for a
    /// record longer than the room (`shard::tls_inplace`); such a read counts as one that
    /// filled its room.
    pub fn put_back(&mut self, bytes: BytesMut, read_bytes: usize, carried_bytes: usize) {
        debug_assert!(read_bytes <= bytes.len(), "a read appends at most what the buffer holds");
        assert!(carried_bytes <= bytes.capacity() - bytes.len(), "carried bytes lie in the spare room");
        self.bytes = bytes;
        self.last_read_bytes = read_bytes;
        self.carried_bytes = carried_bytes;
    }

    fn last_read_filled_its_room(&self) -> bool {
        self.last_room_bytes > 0 && self.last_read_bytes >= self.last_room_bytes
    }

    fn prepare(&mut self) {
        let room = self.room_bytes();
        if self.carried_bytes > 0 {
            if room < MIN_CARRIED_READ_ROOM_BYTES {
                self.grow(self.busy_bytes.max(MIN_CARRIED_READ_ROOM_BYTES));
            }
        } else if self.last_read_filled_its_room() {
            if room < self.busy_bytes {
                self.grow(self.busy_bytes);
            }
        } else if self.bytes.is_empty() {
            let idle_bytes = self.last_read_bytes.next_power_of_two().clamp(IDLE_READ_BUFFER_BYTES, self.busy_bytes);
            if self.allocated_bytes > SHRINK_FACTOR * idle_bytes
                || (room < idle_bytes && !self.bytes.try_reclaim(idle_bytes))
            {
                // Frames decoded from the old buffer keep it alive as long as they need it.
                self.bytes = BytesMut::with_capacity(idle_bytes);
                self.allocated_bytes = self.bytes.capacity();
            }
        } else if room < MIN_READ_ROOM_BYTES {
            self.grow(self.busy_bytes);
        }
    }

    /// Gives at least `room_bytes` of room after the bytes held and carried.
    fn grow(&mut self, room_bytes: usize) {
        assert!(self.carried_bytes <= self.bytes.capacity() - self.bytes.len(), "carried bytes lie in the spare room");
        // SAFETY: the carried bytes lie in the spare room right after the held ones (asserted)
        // and are initialized: a read wrote them (`put_back`), or a previous `grow` copied them,
        // and nothing wrote to the spare room since.
        unsafe { reserve_after_carried(&mut self.bytes, self.carried_bytes, room_bytes) };
        self.allocated_bytes = self.allocated_bytes.max(self.bytes.capacity());
    }
}

/// Gives `bytes` at least `room_bytes` of spare room after its contents and the
/// `carried_bytes` kept in its spare room right after them (see the module doc), which move with
/// the contents when the buffer is reallocated or its contents are moved to the front of the
/// allocation. The carried bytes stay in the spare room.
///
/// # Safety
///
/// The `carried_bytes` bytes right after the contents must be inside the allocation and
/// initialized.
pub unsafe fn reserve_after_carried(bytes: &mut BytesMut, carried_bytes: usize, room_bytes: usize) {
    let held = bytes.len();
    debug_assert!(carried_bytes <= bytes.capacity() - held);
    // SAFETY: initialized and inside the allocation (the caller's contract).
    unsafe { bytes.set_len(held + carried_bytes) };
    bytes.reserve(room_bytes);
    // Leaves the carried bytes where `reserve` put them, in the spare room again.
    bytes.truncate(held);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUSY: usize = 64 * 1024;

    /// One read of `arrived` bytes (capped at the room given); returns the room it was given.
    fn read(buffer: &mut ReadBuffer, arrived: usize) -> usize {
        let (mut bytes, carried) = buffer.take_for_read();
        assert_eq!(carried, 0);
        let room = bytes.capacity() - bytes.len();
        let read = arrived.min(room);
        bytes.extend_from_slice(&vec![7u8; read]);
        buffer.put_back(bytes, read, 0);
        room
    }

    /// The `carried` bytes in the spare room of `bytes` (as the TLS reader reads them).
    fn carried_in(bytes: &BytesMut, carried: usize) -> Vec<u8> {
        assert!(carried <= bytes.capacity() - bytes.len());
        // SAFETY: `len <= capacity`, so the result is inside (or one past) the allocation.
        let start = unsafe { bytes.as_ptr().add(bytes.len()) };
        // SAFETY: in the allocation (checked above); the tests wrote them before.
        unsafe { std::slice::from_raw_parts(start, carried) }.to_vec()
    }

    /// One read as a TLS stream does it: `plaintext` appended, then `carried` bytes (the start of
    /// a record cut by the read) left in the spare room after it.
    fn read_carrying(buffer: &mut ReadBuffer, plaintext: &[u8], carried: &[u8]) -> (usize, usize) {
        let (mut bytes, before) = buffer.take_for_read();
        let room = bytes.capacity() - bytes.len() - before;
        bytes.extend_from_slice(plaintext);
        let held = bytes.len();
        bytes.extend_from_slice(carried);
        bytes.truncate(held);
        buffer.put_back(bytes, plaintext.len(), carried.len());
        (room, before)
    }

    /// Takes every buffered byte, as the decoder does with whole frames.
    fn decode_all(buffer: &mut ReadBuffer) -> bytes::Bytes {
        let len = buffer.bytes_mut().len();
        buffer.bytes_mut().split_to(len).freeze()
    }

    #[test]
    fn a_caught_up_connection_holds_a_small_buffer() {
        let mut buffer = ReadBuffer::new(BytesMut::with_capacity(8 * 1024), BUSY);
        read(&mut buffer, 200); // the upgrade request
        decode_all(&mut buffer);
        assert_eq!(read(&mut buffer, 40), IDLE_READ_BUFFER_BYTES, "shrunk before the next read");
        decode_all(&mut buffer);
        let _ = buffer.take_for_read();
        assert!(buffer.allocated_bytes <= IDLE_READ_BUFFER_BYTES);
    }

    #[test]
    fn reads_that_fill_their_room_get_busy_bytes_and_shrink_once_caught_up() {
        let mut buffer = ReadBuffer::new(BytesMut::new(), BUSY);
        assert_eq!(read(&mut buffer, 100_000), IDLE_READ_BUFFER_BYTES);
        let frame = decode_all(&mut buffer);
        assert!(read(&mut buffer, 100_000) >= BUSY, "a full read means more is waiting");
        decode_all(&mut buffer);
        assert!(read(&mut buffer, 100) >= BUSY);
        decode_all(&mut buffer);
        // Caught up after a 100-byte read: back to the idle size, while a frame decoded
        // earlier still holds its own bytes.
        assert_eq!(read(&mut buffer, 10), IDLE_READ_BUFFER_BYTES);
        assert_eq!(frame, vec![7u8; IDLE_READ_BUFFER_BYTES]);
    }

    #[test]
    fn the_idle_size_follows_the_size_of_recent_reads() {
        let mut buffer = ReadBuffer::new(BytesMut::new(), BUSY);
        read(&mut buffer, 100_000);
        decode_all(&mut buffer);
        read(&mut buffer, 100_000);
        decode_all(&mut buffer);
        read(&mut buffer, 3000); // a 3000-byte message alone
        decode_all(&mut buffer);
        assert_eq!(read(&mut buffer, 3000), 4096, "the next one fits in one read");
    }

    #[test]
    fn a_partly_buffered_frame_gets_room_to_complete() {
        let mut buffer = ReadBuffer::new(BytesMut::new(), BUSY);
        read(&mut buffer, 100); // a partial frame, the read came back short
        assert_eq!(read(&mut buffer, 300), IDLE_READ_BUFFER_BYTES - 100, "enough room behind it");
        let room = read(&mut buffer, 100_000);
        assert!(room >= BUSY, "little room left behind the frame: grown");
        assert_eq!(buffer.bytes_mut().len(), 400 + room.min(100_000), "nothing buffered was lost");
    }

    /// A record cut by a read stays after the buffered bytes while the decoder takes frames
    /// from the front, when the buffer grows (moved with what is held), and when everything
    /// held was decoded; the next read gets room for the rest of a whole record after it.
    #[test]
    fn carried_bytes_survive_decoding_and_growth_and_get_room_for_a_whole_record() {
        let mut buffer = ReadBuffer::new(BytesMut::new(), BUSY);
        let record: Vec<u8> = (0..9_000u32).map(|byte| (byte % 251) as u8).collect();
        read(&mut buffer, 300);
        let (_, before) = read_carrying(&mut buffer, b"partial frame", &record[..5_000]);
        assert_eq!(before, 0);
        assert_eq!(carried_in(buffer.bytes_mut(), 5_000), record[..5_000], "kept after the plaintext");
        // The decoder takes a frame and leaves a partial one: the record stays right after it.
        let frame = buffer.bytes_mut().split_to(300);
        assert_eq!(carried_in(buffer.bytes_mut(), 5_000), record[..5_000]);
        // The next read: room for a whole record after the carried bytes (the buffer grew,
        // moving the partial frame and the carried bytes), and the carried bytes handed over.
        let (mut bytes, carried) = buffer.take_for_read();
        assert_eq!(carried, 5_000);
        assert!(bytes.capacity() - bytes.len() - carried >= MIN_CARRIED_READ_ROOM_BYTES);
        assert_eq!(&bytes[..], b"partial frame");
        assert_eq!(carried_in(&bytes, carried), record[..5_000]);
        // The stream opens the record (here: takes it as plaintext) and carries a new cut one.
        let held = bytes.len();
        // SAFETY: the carried bytes are initialized (checked just above).
        unsafe { bytes.set_len(held + carried) };
        bytes.extend_from_slice(&record[5_000..]);
        let plaintext_end = bytes.len();
        bytes.extend_from_slice(&record[..100]);
        bytes.truncate(plaintext_end);
        buffer.put_back(bytes, 9_000, 100);
        let everything = buffer.bytes_mut().len();
        let decoded = buffer.bytes_mut().split_to(everything);
        assert_eq!(&decoded[..13], b"partial frame");
        assert_eq!(decoded[13..], record[..]);
        assert_eq!(frame, vec![7u8; 300]);
        // Caught up but for the carried bytes: not shrunk below a whole record's room.
        let (room, before) = read_carrying(&mut buffer, b"", &[]);
        assert_eq!(before, 100);
        assert!(room >= MIN_CARRIED_READ_ROOM_BYTES);
    }

    #[test]
    fn a_tiny_busy_size_is_raised_to_the_idle_size() {
        let mut buffer = ReadBuffer::new(BytesMut::new(), 16);
        assert_eq!(read(&mut buffer, 10), IDLE_READ_BUFFER_BYTES);
    }
}
