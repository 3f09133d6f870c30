//! TLS with the in-place record layer (`--tls-records in-place`, the default): rustls's
//! `UnbufferedServerConnection` does the handshake, [`crate::tls::records`] the records.
//!
//! Reading: the socket reads into the connection's own ciphertext buffer ([`Inbox`]); each
//! whole record is decrypted where it lies and its plaintext copied once into the reader's
//! buffer (the WebSocket decoder's), where rustls's buffered connection copies every byte three
//! times (into its deframer, into its plaintext queue, out to the reader). A record cut by the
//! end of a read stays, and the next read appends to it.
//!
//! Writing: each record is sealed from the batch's iovecs by rustls's AEAD (which copies the
//! plaintext once into the record it returns) and gathered in one buffer, as with the buffered
//! connection, until [`TLS_WRITE_BYTES`] are ready; then one socket write.
//!
//! The handshake runs in the stream before the split (as for the buffered connection), inside
//! the upgrade's `handshake_timeout`; its buffer is bounded by [`MAX_HANDSHAKE_BUFFER_BYTES`].
//! After the split the reader and the writer share the [`RecordLayer`] in an `Rc<RefCell<..>>`,
//! borrowed only between awaits. Only the writer writes to the socket: what the reader seals
//! (the answer to a KeyUpdate, an alert) leaves ahead of the next batch, or at shutdown.
//!
//! Bounds: the inbox holds at most [`TLS_READ_BYTES`] plus one record ([`MAX_RECORD_BYTES`]);
//! an idle connection's shrinks back to [`TLS_IDLE_READ_BYTES`] plus the record it waits for.

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
    Outgoing, ReadSide, Stream, TlsState, WriteSide, TLS_IDLE_READ_BYTES, TLS_READ_BYTES, TLS_WRITE_BYTES,
};
use crate::conn::outbound::WriteBatch;
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
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    plain: Range<usize>,
    early: Vec<u8>,
    last_read_busy: bool,
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
        Inbox { buf: Vec::new(), start: 0, plain: 0..0, early: Vec::new(), last_read_busy: false }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Copies plaintext into `out` (as much as its spare capacity takes), opening records as
    /// needed.
    fn fill(&mut self, layer: &mut RecordLayer, out: &mut BytesMut) -> Result<Filled, Fatal> {
        assert!(out.capacity() > out.len(), "a read is always given room");
        let mut appended = self.hand_out_early(out);
        loop {
            appended += self.hand_out_plain(out);
            if out.capacity() == out.len() || layer.peer_closed() {
                break;
            }
            let next = records::next_record(self.unread()).inspect_err(|fatal| layer.refuse(fatal))?;
            let Some((header, payload)) = next else {
                break;
            };
            let payload = self.start + payload.start..self.start + payload.end;
            self.start = payload.end;
            match layer.open(header, &mut self.buf, payload)? {
                Opened::Data(range) => self.plain = range,
                Opened::Nothing => {}
                Opened::Closed => break,
            }
        }
        Ok(match appended {
            0 if layer.peer_closed() => Filled::Ended,
            0 => Filled::NeedCiphertext,
            appended => Filled::Bytes(appended),
        })
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

/// Copies plaintext to `tail` from the inbox, reading the socket when it needs more; the
/// reader's loop (the handshake is over).
async fn read_records<R: AsyncReadRent>(
    layer: &RefCell<RecordLayer>,
    inbox: &mut Inbox,
    socket: &mut R,
    tail: &mut BytesMut,
) -> io::Result<usize> {
    loop {
        let filled = inbox.fill(&mut layer.borrow_mut(), tail).map_err(fatal_error)?;
        match filled {
            Filled::Bytes(read) => return Ok(read),
            Filled::Ended => return Ok(0),
            Filled::NeedCiphertext => {}
        }
        if inbox.read_from(socket, usize::MAX).await? == 0 {
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

/// Seals and writes `batch` over `socket`: one socket write per [`TLS_WRITE_BYTES`] or so.
async fn write_batch_records<W: AsyncWriteRent>(
    layer: &RefCell<RecordLayer>,
    socket: &mut W,
    outgoing: &mut Outgoing,
    mut batch: WriteBatch,
) -> (io::Result<()>, WriteBatch) {
    let mut ciphertext = outgoing.take();
    let mut largest_write = 0;
    let result = loop {
        if let Err(error) = seal_some(&mut layer.borrow_mut(), &mut batch, &mut ciphertext) {
            break Err(error);
        }
        if ciphertext.is_empty() {
            break Ok(());
        }
        largest_write = largest_write.max(ciphertext.len());
        let (result, returned) = socket.write_all(ciphertext).await;
        ciphertext = returned;
        ciphertext.clear();
        if let Err(error) = result {
            break Err(error);
        }
    };
    outgoing.put_back(ciphertext, largest_write);
    (result, batch)
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
        let early = self.inbox.hand_out_early(&mut tail.0);
        if early > 0 {
            return (Ok(early), tail);
        }
        let result = match &self.session {
            StreamSession::Traffic(layer) => read_records(layer, &mut self.inbox, &mut self.socket, &mut tail.0).await,
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
        let early = self.inbox.hand_out_early(&mut tail.0);
        if early > 0 {
            return (Ok(early), tail);
        }
        let result = match &self.layer {
            Some(layer) => read_records(layer, &mut self.inbox, &mut self.socket, &mut tail.0).await,
            None => Ok(0),
        };
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
