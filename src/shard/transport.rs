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
//! Writes: a batch's unwritten iovecs go to rustls as one vectored write, which it cuts into
//! full 16 KiB records (up to its 64 KiB buffer limit per call); the records are gathered in one
//! buffer, reused from batch to batch, until [`TLS_WRITE_BYTES`] are ready, and then leave in
//! one socket write. So a batch of thousands of small deliveries costs a few records and a few
//! writes, not one of each per frame or per 64 iovecs.
//!
//! Bounds: a TLS connection holds at most [`TLS_READ_BYTES`] of ciphertext read ahead
//! ([`TLS_IDLE_READ_BYTES`] while idle), rustls's own buffers (its default limits), and, while a
//! batch is written, less than [`TLS_WRITE_BYTES`] plus one rustls buffer (64 KiB) of ciphertext
//! beyond the batch; that buffer is let go after a batch of less than [`TLS_BUSY_WRITE_BYTES`].

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use bytes::BytesMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use monoio::BufResult;
use rustls::ServerConnection;

use super::connection::ReadTail;
pub use super::tls_inplace::InPlaceState;
use crate::conn::outbound::WriteBatch;

/// Ciphertext read from the socket per read on a busy TLS connection (two full records): the
/// room after a read that brought at least [`TLS_IDLE_READ_BYTES`].
pub const TLS_READ_BYTES: usize = 32 * 1024;
/// The room of a read on a TLS connection whose last read brought less than this: what an idle
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

/// A TLS session's state that outlives a move between shards, in either record layer
/// (`--tls-records`).
pub enum TlsState {
    /// rustls's buffered connection and the ciphertext read but not yet given to it.
    Rustls(Box<RustlsState>),
    /// rustls's handshake, then the in-place record layer (`super::tls_inplace`).
    InPlace(InPlaceState),
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (records, unread) = match self {
            TlsState::Rustls(state) => ("rustls", state.incoming.unread().len()),
            TlsState::InPlace(state) => ("in-place", state.unread_bytes()),
        };
        f.debug_struct("TlsState").field("records", &records).field("unread_ciphertext_bytes", &unread).finish()
    }
}

/// rustls's buffered connection (`--tls-records rustls`) and the ciphertext read from the
/// socket but not yet given to it.
pub struct RustlsState {
    connection: ServerConnection,
    incoming: Incoming,
}

impl RustlsState {
    pub fn new(connection: ServerConnection) -> RustlsState {
        RustlsState { connection, incoming: Incoming::new() }
    }
}

/// Ciphertext read from the socket; `buf[start..]` is not yet given to rustls. Its room
/// follows the traffic: [`TLS_READ_BYTES`] after a read of at least [`TLS_IDLE_READ_BYTES`],
/// else [`TLS_IDLE_READ_BYTES`]. (A busy connection whose reads do not fill 32 KiB keeps the
/// large room: switching on "filled or not" alternated a 2 KiB read, a fresh buffer, and a
/// partial record with every other read.)
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    /// The room `buf` was allocated with.
    room: usize,
    last_read_busy: bool,
}

impl Incoming {
    fn new() -> Incoming {
        Incoming { buf: Vec::new(), start: 0, room: 0, last_read_busy: false }
    }

    fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// Reads once from the socket into the (fully consumed) buffer. `Ok(0)` is end of stream.
    async fn read_from<R: AsyncReadRent>(&mut self, socket: &mut R) -> io::Result<usize> {
        debug_assert!(self.unread().is_empty(), "ciphertext is read only once rustls has taken what came before");
        let room = if self.last_read_busy { TLS_READ_BYTES } else { TLS_IDLE_READ_BYTES };
        let mut buf = std::mem::take(&mut self.buf);
        if self.room == room {
            buf.clear();
        } else {
            buf = Vec::with_capacity(room);
            self.room = room;
        }
        self.start = 0;
        let (result, buf) = socket.read(buf).await;
        self.last_read_busy = buf.len() >= TLS_IDLE_READ_BYTES;
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

/// Ciphertext gathered from a batch before one socket write: the batch is encrypted (in full
/// records of 16 KiB, see `encrypt_some`) until at least this much is ready or the batch is
/// done. A write then holds less than this plus one rustls buffer (64 KiB of plaintext and its
/// record overhead).
pub const TLS_WRITE_BYTES: usize = 64 * 1024;
/// A batch whose largest write is at least this is a busy connection's: its ciphertext buffer
/// (less than [`TLS_WRITE_BYTES`] plus one rustls buffer) stays for the next batch.
pub const TLS_BUSY_WRITE_BYTES: usize = 4 * 1024;

/// A writer's ciphertext buffer: reused from batch to batch while the connection is busy (a
/// write of at least [`TLS_BUSY_WRITE_BYTES`]), let go after a batch of less, so a connection
/// that sends little keeps none between its batches.
#[derive(Default)]
pub(crate) struct Outgoing {
    buf: Vec<u8>,
}

impl Outgoing {
    /// The buffer, empty, for the next batch.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf
    }

    /// Keeps `buf` for the next batch if the batch that just ended was a busy one.
    pub(crate) fn put_back(&mut self, buf: Vec<u8>, largest_write: usize) {
        if largest_write >= TLS_BUSY_WRITE_BYTES {
            self.buf = buf;
        }
    }
}

/// Encrypts the front of `batch` into `ciphertext` (after any records rustls had queued), until
/// [`TLS_WRITE_BYTES`] are ready or the batch is done. The unwritten iovecs go to rustls as one
/// vectored write, which fills whole records: it takes up to its buffer limit (64 KiB) of
/// plaintext, four full 16 KiB records, however many frames that is. Returns the plaintext bytes
/// taken; 0 with nothing to send means rustls takes no more (the session is closed).
fn encrypt_some(
    connection: &mut ServerConnection,
    batch: &mut WriteBatch,
    ciphertext: &mut Vec<u8>,
) -> io::Result<usize> {
    take_ciphertext(connection, ciphertext)?;
    let mut taken_total = 0;
    while !batch.is_done() && ciphertext.len() < TLS_WRITE_BYTES {
        let taken = connection.writer().write_vectored(batch.remaining_io_slices())?;
        batch.advance(taken);
        take_ciphertext(connection, ciphertext)?;
        if taken == 0 {
            break;
        }
        taken_total += taken;
    }
    Ok(taken_total)
}

/// Encrypts and writes `batch` over `socket` with rustls's connection.
async fn write_batch_tls<W: AsyncWriteRent>(
    connection: &RefCell<ServerConnection>,
    socket: &mut W,
    outgoing: &mut Outgoing,
    batch: WriteBatch,
) -> (io::Result<()>, WriteBatch) {
    write_sealed_batch(socket, outgoing, batch, |batch, ciphertext| {
        encrypt_some(&mut connection.borrow_mut(), batch, ciphertext)
    })
    .await
}

/// Writes `batch` over `socket` as the records `seal_some` makes of it: `seal_some` encrypts
/// the front of the batch into the buffer (about [`TLS_WRITE_BYTES`] at a time, advancing the
/// batch), and each buffer full leaves in one socket write, from a buffer kept across batches.
/// Both record layers write this way (rustls's connection here, the in-place layer in
/// `tls_inplace`); only how a record is sealed differs.
pub(crate) async fn write_sealed_batch<W: AsyncWriteRent>(
    socket: &mut W,
    outgoing: &mut Outgoing,
    mut batch: WriteBatch,
    mut seal_some: impl FnMut(&mut WriteBatch, &mut Vec<u8>) -> io::Result<usize>,
) -> (io::Result<()>, WriteBatch) {
    let mut ciphertext = outgoing.take();
    let mut largest_write = 0;
    let result = loop {
        if let Err(error) = seal_some(&mut batch, &mut ciphertext) {
            break Err(error);
        }
        if ciphertext.is_empty() {
            break if batch.is_done() { Ok(()) } else { Err(io::ErrorKind::WriteZero.into()) };
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
    outgoing: Outgoing,
}

impl TlsStream {
    pub fn new(socket: TcpStream, state: RustlsState) -> TlsStream {
        TlsStream {
            socket,
            connection: Rc::new(RefCell::new(state.connection)),
            incoming: state.incoming,
            outgoing: Outgoing::default(),
        }
    }
}

impl ReadSide for TlsStream {
    async fn read_tail(&mut self, mut tail: ReadTail) -> BufResult<usize, ReadTail> {
        loop {
            let decrypted = decrypt_into(&mut self.connection.borrow_mut(), &mut self.incoming, &mut tail.bytes);
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
        write_batch_tls(&self.connection, &mut self.socket, &mut self.outgoing, batch).await
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
            TlsWriter { socket: writer, connection, outgoing: self.outgoing },
        )
    }

    fn into_parts(self) -> (TcpStream, Option<Box<TlsState>>) {
        let connection = Rc::try_unwrap(self.connection)
            .unwrap_or_else(|_| unreachable!("an unsplit stream is the only holder of its TLS connection"))
            .into_inner();
        (self.socket, Some(Box::new(TlsState::Rustls(Box::new(RustlsState { connection, incoming: self.incoming })))))
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
            match decrypt_into(&mut self.connection.borrow_mut(), &mut self.incoming, &mut tail.bytes) {
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
    outgoing: Outgoing,
}

impl WriteSide for TlsWriter {
    async fn write_bytes(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.connection.borrow_mut().writer().write_all(&bytes)?;
        flush_tls(&self.connection, &mut self.socket).await
    }

    async fn write_batch(&mut self, batch: WriteBatch) -> (io::Result<()>, WriteBatch) {
        write_batch_tls(&self.connection, &mut self.socket, &mut self.outgoing, batch).await
    }

    async fn shutdown(&mut self) {
        self.connection.borrow_mut().send_close_notify();
        let _ = flush_tls(&self.connection, &mut self.socket).await;
        let _ = AsyncWriteRent::shutdown(&mut self.socket).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;
    use std::sync::Arc;

    use bytes::Bytes;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

    use super::*;
    use crate::conn::outbound::Outbound;
    use crate::mbws::{Binding, Frame, Send};

    /// Makes a throwaway certificate for `localhost` and its key, `cert.pem` and `key.pem` in
    /// `dir`, with the `openssl` tool, as the integration tests make theirs
    /// (tests/common/certs.rs).
    pub(crate) fn certificate_files(dir: &std::path::Path) -> crate::tls::TlsFiles {
        std::fs::create_dir_all(dir).unwrap();
        let files = crate::tls::TlsFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        let output = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
            .arg(&files.key)
            .arg("-out")
            .arg(&files.cert)
            .output()
            .expect("run openssl (apt-get install openssl) to make a test certificate");
        assert!(output.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&output.stderr));
        files
    }

    /// A throwaway certificate for `localhost` and its key.
    fn certificate() -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        // One directory per call: the tests run in parallel threads of one process.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("mbws-transport-test-{}-{call}", std::process::id()));
        let files = certificate_files(&dir);
        let pair =
            (CertificateDer::from_pem_file(&files.cert).unwrap(), PrivateKeyDer::from_pem_file(&files.key).unwrap());
        let _ = std::fs::remove_dir_all(dir);
        pair
    }

    /// A client and a server connection in TLS `version`, their handshake done in memory.
    fn handshaken(version: &'static rustls::SupportedProtocolVersion) -> (ClientConnection, ServerConnection) {
        let (cert, key) = certificate();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server_config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        handshake_in_memory(Arc::new(server_config), &cert, version)
    }

    /// Runs a handshake between `server_config` and a client with rustls's default
    /// configuration (ring, its order of cipher suites) that trusts `cert`, limited to `version`.
    pub(crate) fn handshake_in_memory(
        server_config: Arc<ServerConfig>,
        cert: &CertificateDer<'static>,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (ClientConnection, ServerConnection) {
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let client_config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut client =
            ClientConnection::new(Arc::new(client_config), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut server = ServerConnection::new(server_config).unwrap();
        for _ in 0..10 {
            // Done when both finished and the server's session tickets (TLS 1.3) reached the
            // client, so that the tests see only application data.
            if !client.is_handshaking() && !server.is_handshaking() && !server.wants_write() && !client.wants_write() {
                return (client, server);
            }
            let mut wire = Vec::new();
            take_client_ciphertext(&mut client, &mut wire);
            let mut rest = &wire[..];
            while !rest.is_empty() {
                server.read_tls(&mut rest).unwrap();
                server.process_new_packets().unwrap();
            }
            wire.clear();
            take_ciphertext(&mut server, &mut wire).unwrap();
            read_all(&mut client, &wire);
        }
        panic!("the in-memory handshake did not finish in 10 rounds");
    }

    fn take_client_ciphertext(client: &mut ClientConnection, out: &mut Vec<u8>) {
        while client.wants_write() {
            client.write_tls(out).unwrap();
        }
    }

    /// Feeds `ciphertext` to the client and returns the plaintext it yields.
    fn read_all(client: &mut ClientConnection, ciphertext: &[u8]) -> Vec<u8> {
        let mut plaintext = Vec::new();
        let mut rest = ciphertext;
        while !rest.is_empty() {
            client.read_tls(&mut rest).unwrap();
            client.process_new_packets().unwrap();
            let _ = client.reader().read_to_end(&mut plaintext);
        }
        plaintext
    }

    /// The length of each TLS record in `ciphertext` (which holds whole records only).
    fn record_lengths(ciphertext: &[u8]) -> Vec<usize> {
        let mut lengths = Vec::new();
        let mut rest = ciphertext;
        while !rest.is_empty() {
            assert!(rest.len() >= 5, "a record header cut in two");
            let length = u16::from_be_bytes([rest[3], rest[4]]) as usize;
            assert!(rest.len() >= 5 + length, "a record cut in two");
            lengths.push(length);
            rest = &rest[5 + length..];
        }
        lengths
    }

    /// A batch of many small frames with large bodies among them, as a busy consumer's writer
    /// takes it: the small frames share arena chunks, each large body is an iovec of its own.
    fn busy_batch() -> WriteBatch {
        let mut outbound = Outbound::new();
        for index in 0..20_000u32 {
            outbound.push_raw(format!("small frame {index};").as_bytes());
            if index % 2_000 == 0 {
                let body = Bytes::from((0..40_000u32).map(|byte| (byte % 251) as u8).collect::<Vec<u8>>());
                let send = Send { seq: u64::from(index), address: Bytes::from_static(b"a"), body, ..Send::default() };
                outbound.push_frame(Binding::Binary, &Frame::Send(send));
            }
        }
        outbound.take_batch(WriteBatch::default()).unwrap()
    }

    #[test]
    fn a_batch_of_many_frames_becomes_full_records_written_in_few_pieces_and_arrives_in_order() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut client, mut server) = handshaken(version);
            let mut batch = busy_batch();
            let expected = batch.to_vec();
            assert!(expected.len() > 10 * TLS_WRITE_BYTES, "the batch needs many writes");
            let (mut received, mut records, mut writes) = (Vec::new(), Vec::new(), 0);
            let mut ciphertext = Vec::new();
            while !batch.is_done() {
                ciphertext.clear();
                let taken = encrypt_some(&mut server, &mut batch, &mut ciphertext).unwrap();
                assert!(taken > 0, "plaintext was left and rustls took none");
                // One write: at least TLS_WRITE_BYTES unless the batch ended, less than that
                // plus one rustls buffer (64 KiB of plaintext in four records).
                assert!(ciphertext.len() >= TLS_WRITE_BYTES || batch.is_done(), "a short write mid-batch");
                assert!(
                    ciphertext.len() < TLS_WRITE_BYTES + 64 * 1024 + 4 * 64,
                    "{} bytes in one write",
                    ciphertext.len()
                );
                records.extend(record_lengths(&ciphertext));
                received.extend(read_all(&mut client, &ciphertext));
                writes += 1;
            }
            assert_eq!(received.len(), expected.len(), "{version:?}");
            assert!(received == expected, "{version:?}: the plaintext differs from the batch");
            assert!(writes <= expected.len().div_ceil(TLS_WRITE_BYTES) + 1, "{version:?}: {writes} writes");
            // Every record but the batch's last carries a full 16 KiB of plaintext.
            let full = records[0];
            assert!(full > 16 * 1024, "{version:?}: first record of {full} bytes");
            assert!(records[..records.len() - 1].iter().all(|&length| length == full), "{version:?}: {records:?}");
        }
    }

    #[test]
    fn reads_that_end_mid_record_into_a_small_buffer_lose_and_reorder_nothing() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut client, mut server) = handshaken(version);
            // Many small records and a few large ones, each written by its own call.
            let (mut expected, mut wire) = (Vec::new(), Vec::new());
            for index in 0..3_000u32 {
                let piece =
                    if index % 500 == 0 { vec![(index % 251) as u8; 40_000] } else { format!("{index};").into_bytes() };
                client.writer().write_all(&piece).unwrap();
                take_client_ciphertext(&mut client, &mut wire);
                expected.extend_from_slice(&piece);
            }
            let mut incoming = Incoming::new();
            let mut received = Vec::new();
            // Reads of 1 to 700 bytes (a read ends inside a record header, a record, between
            // records), into a buffer with room for 100 bytes at a time.
            let (mut offset, mut step) = (0, 0usize);
            while offset < wire.len() {
                step = (step * 7 + 13) % 700 + 1;
                let end = (offset + step).min(wire.len());
                assert!(incoming.unread().is_empty());
                incoming.buf.clear();
                incoming.buf.extend_from_slice(&wire[offset..end]);
                incoming.start = 0;
                offset = end;
                loop {
                    let mut out = BytesMut::with_capacity(100);
                    match decrypt_into(&mut server, &mut incoming, &mut out).unwrap() {
                        Decrypted::Bytes(read) => {
                            assert_eq!(read, out.len());
                            received.extend_from_slice(&out);
                        }
                        Decrypted::NeedCiphertext => break,
                        Decrypted::Ended => panic!("{version:?}: ended before the close_notify"),
                    }
                }
            }
            assert_eq!(received.len(), expected.len(), "{version:?}");
            assert!(received == expected, "{version:?}: the plaintext differs from what the client wrote");
            client.send_close_notify();
            wire.clear();
            take_client_ciphertext(&mut client, &mut wire);
            incoming.buf = wire;
            incoming.start = 0;
            let mut out = BytesMut::with_capacity(100);
            assert!(matches!(decrypt_into(&mut server, &mut incoming, &mut out).unwrap(), Decrypted::Ended));
        }
    }
}
