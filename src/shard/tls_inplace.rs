//! TLS with the in-place record layer (`--tls-records in-place`, the default): rustls's
//! `UnbufferedServerConnection` does the handshake, [`crate::tls::records`] the records.
//!
//! Reading: the socket reads straight into the reader's buffer (the WebSocket decoder's) and
//! each whole record is opened there, its plaintext moved up against the one before in the same
//! pass as the decryption: no copy. After the split, the record cut by the end of a read stays
//! where it was read, in that buffer's spare room after the plaintext (the buffer's owner keeps
//! it there: `ReadTail::carried`, `ReadBuffer`'s carried bytes), the next read appends to it,
//! and it opens where it lies; the buffer is grown, never the record copied out, when the rest
//! of the record does not fit. Before the split (the connection may still move to another
//! shard with its buffered bytes only), the cut record waits in the connection's `Inbox` and is
//! put back in front of the next read, and when the reader's buffer is too small for the record
//! the socket reads into the inbox and each whole record's plaintext is copied once into the
//! reader's buffer. rustls's buffered connection copies every byte three times (into its
//! deframer, into its plaintext queue, out to the reader).
//!
//! Writing: each record is sealed in place at the end of one write buffer: its plaintext is
//! copied there once from the batch's iovecs and encrypted where it lies (the only copy on the
//! way out), until [`TLS_WRITE_BYTES`] are ready; then one socket write of the buffer.
//!
//! The handshake runs in the stream before the split (as for the buffered connection), inside
//! the upgrade's `handshake_timeout`; its buffer is bounded by [`MAX_HANDSHAKE_BUFFER_BYTES`].
//! After the split the reader and the writer share the [`RecordLayer`] in an `Rc<RefCell<..>>`,
//! borrowed only between awaits. Only the writer writes to the socket: what the reader seals
//! (the answer to a KeyUpdate, an alert) leaves ahead of the next batch, or at shutdown.
//!
//! Bounds: the inbox holds at most [`TLS_READ_BYTES`] plus one record ([`MAX_RECORD_BYTES`]);
//! an idle connection's shrinks back to [`TLS_IDLE_READ_BYTES`] plus the record it waits for.
//! A record carried in the reader's buffer grows it by at most one record beyond the room its
//! owner gave.

use std::cell::RefCell;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::BytesMut;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError};

use super::connection::ReadTail;
use super::transport::{
    write_sealed_batch, Outgoing, ReadSide, Stream, TlsState, WriteSide, TLS_IDLE_READ_BYTES, TLS_READ_BYTES,
    TLS_WRITE_BYTES,
};
use crate::conn::outbound::WriteBatch;
use crate::conn::read_buffer::reserve_after_carried;
use crate::tls::records::{self, Fatal, Opened, RecordLayer, MAX_RECORD_BYTES};

/// The most ciphertext the handshake may hold while rustls waits for a whole handshake message
/// (the largest is 64 KiB, rustls's own limit, cut in records).
pub const MAX_HANDSHAKE_BUFFER_BYTES: usize = 80 * 1024;

/// A session's state that outlives a move between shards.
pub struct InPlaceState {
    session: Session,
    inbox: Inbox,
}

impl InPlaceState {
    pub fn new(connection: UnbufferedServerConnection) -> InPlaceState {
        InPlaceState { session: Session::Handshaking(Box::new(connection)), inbox: Inbox::new() }
    }

    /// Ciphertext read but not yet opened (for `Debug`).
    pub fn unread_bytes(&self) -> usize {
        self.inbox.unread().len()
    }
}

enum Session {
    Handshaking(Box<UnbufferedServerConnection>),
    Traffic(Box<RecordLayer>),
    /// The handshake failed, or the session was taken apart.
    Ended,
}

/// Ciphertext read from the socket, decrypted in place record by record. `buf[start..]` is not
/// yet opened; `plain` is decrypted plaintext (inside `buf[..start]`) not yet handed out;
/// `early` is plaintext rustls decrypted during the handshake (the client's first bytes, sent
/// with its Finished).
///
/// The record cut by the end of a read straight into the reader's buffer (the *tail*) stays
/// where it was read when the tail's owner keeps it ([`ReadTail::carried`]): `tail_carried`
/// bytes in the tail's spare room right after its plaintext, the record starting `tail_gap`
/// bytes in (the headers and tags of the records opened before it). Meanwhile the inbox holds
/// no ciphertext, and no plaintext to hand out: the next read appends to the record and it
/// opens where it lies, shifted down onto the plaintext.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    plain: Range<usize>,
    early: Vec<u8>,
    /// The record that ended the session, reported once the plaintext before it is handed out.
    failed: Option<Fatal>,
    last_read_busy: bool,
    tail_carried: usize,
    tail_gap: usize,
}

/// Where the next socket read goes ([`Inbox::plan_read`]).
#[derive(Debug, PartialEq, Eq)]
enum ReadInto {
    /// Straight into the reader's buffer, records opened there.
    Tail,
    /// Into the inbox, plaintext copied out.
    Inbox,
}

/// What [`Inbox::fill`] got.
#[derive(Debug, PartialEq, Eq)]
enum Filled {
    /// Plaintext appended to the reader's buffer.
    Bytes(usize),
    /// The peer's close_notify, or nothing more will come.
    Ended,
    /// Everything read is opened: read the socket again.
    NeedCiphertext,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            buf: Vec::new(),
            start: 0,
            plain: 0..0,
            early: Vec::new(),
            failed: None,
            last_read_busy: false,
            tail_carried: 0,
            tail_gap: 0,
        }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Copies plaintext into `out` (as much as its spare capacity takes), opening records as
    /// needed. A record that ends the session is reported after the plaintext before it.
    fn fill(&mut self, layer: &mut RecordLayer, out: &mut BytesMut) -> Result<Filled, Fatal> {
        assert!(out.capacity() > out.len(), "a read is always given room");
        // Appending to `out` would overwrite a record carried in its spare room.
        debug_assert!(
            self.tail_carried == 0
                || (self.failed.is_none()
                    && self.early.is_empty()
                    && self.plain.is_empty()
                    && self.unread().is_empty()),
            "the inbox has nothing to hand out while the tail carries a record"
        );
        if let Some(fatal) = self.failed.take() {
            return Err(fatal);
        }
        let mut appended = self.hand_out_early(out);
        match self.open_into(layer, out, &mut appended) {
            Err(fatal) if appended > 0 => self.failed = Some(fatal),
            Err(fatal) => return Err(fatal),
            Ok(()) => {}
        }
        Ok(match appended {
            0 if layer.peer_closed() => Filled::Ended,
            0 => Filled::NeedCiphertext,
            appended => Filled::Bytes(appended),
        })
    }

    fn open_into(&mut self, layer: &mut RecordLayer, out: &mut BytesMut, appended: &mut usize) -> Result<(), Fatal> {
        loop {
            *appended += self.hand_out_plain(out);
            if out.capacity() == out.len() || layer.peer_closed() {
                break;
            }
            let next = records::next_record(self.unread()).inspect_err(|fatal| layer.refuse(fatal))?;
            let Some((header, payload)) = next else {
                break;
            };
            let payload = self.start + payload.start..self.start + payload.end;
            self.start = payload.end;
            let to = payload.start;
            match layer.open(header, &mut self.buf, payload, to)? {
                Opened::Data(range) => self.plain = range,
                Opened::Nothing => {}
                Opened::Closed => break,
            }
        }
        Ok(())
    }

    fn hand_out_early(&mut self, out: &mut BytesMut) -> usize {
        if self.early.is_empty() {
            return 0;
        }
        let taken = self.early.len().min(out.capacity() - out.len());
        out.extend_from_slice(&self.early[..taken]);
        self.early.drain(..taken);
        taken
    }

    fn hand_out_plain(&mut self, out: &mut BytesMut) -> usize {
        let taken = self.plain.len().min(out.capacity() - out.len());
        out.extend_from_slice(&self.buf[self.plain.start..self.plain.start + taken]);
        self.plain.start += taken;
        taken
    }

    /// Where the next read goes: into the reader's `tail` when its room (after a record it
    /// carries) holds the rest of the record that comes next (all of it when the inbox holds its
    /// start, a header when nothing of it was read), so that records are opened where they were
    /// read; else into the inbox. When the tail's owner keeps a cut record
    /// (`keep_cut_in_tail`), the tail is given that room instead (as its owner grows it for a
    /// partly read record), so that a record once read into it is never copied out. Called once
    /// everything in the inbox that can be handed out has been.
    fn plan_read(&self, tail: &mut BytesMut, keep_cut_in_tail: bool) -> ReadInto {
        debug_assert!(self.plain.is_empty() && self.early.is_empty() && self.failed.is_none());
        let started =
            if self.tail_carried > 0 { &carried_in(tail, self.tail_carried)[self.tail_gap..] } else { self.unread() };
        let rest = match records::parse_header(started) {
            Ok(Some(header)) => (records::HEADER_BYTES + header.len).saturating_sub(started.len()),
            _ => records::HEADER_BYTES.saturating_sub(started.len()),
        };
        let wanted = rest.max(1) + if self.tail_carried > 0 { 0 } else { started.len() };
        if tail.capacity() - tail.len() - self.tail_carried >= wanted {
            return ReadInto::Tail;
        }
        if !keep_cut_in_tail {
            return ReadInto::Inbox;
        }
        // At most one record (`MAX_RECORD_BYTES`) beyond the room the owner gave.
        debug_assert!(wanted <= records::MAX_RECORD_BYTES);
        // SAFETY: the carried bytes lie in the spare room right after the contents (checked by
        // `carried_in` above) and are initialized (see `carry_into`).
        unsafe { reserve_after_carried(tail, self.tail_carried, wanted) };
        ReadInto::Tail
    }

    /// Gets the tail ready for a read straight into it: the record it carries, if any, becomes
    /// part of its contents again (no copy), or the unopened ciphertext of the inbox (the start
    /// of a record) is moved to its end. Returns where the tail's plaintext ends, where
    /// [`Inbox::open_in_tail`] begins.
    fn carry_into(&mut self, tail: &mut BytesMut) -> usize {
        let from = tail.len();
        if self.tail_carried > 0 {
            assert!(self.unread().is_empty(), "a record is carried in the tail or in the inbox, not both");
            assert!(self.tail_carried <= tail.capacity() - from, "the carried record lies in the spare room");
            // SAFETY: the carried bytes lie in the spare room right after the contents (checked
            // above) and are initialized: a read wrote them, and their owner kept them there
            // (`ReadTail::carried`), moving them with the contents when it reshaped the buffer.
            unsafe { tail.set_len(from + self.tail_carried) };
        } else {
            tail.extend_from_slice(self.unread());
            self.buf.clear();
            self.start = 0;
            self.plain = 0..0;
        }
        from
    }

    /// Moves a record carried in the tail's spare room into the inbox (a copy), when the next
    /// read cannot go into the tail.
    fn take_carried(&mut self, tail: &BytesMut) {
        if self.tail_carried == 0 {
            return;
        }
        assert!(self.unread().is_empty(), "a record is carried in the tail or in the inbox, not both");
        let record = &carried_in(tail, self.tail_carried)[self.tail_gap..];
        self.buf.clear();
        self.start = 0;
        self.plain = 0..0;
        self.buf.extend_from_slice(record);
        self.tail_carried = 0;
        self.tail_gap = 0;
    }

    /// Opens the whole records in `tail[from..]` (ciphertext read into the tail, after the
    /// record it carried, if any) where they lie, each one's plaintext moved up against the one
    /// before (ring decrypts and moves in one pass), so the tail ends with plaintext only; the
    /// record cut by the end of the read stays in the tail's spare room (`keep_cut_in_tail`: its
    /// owner keeps it there) or goes to the inbox. A record that ends the session is reported
    /// after the plaintext before it, as [`Inbox::fill`] does.
    fn open_in_tail(
        &mut self,
        layer: &mut RecordLayer,
        tail: &mut BytesMut,
        from: usize,
        keep_cut_in_tail: bool,
    ) -> Result<Filled, Fatal> {
        debug_assert!(self.unread().is_empty(), "the inbox's ciphertext was carried into the tail");
        let read = tail.len() - from - self.tail_carried;
        let (mut read_at, mut write_at) = (from + self.tail_gap, from);
        (self.tail_carried, self.tail_gap) = (0, 0);
        let mut failed = None;
        while !layer.peer_closed() {
            let next = match records::next_record(&tail[read_at..]) {
                Ok(next) => next,
                Err(fatal) => {
                    layer.refuse(&fatal);
                    failed = Some(fatal);
                    break;
                }
            };
            let Some((header, payload)) = next else {
                break;
            };
            let payload = read_at + payload.start..read_at + payload.end;
            read_at = payload.end;
            match layer.open(header, &mut tail[..], payload, write_at) {
                Ok(Opened::Data(range)) => write_at = range.end,
                Ok(Opened::Nothing | Opened::Closed) => {}
                Err(fatal) => {
                    failed = Some(fatal);
                    break;
                }
            }
        }
        if failed.is_none() && !layer.peer_closed() && read_at < tail.len() {
            if keep_cut_in_tail {
                // Left where it was read: `truncate` below keeps the bytes in the spare room.
                (self.tail_carried, self.tail_gap) = (tail.len() - write_at, read_at - write_at);
            } else {
                self.buf.extend_from_slice(&tail[read_at..]);
            }
        }
        self.last_read_busy = read >= TLS_IDLE_READ_BYTES;
        if self.buf.is_empty() && !self.last_read_busy && self.buf.capacity() > 2 * TLS_IDLE_READ_BYTES {
            // An idle connection lets a large carried record's buffer go.
            self.buf = Vec::new();
        }
        tail.truncate(write_at);
        let appended = write_at - from;
        match failed {
            Some(fatal) if appended == 0 => Err(fatal),
            Some(fatal) => {
                self.failed = Some(fatal);
                Ok(Filled::Bytes(appended))
            }
            None if appended > 0 => Ok(Filled::Bytes(appended)),
            None if layer.peer_closed() => Ok(Filled::Ended),
            None => Ok(Filled::NeedCiphertext),
        }
    }

    /// Reads once from the socket after the unopened ciphertext (moved to the front), with room
    /// for the traffic ([`TLS_READ_BYTES`] busy, [`TLS_IDLE_READ_BYTES`] idle) and at least the
    /// rest of the record it holds the start of. `Ok(0)` is the end of the stream.
    async fn read_from<R: AsyncReadRent>(&mut self, socket: &mut R, bound: usize) -> io::Result<usize> {
        assert!(self.plain.is_empty() && self.early.is_empty(), "the socket is read once all plaintext is handed out");
        let unread = self.buf.len() - self.start;
        let record = match records::parse_header(self.unread()) {
            Ok(Some(header)) => records::HEADER_BYTES + header.len,
            _ => records::HEADER_BYTES,
        };
        let traffic = if self.last_read_busy { TLS_READ_BYTES } else { TLS_IDLE_READ_BYTES };
        let room = traffic.max(record.saturating_sub(unread));
        if unread + room > bound {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS handshake messages larger than the broker accepts",
            ));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.copy_within(self.start.., 0);
        buf.truncate(unread);
        if unread == 0 && !self.last_read_busy && buf.capacity() > 2 * TLS_IDLE_READ_BYTES {
            // An idle connection lets its large buffer go.
            buf = Vec::new();
        }
        buf.reserve(room);
        self.start = 0;
        self.plain = 0..0;
        let (result, slice) = socket.read(buf.slice_mut(unread..unread + room)).await;
        self.buf = slice.into_inner();
        self.last_read_busy = self.buf.len() - unread >= TLS_IDLE_READ_BYTES;
        result
    }
}

/// The `carried` bytes in `tail`'s spare room right after its contents.
fn carried_in(tail: &BytesMut, carried: usize) -> &[u8] {
    assert!(carried <= tail.capacity() - tail.len(), "the carried record lies in the spare room");
    // SAFETY: `len <= capacity`, so the result is inside (or one past) the allocation.
    let start = unsafe { tail.as_ptr().add(tail.len()) };
    // SAFETY: the range is inside the allocation (checked above) and initialized: a read wrote
    // it, and the tail's owner kept it there (`ReadTail::carried`); the shared borrow of `tail`
    // keeps anything from writing to it while the slice lives.
    unsafe { std::slice::from_raw_parts(start, carried) }
}

/// What one round of the handshake left to do.
enum Handshake {
    /// Read the socket again.
    NeedCiphertext,
    /// rustls is done: hand the session to the record layer.
    Ready,
    /// The peer closed, or the handshake failed (its alert, if any, is in the output).
    Ended(Option<rustls::Error>),
}

/// Drives rustls's handshake over the inbox's ciphertext; appends what it sends to `out` and
/// what the client sent after its Finished to the inbox's early plaintext.
fn drive_handshake(connection: &mut UnbufferedServerConnection, inbox: &mut Inbox, out: &mut Vec<u8>) -> Handshake {
    loop {
        let status = connection.process_tls_records(&mut inbox.buf[inbox.start..]);
        let mut discard = status.discard;
        let state = match status.state {
            Ok(state) => state,
            Err(error) => {
                inbox.start += discard;
                // rustls queued its alert: one more round hands it out.
                if let Ok(ConnectionState::EncodeTlsData(mut data)) = connection.process_tls_records(&mut []).state {
                    let _ = encode(|buf| data.encode(buf), out);
                }
                return Handshake::Ended(Some(error));
            }
        };
        let finished = match state {
            ConnectionState::EncodeTlsData(mut data) => encode(|buf| data.encode(buf), out).err(),
            ConnectionState::TransmitTlsData(transmit) => {
                // `out` is written before the socket is read again (or the layer takes over).
                transmit.done();
                None
            }
            ConnectionState::ReadTraffic(mut traffic) => {
                let mut failed = None;
                while let Some(record) = traffic.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            inbox.early.extend_from_slice(record.payload);
                        }
                        Err(error) => {
                            failed = Some(Handshake::Ended(Some(error)));
                            break;
                        }
                    }
                }
                failed
            }
            ConnectionState::BlockedHandshake => Some(Handshake::NeedCiphertext),
            ConnectionState::WriteTraffic(_) => Some(Handshake::Ready),
            ConnectionState::PeerClosed | ConnectionState::Closed => Some(Handshake::Ended(None)),
            _ => Some(Handshake::Ended(Some(rustls::Error::General("an unexpected TLS state".into())))),
        };
        inbox.start += discard;
        assert!(inbox.start <= inbox.buf.len(), "rustls discards only what it was given");
        match finished {
            // A TLS 1.3 server may write once its own Finished is out, but the handshake ends
            // with the client's.
            Some(Handshake::Ready) if connection.is_handshaking() => return Handshake::NeedCiphertext,
            Some(finished) => return finished,
            None => {}
        }
    }
}

/// Appends one handshake record rustls encodes to `out`.
fn encode(mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>, out: &mut Vec<u8>) -> Result<(), Handshake> {
    let start = out.len();
    out.resize(start + MAX_RECORD_BYTES, 0);
    let result = match encode(&mut out[start..]) {
        Err(EncodeError::InsufficientSize(needed)) => {
            out.resize(start + needed.required_size, 0);
            encode(&mut out[start..])
        }
        result => result,
    };
    match result {
        Ok(written) => {
            out.truncate(start + written);
            Ok(())
        }
        Err(error) => {
            out.truncate(start);
            Err(Handshake::Ended(Some(rustls::Error::General(format!("cannot encode a handshake record: {error}")))))
        }
    }
}

/// Turns rustls's finished connection into the record layer.
fn take_over(connection: UnbufferedServerConnection) -> io::Result<Box<RecordLayer>> {
    let (secrets, kernel) = connection.dangerous_into_kernel_connection().map_err(invalid_data)?;
    RecordLayer::new(secrets, kernel).map(Box::new).map_err(invalid_data)
}

/// rustls's error, kept whole: the connection logs its reason for a failed handshake.
fn invalid_data(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

fn fatal_error(fatal: Fatal) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {}", fatal.reason))
}

/// Gives `tail` plaintext, reading the socket when it needs more; the reader's loop (the
/// handshake is over). Records are read straight into the tail's spare room and opened there,
/// shifted to close the gaps their headers and tags leave, when it has room for them
/// ([`Inbox::plan_read`]); otherwise into the inbox, whose plaintext is then copied. The record
/// cut by the end of a read stays in the tail when `keep_cut_in_tail` (its owner keeps it,
/// [`ReadTail::carried`]), else it waits in the inbox.
async fn read_records<R: AsyncReadRent>(
    layer: &RefCell<RecordLayer>,
    inbox: &mut Inbox,
    socket: &mut R,
    tail: &mut BytesMut,
    keep_cut_in_tail: bool,
) -> io::Result<usize> {
    loop {
        let filled = inbox.fill(&mut layer.borrow_mut(), tail).map_err(fatal_error)?;
        match filled {
            Filled::Bytes(read) => return Ok(read),
            Filled::Ended => return Ok(0),
            Filled::NeedCiphertext => {}
        }
        let read = if inbox.plan_read(tail, keep_cut_in_tail) == ReadInto::Tail {
            let from = inbox.carry_into(tail);
            let (result, buf) = socket.read(ReadTail::new(std::mem::take(tail))).await;
            *tail = buf.bytes;
            match result {
                Ok(read) if read > 0 => {
                    match inbox
                        .open_in_tail(&mut layer.borrow_mut(), tail, from, keep_cut_in_tail)
                        .map_err(fatal_error)?
                    {
                        Filled::Bytes(read) => return Ok(read),
                        Filled::Ended => return Ok(0),
                        Filled::NeedCiphertext => continue,
                    }
                }
                result => {
                    // The carried ciphertext is not the reader's: it goes before the result
                    // (back to the spare room, if it was carried there).
                    tail.truncate(from);
                    result?
                }
            }
        } else {
            inbox.take_carried(tail);
            inbox.read_from(socket, usize::MAX).await?
        };
        if read == 0 {
            // The end of the stream, with or without a close_notify first.
            return Ok(0);
        }
    }
}

/// Seals the front of `batch` into `ciphertext` (after what the reader queued), one record of
/// up to 16 KiB at a time, until [`TLS_WRITE_BYTES`] are ready or the batch is done. Returns
/// the plaintext bytes taken.
fn seal_some(layer: &mut RecordLayer, batch: &mut WriteBatch, ciphertext: &mut Vec<u8>) -> io::Result<usize> {
    layer.take_queued(ciphertext);
    let mut taken_total = 0;
    while !batch.is_done() && ciphertext.len() < TLS_WRITE_BYTES {
        let taken = layer.seal_application_data(batch.remaining_io_slices(), ciphertext).map_err(fatal_error)?;
        assert!(taken > 0, "a batch that is not done has bytes to seal");
        batch.advance(taken);
        taken_total += taken;
    }
    Ok(taken_total)
}

/// Seals and writes `batch` over `socket` (see [`write_sealed_batch`]).
async fn write_batch_records<W: AsyncWriteRent>(
    layer: &RefCell<RecordLayer>,
    socket: &mut W,
    outgoing: &mut Outgoing,
    batch: WriteBatch,
) -> (io::Result<()>, WriteBatch) {
    write_sealed_batch(socket, outgoing, batch, |batch, ciphertext| {
        seal_some(&mut layer.borrow_mut(), batch, ciphertext)
    })
    .await
}

/// Seals `bytes` (the rare paths: upgrade answers, refusals) and writes them.
async fn write_bytes_records<W: AsyncWriteRent>(
    layer: &RefCell<RecordLayer>,
    socket: &mut W,
    bytes: &[u8],
) -> io::Result<()> {
    let mut ciphertext = Vec::new();
    {
        let mut layer = layer.borrow_mut();
        layer.take_queued(&mut ciphertext);
        let mut rest = bytes;
        while !rest.is_empty() {
            let taken = layer.seal_application_data(&[io::IoSlice::new(rest)], &mut ciphertext).map_err(fatal_error)?;
            rest = &rest[taken..];
        }
    }
    socket.write_all(ciphertext).await.0.map(drop)
}

/// Sends what the reader queued and a close_notify, then shuts the socket's writing side.
async fn shutdown_records<W: AsyncWriteRent>(layer: &RefCell<RecordLayer>, socket: &mut W) {
    let mut ciphertext = Vec::new();
    {
        let mut layer = layer.borrow_mut();
        layer.take_queued(&mut ciphertext);
        layer.close_notify(&mut ciphertext);
    }
    if !ciphertext.is_empty() {
        let _ = socket.write_all(ciphertext).await;
    }
    let _ = AsyncWriteRent::shutdown(socket).await;
}

/// A TLS connection before the split: it drives the handshake while it reads.
pub struct InPlaceStream {
    socket: TcpStream,
    session: StreamSession,
    inbox: Inbox,
    outgoing: Outgoing,
}

enum StreamSession {
    Handshaking(Box<UnbufferedServerConnection>),
    Traffic(Rc<RefCell<RecordLayer>>),
    Ended,
}

impl InPlaceStream {
    pub fn new(socket: TcpStream, state: InPlaceState) -> InPlaceStream {
        let session = match state.session {
            Session::Handshaking(connection) => StreamSession::Handshaking(connection),
            Session::Traffic(layer) => StreamSession::Traffic(Rc::new(RefCell::new(*layer))),
            Session::Ended => StreamSession::Ended,
        };
        InPlaceStream { socket, session, inbox: state.inbox, outgoing: Outgoing::default() }
    }

    /// Runs the handshake until rustls is done (then the record layer takes over), the client
    /// has sent plaintext with its Finished, or the session ended.
    async fn handshake(&mut self) -> io::Result<()> {
        loop {
            let StreamSession::Handshaking(connection) = &mut self.session else {
                return Ok(());
            };
            let mut out = Vec::new();
            let step = drive_handshake(connection, &mut self.inbox, &mut out);
            if !out.is_empty() {
                self.socket.write_all(out).await.0?;
            }
            match step {
                Handshake::NeedCiphertext => {}
                Handshake::Ready => {
                    let StreamSession::Handshaking(connection) =
                        std::mem::replace(&mut self.session, StreamSession::Ended)
                    else {
                        unreachable!("the session was handshaking a moment ago");
                    };
                    self.session = StreamSession::Traffic(Rc::new(RefCell::new(*take_over(*connection)?)));
                    return Ok(());
                }
                Handshake::Ended(error) => {
                    self.session = StreamSession::Ended;
                    return match error {
                        Some(error) => Err(invalid_data(error)),
                        None => Ok(()),
                    };
                }
            }
            if !self.inbox.early.is_empty() {
                return Ok(());
            }
            if self.inbox.read_from(&mut self.socket, MAX_HANDSHAKE_BUFFER_BYTES).await? == 0 {
                self.session = StreamSession::Ended;
                return Ok(());
            }
        }
    }
}

impl ReadSide for InPlaceStream {
    async fn read_tail(&mut self, mut tail: ReadTail) -> BufResult<usize, ReadTail> {
        if let Err(error) = self.handshake().await {
            return (Err(error), tail);
        }
        let early = self.inbox.hand_out_early(&mut tail.bytes);
        if early > 0 {
            return (Ok(early), tail);
        }
        let result = match &self.session {
            // Before the split the connection may move to another shard with its buffered
            // bytes only: no record is left in the tail's spare room.
            StreamSession::Traffic(layer) => {
                read_records(layer, &mut self.inbox, &mut self.socket, &mut tail.bytes, false).await
            }
            StreamSession::Handshaking(_) | StreamSession::Ended => Ok(0),
        };
        (result, tail)
    }
}

impl WriteSide for InPlaceStream {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        match &self.session {
            StreamSession::Traffic(layer) => write_bytes_records(layer, &mut self.socket, &bytes).await,
            _ => Err(io::Error::new(io::ErrorKind::NotConnected, "TLS: no session to write in")),
        }
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        match &self.session {
            StreamSession::Traffic(layer) => {
                write_batch_records(layer, &mut self.socket, &mut self.outgoing, batch).await
            }
            _ => (Err(io::Error::new(io::ErrorKind::NotConnected, "TLS: no session to write in")), batch),
        }
    }

    async fn shutdown(&mut self) {
        match &self.session {
            StreamSession::Traffic(layer) => shutdown_records(layer, &mut self.socket).await,
            _ => {
                let _ = AsyncWriteRent::shutdown(&mut self.socket).await;
            }
        }
    }
}

impl Stream for InPlaceStream {
    type Reader = InPlaceReader;
    type Writer = InPlaceWriter;

    fn socket(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn into_split(self) -> (InPlaceReader, InPlaceWriter) {
        let layer = match self.session {
            StreamSession::Traffic(layer) => Some(layer),
            // A connection is split once it has read its upgrade request, which only a finished
            // handshake yields; a session that ended splits into sides that end at once.
            StreamSession::Handshaking(_) | StreamSession::Ended => None,
        };
        let (reader, writer) = Splitable::into_split(self.socket);
        (
            InPlaceReader { socket: reader, layer: layer.clone(), inbox: self.inbox },
            InPlaceWriter { socket: writer, layer, outgoing: self.outgoing },
        )
    }

    fn into_parts(self) -> (TcpStream, Option<Box<TlsState>>) {
        let session = match self.session {
            StreamSession::Handshaking(connection) => Session::Handshaking(connection),
            StreamSession::Traffic(layer) => Session::Traffic(Box::new(
                Rc::try_unwrap(layer)
                    .unwrap_or_else(|_| unreachable!("an unsplit stream is the only holder of its record layer"))
                    .into_inner(),
            )),
            StreamSession::Ended => Session::Ended,
        };
        (self.socket, Some(Box::new(TlsState::InPlace(InPlaceState { session, inbox: self.inbox }))))
    }
}

/// The reading task's side.
pub struct InPlaceReader {
    socket: OwnedReadHalf<TcpStream>,
    layer: Option<Rc<RefCell<RecordLayer>>>,
    inbox: Inbox,
}

impl ReadSide for InPlaceReader {
    async fn read_tail(&mut self, mut tail: ReadTail) -> BufResult<usize, ReadTail> {
        let early = self.inbox.hand_out_early(&mut tail.bytes);
        if early > 0 {
            return (Ok(early), tail);
        }
        let keep_cut_in_tail = match tail.carried {
            Some(carried) => {
                assert_eq!(carried, self.inbox.tail_carried, "the reader's buffer kept the carried record");
                true
            }
            None => {
                assert_eq!(self.inbox.tail_carried, 0, "a tail with a carried record is the reader's buffer");
                false
            }
        };
        let result = match &self.layer {
            Some(layer) => {
                read_records(layer, &mut self.inbox, &mut self.socket, &mut tail.bytes, keep_cut_in_tail).await
            }
            None => Ok(0),
        };
        if keep_cut_in_tail {
            tail.carried = Some(self.inbox.tail_carried);
        }
        (result, tail)
    }
}

/// The writing task's side: the only side that writes to the socket.
pub struct InPlaceWriter {
    socket: OwnedWriteHalf<TcpStream>,
    layer: Option<Rc<RefCell<RecordLayer>>>,
    outgoing: Outgoing,
}

impl WriteSide for InPlaceWriter {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        match &self.layer {
            Some(layer) => write_bytes_records(layer, &mut self.socket, &bytes).await,
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "TLS: no session to write in")),
        }
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        match &self.layer {
            Some(layer) => write_batch_records(layer, &mut self.socket, &mut self.outgoing, batch).await,
            None => (Err(io::Error::new(io::ErrorKind::NotConnected, "TLS: no session to write in")), batch),
        }
    }

    async fn shutdown(&mut self) {
        match &self.layer {
            Some(layer) => shutdown_records(layer, &mut self.socket).await,
            None => {
                let _ = AsyncWriteRent::shutdown(&mut self.socket).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use rustls::{AlertDescription, ClientConfig, ClientConnection, RootCertStore};

    use super::*;
    use crate::shard::transport::tests::certificate_files;
    use crate::tls::TlsContext;

    const VERSIONS: [&rustls::SupportedProtocolVersion; 2] = [&rustls::version::TLS13, &rustls::version::TLS12];

    /// A rustls client (its defaults, limited to `version`) and the broker's side after an
    /// in-memory handshake through [`drive_handshake`] and [`take_over`], with the broker's own
    /// TLS configuration.
    fn handshaken(version: &'static rustls::SupportedProtocolVersion) -> (ClientConnection, RecordLayer, Inbox) {
        handshaken_with(version, rustls::crypto::ring::default_provider())
    }

    /// As [`handshaken`], the client offering `suite` alone.
    fn handshaken_in(suite: rustls::SupportedCipherSuite) -> (ClientConnection, RecordLayer, Inbox) {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        handshaken_with(suite.version(), provider)
    }

    fn handshaken_with(
        version: &'static rustls::SupportedProtocolVersion,
        provider: rustls::crypto::CryptoProvider,
    ) -> (ClientConnection, RecordLayer, Inbox) {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mbws-inplace-test-{}-{call}", std::process::id()));
        let files = certificate_files(&dir);
        let cert = CertificateDer::from_pem_file(&files.cert).unwrap();
        let context = TlsContext::load(files).unwrap();
        let _ = std::fs::remove_dir_all(dir);
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client_config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(client_config), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut server = UnbufferedServerConnection::new(context.server_config()).unwrap();
        let mut inbox = Inbox::new();
        for _ in 0..10 {
            inbox.buf.extend(client_output(&mut client));
            let mut out = Vec::new();
            let step = drive_handshake(&mut server, &mut inbox, &mut out);
            client_input(&mut client, &out).unwrap();
            match step {
                Handshake::NeedCiphertext => {}
                Handshake::Ready => {
                    assert!(!client.is_handshaking(), "{version:?}: the client finished too");
                    return (client, *take_over(server).unwrap(), inbox);
                }
                Handshake::Ended(error) => panic!("{version:?}: the handshake ended: {error:?}"),
            }
        }
        panic!("{version:?}: the in-memory handshake did not finish in 10 rounds");
    }

    fn client_output(client: &mut ClientConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Gives the client the broker's records; returns the plaintext they held.
    fn client_input(client: &mut ClientConnection, mut wire: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let mut plaintext = Vec::new();
        while !wire.is_empty() {
            client.read_tls(&mut wire).unwrap();
            client.process_new_packets()?;
            let _ = client.reader().read_to_end(&mut plaintext);
        }
        Ok(plaintext)
    }

    /// Gives the inbox `wire` in pieces of 1 to 700 bytes and takes the plaintext out 100
    /// bytes at a time, as reads of any length ending anywhere would.
    fn feed_in_pieces(layer: &mut RecordLayer, inbox: &mut Inbox, wire: &[u8]) -> Result<Vec<u8>, Fatal> {
        let (mut received, mut offset, mut step) = (Vec::new(), 0, 0usize);
        while offset < wire.len() {
            step = (step * 7 + 13) % 700 + 1;
            let end = (offset + step).min(wire.len());
            inbox.buf.extend_from_slice(&wire[offset..end]);
            offset = end;
            loop {
                let mut out = BytesMut::with_capacity(100);
                match inbox.fill(layer, &mut out)? {
                    Filled::Bytes(read) => {
                        assert_eq!(read, out.len());
                        received.extend_from_slice(&out);
                    }
                    Filled::NeedCiphertext => break,
                    Filled::Ended => return Ok(received),
                }
            }
        }
        Ok(received)
    }

    /// How the reads of [`feed_as_reads`] went.
    #[derive(Debug, Default)]
    struct Reads {
        into_tail: usize,
        into_inbox: usize,
        /// Reads after which a cut record stayed in the reader's buffer's spare room.
        carried_in_tail: usize,
    }

    /// `read_records` over a socket that hands out `wire` in reads of 1 to 20,000 bytes (at
    /// most the room), `step` driving their lengths. Ok(0) once `wire` is all read.
    fn read_records_from(
        layer: &mut RecordLayer,
        inbox: &mut Inbox,
        tail: &mut BytesMut,
        keep_cut_in_tail: bool,
        (wire, step): (&mut &[u8], &mut usize),
        reads: &mut Reads,
    ) -> Result<usize, Fatal> {
        loop {
            match inbox.fill(layer, tail)? {
                Filled::Bytes(read) => return Ok(read),
                Filled::Ended => return Ok(0),
                Filled::NeedCiphertext => {}
            }
            if wire.is_empty() {
                return Ok(0);
            }
            *step = (*step * 7919 + 13) % 20_000 + 1;
            if inbox.plan_read(tail, keep_cut_in_tail) == ReadInto::Tail {
                reads.into_tail += 1;
                let from = inbox.carry_into(tail);
                let read = (*step).min(tail.capacity() - tail.len()).min(wire.len());
                tail.extend_from_slice(&wire[..read]);
                *wire = &wire[read..];
                let filled = inbox.open_in_tail(layer, tail, from, keep_cut_in_tail)?;
                reads.carried_in_tail += usize::from(inbox.tail_carried > 0);
                match filled {
                    Filled::Bytes(read) => return Ok(read),
                    Filled::Ended => return Ok(0),
                    Filled::NeedCiphertext => continue,
                }
            }
            reads.into_inbox += 1;
            inbox.take_carried(tail);
            let read = (*step).min(wire.len());
            inbox.buf.extend_from_slice(&wire[..read]);
            *wire = &wire[read..];
        }
    }

    /// Gives `wire` to the broker's side as the reader does: each read goes where
    /// [`Inbox::plan_read`] says, into the reader's buffer or into the inbox. With
    /// `keep_cut_in_tail` the reader's buffer is a [`ReadBuffer`] (busy room `capacity`) that
    /// keeps the record cut by a read in its spare room, and the plaintext is taken from its
    /// front as the decoder does, sometimes leaving a partial frame behind; without, it is a
    /// buffer of `capacity` bytes emptied after each read, the cut record waiting in the inbox.
    fn feed_as_reads(
        layer: &mut RecordLayer,
        inbox: &mut Inbox,
        mut wire: &[u8],
        capacity: usize,
        keep_cut_in_tail: bool,
    ) -> Result<(Vec<u8>, Reads), Fatal> {
        let (mut received, mut step, mut reads) = (Vec::new(), 0usize, Reads::default());
        let mut buffer = crate::conn::read_buffer::ReadBuffer::new(BytesMut::with_capacity(capacity), capacity);
        let mut fixed = BytesMut::with_capacity(capacity);
        loop {
            let read = if keep_cut_in_tail {
                let (mut tail, carried) = buffer.take_for_read();
                assert_eq!(carried, inbox.tail_carried, "the buffer kept the carried record");
                let read = read_records_from(layer, inbox, &mut tail, true, (&mut wire, &mut step), &mut reads)?;
                buffer.put_back(tail, read, inbox.tail_carried);
                // The decoder takes whole frames: here, all but up to 99 bytes of a "frame".
                let held = buffer.bytes_mut();
                let taken = if read == 0 { held.len() } else { held.len() - (step % 100).min(held.len()) };
                received.extend_from_slice(&held.split_to(taken));
                read
            } else {
                let read = read_records_from(layer, inbox, &mut fixed, false, (&mut wire, &mut step), &mut reads)?;
                received.extend_from_slice(&fixed);
                fixed.clear();
                read
            };
            if read == 0 {
                return Ok((received, reads));
            }
        }
    }

    /// A client's records, large and small, with its KeyUpdates (TLS 1.3) between them, read
    /// straight into the reader's buffer and opened there, or through the inbox when the buffer
    /// is too small for a record: what the broker gets is exactly what the client wrote, in TLS
    /// 1.3 and 1.2, and the client's close_notify ends the stream after it. The record cut by
    /// a read waits either in the inbox, or (the reader's `ReadBuffer`) in the buffer's spare
    /// room, kept there while the decoder takes frames and the buffer grows, and then opens
    /// where it lies: no read goes through the inbox then.
    #[test]
    fn records_read_straight_into_the_readers_buffer_arrive_whole_and_in_order() {
        for version in VERSIONS {
            for (capacity, keep_cut_in_tail) in
                [(600, false), (5_000, false), (70_000, false), (600, true), (5_000, true), (70_000, true)]
            {
                let case = format!("{version:?}, room {capacity}, cut record kept in the buffer: {keep_cut_in_tail}");
                let (mut client, mut layer, mut inbox) = handshaken(version);
                let (mut expected, mut wire) = (Vec::new(), Vec::new());
                for index in 0..1_500u32 {
                    let piece = if index % 300 == 0 {
                        vec![(index % 251) as u8; 40_000]
                    } else {
                        format!("{index};").into_bytes()
                    };
                    client.writer().write_all(&piece).unwrap();
                    if version == &rustls::version::TLS13 && index % 300 == 150 {
                        client.refresh_traffic_keys().unwrap();
                    }
                    wire.extend(client_output(&mut client));
                    expected.extend_from_slice(&piece);
                }
                client.send_close_notify();
                wire.extend(client_output(&mut client));
                // Bytes after the close_notify are never opened.
                wire.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
                let (received, reads) =
                    feed_as_reads(&mut layer, &mut inbox, &wire, capacity, keep_cut_in_tail).unwrap();
                assert_eq!(received.len(), expected.len(), "{case}");
                assert!(received == expected, "{case}: the plaintext differs");
                assert!(layer.peer_closed(), "{case}: the close_notify was seen");
                assert!(reads.into_tail > 0, "{case}: some reads went straight into the reader's buffer: {reads:?}");
                if keep_cut_in_tail {
                    assert!(reads.carried_in_tail > 0, "{case}: cut records stayed in the buffer: {reads:?}");
                    assert_eq!(reads.into_inbox, 0, "{case}: no read needed the inbox: {reads:?}");
                } else {
                    assert_eq!(reads.carried_in_tail, 0, "{case}: {reads:?}");
                    assert!(capacity > records::MAX_RECORD_BYTES || reads.into_inbox > 0, "{case}: {reads:?}");
                }
            }
        }
    }

    /// A record damaged in flight, read straight into the reader's buffer: the records before it
    /// in the same read are delivered, then the damaged one is refused with bad_record_mac (sent
    /// to the client) and the session ends; the reader's buffer holds no ciphertext.
    #[test]
    fn a_damaged_record_read_into_the_readers_buffer_is_refused_after_what_came_before() {
        for version in VERSIONS {
            let (mut client, mut layer, mut inbox) = handshaken(version);
            client.writer().write_all(b"first").unwrap();
            let mut wire = client_output(&mut client);
            let first = wire.len();
            client.writer().write_all(b"second").unwrap();
            wire.extend(client_output(&mut client));
            wire[first + 9] ^= 0x40;
            let mut tail = BytesMut::with_capacity(4096);
            tail.extend_from_slice(b"frame");
            assert_eq!(inbox.plan_read(&mut tail, true), ReadInto::Tail);
            let from = inbox.carry_into(&mut tail);
            tail.extend_from_slice(&wire);
            assert_eq!(inbox.open_in_tail(&mut layer, &mut tail, from, true), Ok(Filled::Bytes(5)), "{version:?}");
            assert_eq!(&tail[..], b"framefirst", "{version:?}");
            let refused = inbox.fill(&mut layer, &mut tail).unwrap_err();
            assert_eq!(refused.alert, Some(records::Alert::BadRecordMac), "{version:?}");
            assert_eq!(refused.reason, "a record failed authentication");
            let mut alert = Vec::new();
            layer.take_queued(&mut alert);
            assert_eq!(
                client_input(&mut client, &alert),
                Err(rustls::Error::AlertReceived(AlertDescription::BadRecordMac)),
                "{version:?}"
            );
            assert!(layer.is_closed(), "{version:?}");
        }
    }

    /// Small and large writes, each its own record (or several), with the client's KeyUpdates
    /// (TLS 1.3) between some of them: the broker's side yields exactly what was written, and
    /// answers each KeyUpdate with its own, after which its records are readable by the client
    /// only if it switched keys in step with the client.
    #[test]
    fn records_cut_anywhere_arrive_whole_and_in_order_across_key_updates() {
        for version in VERSIONS {
            let (mut client, mut layer, mut inbox) = handshaken(version);
            let (mut expected, mut wire) = (Vec::new(), Vec::new());
            for index in 0..2_000u32 {
                let piece =
                    if index % 400 == 0 { vec![(index % 251) as u8; 40_000] } else { format!("{index};").into_bytes() };
                client.writer().write_all(&piece).unwrap();
                if version == &rustls::version::TLS13 && index % 300 == 150 {
                    client.refresh_traffic_keys().unwrap();
                }
                wire.extend(client_output(&mut client));
                expected.extend_from_slice(&piece);
            }
            let received = feed_in_pieces(&mut layer, &mut inbox, &wire).unwrap();
            assert_eq!(received.len(), expected.len(), "{version:?}");
            assert!(received == expected, "{version:?}: the plaintext differs from what the client wrote");
            // The broker's answer(s) to the KeyUpdates, then a batch under its new keys.
            let mut answer = Vec::new();
            layer.take_queued(&mut answer);
            if version == &rustls::version::TLS13 {
                assert!(!answer.is_empty(), "the broker answers the client's KeyUpdate requests");
            } else {
                assert!(answer.is_empty(), "TLS 1.2 has no KeyUpdate");
            }
            let reply = b"reply after the key updates".repeat(1000);
            let mut rest = &reply[..];
            while !rest.is_empty() {
                let taken = layer.seal_application_data(&[io::IoSlice::new(rest)], &mut answer).unwrap();
                rest = &rest[taken..];
            }
            assert_eq!(client_input(&mut client, &answer).unwrap(), reply, "{version:?}");
            // The client's close_notify ends the stream.
            client.send_close_notify();
            let close = client_output(&mut client);
            inbox.buf.extend_from_slice(&close);
            assert_eq!(inbox.fill(&mut layer, &mut BytesMut::with_capacity(100)), Ok(Filled::Ended), "{version:?}");
        }
    }

    /// Every suite the layer serves (TLS 1.3 AES-128-GCM, AES-256-GCM and ChaCha20-Poly1305;
    /// TLS 1.2 ECDHE-ECDSA with the same three), each negotiated by a real handshake with a
    /// rustls client: what the client sends (across its KeyUpdates in 1.3) opens here, and what
    /// is sealed here in place (records of every size, the answer to the client's KeyUpdate,
    /// the KeyUpdate the write limit forces in 1.3, a close_notify) opens with rustls's own
    /// decrypters in the client.
    #[test]
    fn every_suite_round_trips_with_a_rustls_client_in_both_directions() {
        use rustls::crypto::ring::cipher_suite as suites;
        for suite in [
            suites::TLS13_AES_128_GCM_SHA256,
            suites::TLS13_AES_256_GCM_SHA384,
            suites::TLS13_CHACHA20_POLY1305_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ] {
            let name = suite.suite();
            let tls13 = suite.version() == &rustls::version::TLS13;
            let (mut client, mut layer, mut inbox) = handshaken_in(suite);
            assert_eq!(client.negotiated_cipher_suite(), Some(suite), "{name:?}");
            let (mut expected, mut wire) = (Vec::new(), Vec::new());
            for index in 0..300u32 {
                let piece = if index % 100 == 0 { vec![index as u8; 20_000] } else { format!("{index};").into_bytes() };
                client.writer().write_all(&piece).unwrap();
                if tls13 && index % 100 == 50 {
                    client.refresh_traffic_keys().unwrap();
                }
                wire.extend(client_output(&mut client));
                expected.extend_from_slice(&piece);
            }
            let received = feed_in_pieces(&mut layer, &mut inbox, &wire).unwrap();
            assert!(received == expected, "{name:?}: the plaintext differs from what the client wrote");
            let mut answer = Vec::new();
            layer.take_queued(&mut answer);
            assert_eq!(answer.is_empty(), !tls13, "{name:?}: a KeyUpdate answers the client's in 1.3 only");
            if tls13 {
                layer.set_write_limit_for_tests(3);
            }
            let mut reply = Vec::new();
            for len in [1, 100, records::MAX_PLAINTEXT_BYTES - 1, records::MAX_PLAINTEXT_BYTES, 40_000] {
                let piece: Vec<u8> = (0..len).map(|byte| (byte * 7 + len) as u8).collect();
                // Two slices, so a record gathers its plaintext from more than one.
                let (front, back) = piece.split_at(len / 3);
                let mut slices = [io::IoSlice::new(front), io::IoSlice::new(back)];
                let mut rest: &mut [io::IoSlice<'_>] = &mut slices;
                while !rest.is_empty() {
                    let taken = layer.seal_application_data(rest, &mut answer).unwrap();
                    io::IoSlice::advance_slices(&mut rest, taken);
                }
                reply.extend_from_slice(&piece);
            }
            layer.close_notify(&mut answer);
            assert!(client_input(&mut client, &answer).unwrap() == reply, "{name:?}: the client read another reply");
            assert_eq!(client.reader().read(&mut [0u8; 1]).unwrap(), 0, "{name:?}: the close_notify ended the stream");
        }
    }

    /// A flipped byte in a record: what came before it is delivered, the record is refused
    /// with bad_record_mac (sent to the client), and nothing after it is opened.
    #[test]
    fn a_flipped_ciphertext_byte_is_refused_with_bad_record_mac_after_what_came_before() {
        for version in VERSIONS {
            let (mut client, mut layer, mut inbox) = handshaken(version);
            client.writer().write_all(b"first").unwrap();
            let mut wire = client_output(&mut client);
            let first = wire.len();
            client.writer().write_all(b"second").unwrap();
            wire.extend(client_output(&mut client));
            wire[first + 7] ^= 0x01;
            let mut out = BytesMut::with_capacity(100);
            inbox.buf.extend_from_slice(&wire);
            assert_eq!(inbox.fill(&mut layer, &mut out), Ok(Filled::Bytes(5)), "{version:?}");
            assert_eq!(&out[..], b"first");
            out.clear();
            let refused = inbox.fill(&mut layer, &mut out).unwrap_err();
            assert_eq!(refused.alert, Some(records::Alert::BadRecordMac), "{version:?}");
            let mut alert = Vec::new();
            layer.take_queued(&mut alert);
            assert_eq!(
                client_input(&mut client, &alert),
                Err(rustls::Error::AlertReceived(AlertDescription::BadRecordMac)),
                "{version:?}"
            );
            assert!(layer.is_closed());
            assert!(layer.seal_application_data(&[io::IoSlice::new(b"more")], &mut Vec::new()).is_err());
        }
    }

    /// A record header announcing more than 2^14 + 256 bytes is refused before any of it is
    /// read (record_overflow), so no buffer grows for it.
    #[test]
    fn an_oversized_record_header_is_refused_with_record_overflow() {
        for version in VERSIONS {
            let (mut client, mut layer, mut inbox) = handshaken(version);
            inbox.buf.extend_from_slice(&[23, 3, 3, 0x41, 0x01]);
            let refused = inbox.fill(&mut layer, &mut BytesMut::with_capacity(100)).unwrap_err();
            assert_eq!(refused.alert, Some(records::Alert::RecordOverflow), "{version:?}");
            let mut alert = Vec::new();
            layer.take_queued(&mut alert);
            assert_eq!(
                client_input(&mut client, &alert),
                Err(rustls::Error::AlertReceived(AlertDescription::RecordOverflow)),
                "{version:?}"
            );
        }
    }

    /// At the write limit (the suite's confidentiality limit, lowered here) TLS 1.3 refreshes
    /// its keys with a KeyUpdate and goes on; TLS 1.2 sends close_notify and stops, as rustls
    /// does.
    #[test]
    fn the_write_limit_refreshes_the_keys_in_tls_1_3_and_ends_tls_1_2() {
        for version in VERSIONS {
            let (mut client, mut layer, _inbox) = handshaken(version);
            layer.set_write_limit_for_tests(3);
            let mut wire = Vec::new();
            let mut sealed = 0;
            for index in 0..10u8 {
                match layer.seal_application_data(&[io::IoSlice::new(&[index; 10])], &mut wire) {
                    Ok(taken) => {
                        assert_eq!(taken, 10);
                        sealed += 1;
                    }
                    Err(_) => break,
                }
            }
            let plaintext = client_input(&mut client, &wire).unwrap();
            if version == &rustls::version::TLS13 {
                assert_eq!(sealed, 10, "TLS 1.3 goes on under new keys");
                assert_eq!(plaintext.len(), 100);
            } else {
                assert_eq!(sealed, 3, "TLS 1.2 stops at the limit");
                assert_eq!(plaintext.len(), 30);
                let mut buf = [0u8; 1];
                assert_eq!(client.reader().read(&mut buf).unwrap(), 0, "a close_notify ended the stream");
            }
        }
    }

    /// The broker's batches become full records the client reads back in order.
    #[test]
    fn sealed_batches_are_full_records_that_the_client_reads_in_order() {
        for version in VERSIONS {
            let (mut client, layer, _inbox) = handshaken(version);
            let layer = RefCell::new(layer);
            let mut outbound = crate::conn::outbound::Outbound::new();
            let mut expected = Vec::new();
            for index in 0..5_000u32 {
                let frame = format!("frame {index};");
                outbound.push_raw(frame.as_bytes());
                expected.extend_from_slice(frame.as_bytes());
            }
            let mut batch = outbound.take_batch(WriteBatch::default()).unwrap();
            let mut wire = Vec::new();
            while !batch.is_done() {
                let mut ciphertext = Vec::new();
                seal_some(&mut layer.borrow_mut(), &mut batch, &mut ciphertext).unwrap();
                assert!(ciphertext.len() >= TLS_WRITE_BYTES || batch.is_done());
                wire.extend(ciphertext);
            }
            let mut offset = 0;
            let mut lengths = Vec::new();
            while let Some((header, payload)) = records::next_record(&wire[offset..]).unwrap() {
                lengths.push(header.len);
                offset += payload.end;
            }
            assert_eq!(offset, wire.len());
            assert!(lengths[..lengths.len() - 1].iter().all(|&length| length == lengths[0]), "{lengths:?}");
            assert!(lengths[0] > records::MAX_PLAINTEXT_BYTES, "full records");
            assert!(client_input(&mut client, &wire).unwrap() == expected, "{version:?}");
        }
    }
}
