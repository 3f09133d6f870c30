//! The byte streams a connection runs over: a plain TCP socket, or TLS (rustls) over one.
//!
//! The connection tasks are generic over `Stream`, so each kind is compiled on its own: the
//! plain instance calls monoio's socket operations directly, with no TLS check, branch or
//! dynamic call in its read and write loops.
//!
//! TLS keeps one rustls [`ServerConnection`] per connection. Before the split (the upgrade and
//! the first MBWS frame) a [`TlsStream`] drives the handshake itself: a read that hands rustls
//! handshake records writes rustls's answer before it reads again, so the handshake completes
//! inside the upgrade's `handshake_timeout`. After the split the reader and the writer task
//! share the `ServerConnection` in an `Rc<RefCell<..>>`, borrowed only between awaits, never
//! across one. Only the writer writes to the socket: TLS records rustls queues while reading
//! once the handshake is over (its answer to a KeyUpdate, a warning alert) leave ahead of the
//! next batch or with the close_notify at shutdown, which TLS allows.
//!
//! Bounds: a TLS connection holds at most [`TLS_READ_BYTES`] of ciphertext read ahead
//! ([`TLS_IDLE_READ_BYTES`] while idle), rustls's own buffers (its default limits), and, while a
//! batch is written, at most rustls's buffer limit of ciphertext (64 KiB) beyond the batch.

use std::cell::RefCell;
use std::io::{self, BufRead, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::ServerConnection;
use smallvec::SmallVec;

use super::connection::ReadTail;
use crate::conn::outbound::WriteBatch;

/// Ciphertext read from the socket per read on a busy TLS connection (more than one full
/// record): the room after a read that filled its room.
pub const TLS_READ_BYTES: usize = 32 * 1024;
/// The room of a read on a TLS connection whose last read did not fill its room: what an idle
/// connection holds while it waits (rustls gathers a record over as many reads as it takes).
pub const TLS_IDLE_READ_BYTES: usize = 2 * 1024;

/// The reading side of a stream.
pub(crate) trait ReadSide {
    /// Reads once, appending to the buffer's contents (at most its spare capacity, which must
    /// not be empty). `Ok(0)` is the end of the stream.
    async fn read_tail(&mut self, tail: ReadTail) -> BufResult<usize, ReadTail>;
}

/// The writing side of a stream.
pub(crate) trait WriteSide {
    /// Writes all of `bytes` (the rare paths: upgrade answers, refusals).
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()>;
    /// Writes a whole batch, resuming after partial writes.
    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch);
    /// Ends the writing side (TLS: with a close_notify first).
    async fn shutdown(&mut self);
}

/// A connection's stream before it is split into its reader and writer tasks.
pub(crate) trait Stream: ReadSide + WriteSide + Sized + 'static {
    type Reader: ReadSide + 'static;
    type Writer: WriteSide + 'static;
    /// The socket's descriptor (a superseded connection is shut down through it).
    fn socket(&self) -> RawFd;
    fn into_split(self) -> (Self::Reader, Self::Writer);
    /// The socket and, for TLS, the session state, to move the connection to another shard.
    fn into_parts(self) -> (TcpStream, Option<Box<TlsState>>);
}

impl ReadSide for TcpStream {
    async fn read_tail(&mut self, tail: ReadTail) -> BufResult<usize, ReadTail> {
        self.read(tail).await
    }
}

impl ReadSide for OwnedReadHalf<TcpStream> {
    async fn read_tail(&mut self, tail: ReadTail) -> BufResult<usize, ReadTail> {
        self.read(tail).await
    }
}

impl WriteSide for TcpStream {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.write_all(bytes).await.0.map(drop)
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        write_batch_plain(self, batch).await
    }

    async fn shutdown(&mut self) {
        let _ = AsyncWriteRent::shutdown(self).await;
    }
}

impl WriteSide for OwnedWriteHalf<TcpStream> {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.write_all(bytes).await.0.map(drop)
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        write_batch_plain(self, batch).await
    }

    async fn shutdown(&mut self) {
        let _ = AsyncWriteRent::shutdown(self).await;
    }
}

impl Stream for TcpStream {
    type Reader = OwnedReadHalf<TcpStream>;
    type Writer = OwnedWriteHalf<TcpStream>;

    fn socket(&self) -> RawFd {
        self.as_raw_fd()
    }

    fn into_split(self) -> (Self::Reader, Self::Writer) {
        Splitable::into_split(self)
    }

    fn into_parts(self) -> (TcpStream, Option<Box<TlsState>>) {
        (self, None)
    }
}

/// One vectored write per round, resuming after partial writes.
async fn write_batch_plain<W: AsyncWriteRent>(writer: &mut W, mut batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
    while !batch.is_done() {
        let (result, returned) = writer.writev(batch).await;
        batch = returned;
        match result {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), batch),
            Ok(written) => batch.advance(written),
            Err(error) => return (Err(error), batch),
        }
    }
    (Ok(()), batch)
}

/// A TLS session's state that outlives a move between shards: rustls's connection and the
/// ciphertext read from the socket but not yet given to it.
pub struct TlsState {
    connection: ServerConnection,
    incoming: Incoming,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState").field("unread_ciphertext_bytes", &self.incoming.unread().len()).finish()
    }
}

impl TlsState {
    pub fn new(connection: ServerConnection) -> TlsState {
        TlsState { connection, incoming: Incoming::new() }
    }
}

/// Ciphertext read from the socket; `buf[start..]` is not yet given to rustls. Its room
/// follows the traffic: [`TLS_READ_BYTES`] after a read that filled its room, else
/// [`TLS_IDLE_READ_BYTES`].
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    /// The room `buf` was allocated with.
    room: usize,
    last_read_filled: bool,
}

impl Incoming {
    fn new() -> Incoming {
        Incoming { buf: Vec::new(), start: 0, room: 0, last_read_filled: false }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads once from the socket into the (fully consumed) buffer. `Ok(0)` is end of stream.
    async fn read_from<R: AsyncReadRent>(&mut self, socket: &mut R) -> io::Result<usize> {
        debug_assert!(self.unread().is_empty(), "ciphertext is read only once rustls has taken what came before");
        let room = if self.last_read_filled { TLS_READ_BYTES } else { TLS_IDLE_READ_BYTES };
        let mut buf = std::mem::take(&mut self.buf);
        if self.room == room {
            buf.clear();
        } else {
            buf = Vec::with_capacity(room);
            self.room = room;
        }
        self.start = 0;
        let (result, buf) = socket.read(buf).await;
        self.last_read_filled = buf.len() >= room;
        self.buf = buf;
        result
    }
}

/// What [`decrypt_into`] got.
enum Decrypted {
    /// Plaintext appended to the buffer.
    Bytes(usize),
    /// The peer ended the TLS session (close_notify, or end of stream).
    Ended,
    /// Everything read is processed; read the socket again.
    NeedCiphertext,
}

/// Gives rustls the ciphertext read so far and appends the plaintext it yields to `out`, as
/// much as fits in `out`'s spare capacity.
fn decrypt_into(
    connection: &mut ServerConnection,
    incoming: &mut Incoming,
    out: &mut BytesMut,
) -> io::Result<Decrypted> {
    debug_assert!(out.capacity() > out.len(), "a read is always given room");
    let mut appended = 0;
    loop {
        let mut reader = connection.reader();
        loop {
            let room = out.capacity() - out.len();
            if room == 0 {
                return Ok(Decrypted::Bytes(appended));
            }
            match reader.fill_buf() {
                Ok([]) if appended == 0 => return Ok(Decrypted::Ended), // close_notify received
                Ok([]) => return Ok(Decrypted::Bytes(appended)),
                Ok(chunk) => {
                    let taken = chunk.len().min(room);
                    out.extend_from_slice(&chunk[..taken]);
                    reader.consume(taken);
                    appended += taken;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) if appended > 0 => return Ok(Decrypted::Bytes(appended)),
                Err(_) => return Ok(Decrypted::Ended), // end of stream without close_notify
            }
        }
        if incoming.unread().is_empty() {
            return Ok(if appended > 0 { Decrypted::Bytes(appended) } else { Decrypted::NeedCiphertext });
        }
        let mut unread = incoming.unread();
        let before = unread.len();
        connection.read_tls(&mut unread)?;
        incoming.start += before - unread.len();
        connection.process_new_packets().map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    }
}

/// Tells rustls the socket reached its end (it then reports a clean or an unclean close).
fn end_of_ciphertext(connection: &mut ServerConnection) {
    let _ = connection.read_tls(&mut &[][..]);
}

/// Takes every TLS record rustls has queued, to write to the socket.
fn take_ciphertext(connection: &mut ServerConnection, out: &mut Vec<u8>) -> io::Result<()> {
    while connection.wants_write() {
        connection.write_tls(out)?;
    }
    Ok(())
}

/// Encrypts and writes `batch` over `socket`, one rustls buffer's worth (64 KiB) at a time.
async fn write_batch_tls<W: AsyncWriteRent>(
    connection: &RefCell<ServerConnection>,
    socket: &mut W,
    mut batch: WriteBatch,
) -> (io::Result<()>, WriteBatch) {
    let mut ciphertext = Vec::new();
    loop {
        let encrypted = {
            let mut connection = connection.borrow_mut();
            let slices: SmallVec<[IoSlice<'_>; 64]> = batch.remaining_slices().take(64).map(IoSlice::new).collect();
            let taken = if slices.is_empty() { Ok(0) } else { connection.writer().write_vectored(&slices) };
            drop(slices);
            taken.and_then(|taken| {
                batch.advance(taken);
                take_ciphertext(&mut connection, &mut ciphertext)?;
                Ok(taken)
            })
        };
        let taken = match encrypted {
            Ok(taken) => taken,
            Err(error) => return (Err(error), batch),
        };
        if ciphertext.is_empty() {
            if batch.is_done() {
                return (Ok(()), batch);
            }
            if taken == 0 {
                // rustls takes no more plaintext and has nothing to send: the session is closed.
                return (Err(io::ErrorKind::WriteZero.into()), batch);
            }
            continue;
        }
        let (result, returned) = socket.write_all(ciphertext).await;
        ciphertext = returned;
        ciphertext.clear();
        if let Err(error) = result {
            return (Err(error), batch);
        }
    }
}

/// Sends what rustls has queued (the handshake's records, an alert) over `socket`.
async fn flush_tls<W: AsyncWriteRent>(connection: &RefCell<ServerConnection>, socket: &mut W) -> io::Result<()> {
    let mut ciphertext = Vec::new();
    take_ciphertext(&mut connection.borrow_mut(), &mut ciphertext)?;
    if !ciphertext.is_empty() {
        socket.write_all(ciphertext).await.0?;
    }
    Ok(())
}

/// A TLS connection before the split: it drives the handshake while it reads.
pub struct TlsStream {
    socket: TcpStream,
    connection: Rc<RefCell<ServerConnection>>,
    incoming: Incoming,
}

impl TlsStream {
    pub fn new(socket: TcpStream, state: TlsState) -> TlsStream {
        TlsStream { socket, connection: Rc::new(RefCell::new(state.connection)), incoming: state.incoming }
    }
}

impl ReadSide for TlsStream {
    async fn read_tail(&mut self, mut tail: ReadTail) -> BufResult<usize, ReadTail> {
        loop {
            let decrypted = decrypt_into(&mut self.connection.borrow_mut(), &mut self.incoming, &mut tail.0);
            // Handshake records (and alerts) go out before this side waits for the peer again.
            let flushed = flush_tls(&self.connection, &mut self.socket).await;
            match decrypted {
                Ok(Decrypted::Bytes(read)) => return (flushed.map(|()| read), tail),
                Ok(Decrypted::Ended) => return (Ok(0), tail),
                Err(error) => return (Err(error), tail),
                Ok(Decrypted::NeedCiphertext) => {}
            }
            if let Err(error) = flushed {
                return (Err(error), tail);
            }
            match self.incoming.read_from(&mut self.socket).await {
                Ok(0) => end_of_ciphertext(&mut self.connection.borrow_mut()),
                Ok(_) => {}
                Err(error) => return (Err(error), tail),
            }
        }
    }
}

impl WriteSide for TlsStream {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.connection.borrow_mut().writer().write_all(&bytes)?;
        flush_tls(&self.connection, &mut self.socket).await
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        write_batch_tls(&self.connection, &mut self.socket, batch).await
    }

    async fn shutdown(&mut self) {
        self.connection.borrow_mut().send_close_notify();
        let _ = flush_tls(&self.connection, &mut self.socket).await;
        let _ = AsyncWriteRent::shutdown(&mut self.socket).await;
    }
}

impl Stream for TlsStream {
    type Reader = TlsReader;
    type Writer = TlsWriter;

    fn socket(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    fn into_split(self) -> (TlsReader, TlsWriter) {
        let (reader, writer) = Splitable::into_split(self.socket);
        let connection = self.connection;
        (
            TlsReader { socket: reader, connection: connection.clone(), incoming: self.incoming },
            TlsWriter { socket: writer, connection },
        )
    }

    fn into_parts(self) -> (TcpStream, Option<Box<TlsState>>) {
        let connection = Rc::try_unwrap(self.connection)
            .unwrap_or_else(|_| unreachable!("an unsplit stream is the only holder of its TLS connection"))
            .into_inner();
        (self.socket, Some(Box::new(TlsState { connection, incoming: self.incoming })))
    }
}

/// The reading task's side of a TLS connection.
pub struct TlsReader {
    socket: OwnedReadHalf<TcpStream>,
    connection: Rc<RefCell<ServerConnection>>,
    incoming: Incoming,
}

impl ReadSide for TlsReader {
    async fn read_tail(&mut self, mut tail: ReadTail) -> BufResult<usize, ReadTail> {
        loop {
            match decrypt_into(&mut self.connection.borrow_mut(), &mut self.incoming, &mut tail.0) {
                Ok(Decrypted::Bytes(read)) => return (Ok(read), tail),
                Ok(Decrypted::Ended) => return (Ok(0), tail),
                Err(error) => return (Err(error), tail),
                Ok(Decrypted::NeedCiphertext) => {}
            }
            match self.incoming.read_from(&mut self.socket).await {
                Ok(0) => end_of_ciphertext(&mut self.connection.borrow_mut()),
                Ok(_) => {}
                Err(error) => return (Err(error), tail),
            }
        }
    }
}

/// The writing task's side of a TLS connection: the only side that writes to the socket.
pub struct TlsWriter {
    socket: OwnedWriteHalf<TcpStream>,
    connection: Rc<RefCell<ServerConnection>>,
}

impl WriteSide for TlsWriter {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.connection.borrow_mut().writer().write_all(&bytes)?;
        flush_tls(&self.connection, &mut self.socket).await
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        write_batch_tls(&self.connection, &mut self.socket, batch).await
    }

    async fn shutdown(&mut self) {
        self.connection.borrow_mut().send_close_notify();
        let _ = flush_tls(&self.connection, &mut self.socket).await;
        let _ = AsyncWriteRent::shutdown(&mut self.socket).await;
    }
}
