//! The byte stream to a target (IO): plain TCP, or TLS (rustls) over it for `wss://` URLs.
//!
//! The engine reads into and writes from whole `BytesMut` buffers; [`Stream`] and its halves
//! offer exactly those two operations, so the engine does not know whether TLS is on. A TLS
//! connection keeps one rustls [`ClientConnection`], shared by the reader and the writer
//! task in an `Rc<RefCell<..>>` and borrowed only between awaits, never across one.
//!
//! Only the writer writes to the socket once the stream is split: TLS records rustls queues
//! while reading (its answer to a KeyUpdate) leave with the next batch, which TLS allows. The
//! handshake runs to completion in [`Stream::start_tls`], before any WebSocket byte.
//!
//! Bounds: ciphertext is read [`TLS_READ_BYTES`] at a time; a batch is encrypted in pieces of at
//! most rustls's buffer limit (64 KiB), each written before the next is encrypted.

use std::cell::RefCell;
use std::io::{self, BufRead, Write};
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::net::reserve_read_room;

/// Ciphertext read from the socket at once on a TLS connection (a few full records).
pub const TLS_READ_BYTES: usize = 64 * 1024;

/// A connection to the target before it is split into its reader and writer tasks.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// The reading half of a split [`Stream`].
pub enum ReadHalf {
    Plain(OwnedReadHalf<TcpStream>),
    Tls(TlsReadHalf),
}

/// The writing half of a split [`Stream`].
pub enum WriteHalf {
    Plain(OwnedWriteHalf<TcpStream>),
    Tls(TlsWriteHalf),
}

pub struct TlsStream {
    socket: TcpStream,
    connection: Rc<RefCell<ClientConnection>>,
    ciphertext_in: BytesMut,
    ciphertext_out: Vec<u8>,
}

pub struct TlsReadHalf {
    socket: OwnedReadHalf<TcpStream>,
    connection: Rc<RefCell<ClientConnection>>,
    ciphertext_in: BytesMut,
}

pub struct TlsWriteHalf {
    socket: OwnedWriteHalf<TcpStream>,
    connection: Rc<RefCell<ClientConnection>>,
    ciphertext_out: Vec<u8>,
}

impl Stream {
    /// Runs the TLS handshake over `socket` for `name`; the stream then carries plaintext.
    pub async fn start_tls(
        socket: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<Stream> {
        let connection = ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut tls = TlsStream {
            socket,
            connection: Rc::new(RefCell::new(connection)),
            ciphertext_in: BytesMut::with_capacity(TLS_READ_BYTES),
            ciphertext_out: Vec::new(),
        };
        loop {
            // The client's Finished is queued when the last server flight is read: it leaves on
            // the next turn, before the loop ends.
            tls.ciphertext_out =
                write_pending(&mut tls.socket, &tls.connection, std::mem::take(&mut tls.ciphertext_out)).await?;
            if !tls.connection.borrow().is_handshaking() {
                break;
            }
            let (result, ciphertext) =
                feed_records(&mut tls.socket, &tls.connection, std::mem::take(&mut tls.ciphertext_in)).await;
            tls.ciphertext_in = ciphertext;
            if result? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the target closed the connection during the TLS handshake",
                ));
            }
        }
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// Reads once (at least one byte unless at end of stream) into the spare capacity of `buf`,
    /// growing it first if it has little room. `Ok(0)` is end of stream.
    pub async fn read_more(&mut self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        match self {
            Stream::Plain(socket) => read_plain(socket, buf).await,
            Stream::Tls(tls) => read_tls(&mut tls.socket, &tls.connection, &mut tls.ciphertext_in, buf).await,
        }
    }

    /// Writes all of `bytes`; returns the buffer for reuse.
    pub async fn write_all(&mut self, bytes: BytesMut) -> (io::Result<()>, BytesMut) {
        match self {
            Stream::Plain(socket) => {
                let (result, bytes) = socket.write_all(bytes).await;
                (result.map(drop), bytes)
            }
            Stream::Tls(tls) => write_tls(&mut tls.socket, &tls.connection, &mut tls.ciphertext_out, bytes).await,
        }
    }

    /// The socket's descriptor (to poll an idle session for a close).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Plain(socket) => socket.as_raw_fd(),
            Stream::Tls(tls) => tls.socket.as_raw_fd(),
        }
    }

    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(socket) => {
                let (reader, writer) = socket.into_split();
                (ReadHalf::Plain(reader), WriteHalf::Plain(writer))
            }
            Stream::Tls(tls) => {
                let TlsStream { socket, connection, ciphertext_in, ciphertext_out } = *tls;
                let (reader, writer) = socket.into_split();
                (
                    ReadHalf::Tls(TlsReadHalf { socket: reader, connection: connection.clone(), ciphertext_in }),
                    WriteHalf::Tls(TlsWriteHalf { socket: writer, connection, ciphertext_out }),
                )
            }
        }
    }
}

impl ReadHalf {
    /// As [`Stream::read_more`].
    pub async fn read_more(&mut self, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
        match self {
            ReadHalf::Plain(socket) => read_plain(socket, buf).await,
            ReadHalf::Tls(tls) => read_tls(&mut tls.socket, &tls.connection, &mut tls.ciphertext_in, buf).await,
        }
    }
}

impl WriteHalf {
    /// As [`Stream::write_all`].
    pub async fn write_all(&mut self, bytes: BytesMut) -> (io::Result<()>, BytesMut) {
        match self {
            WriteHalf::Plain(socket) => {
                let (result, bytes) = socket.write_all(bytes).await;
                (result.map(drop), bytes)
            }
            WriteHalf::Tls(tls) => write_tls(&mut tls.socket, &tls.connection, &mut tls.ciphertext_out, bytes).await,
        }
    }
}

async fn read_plain<R: AsyncReadRent>(socket: &mut R, buf: BytesMut) -> (io::Result<usize>, BytesMut) {
    let mut buf = buf;
    reserve_read_room(&mut buf);
    // The slice starts at the end of what `buf` holds: the kernel writes into the spare capacity.
    let start = buf.len();
    let (result, tail) = socket.read(monoio::buf::IoBufMut::slice_mut(buf, start..)).await;
    (result, tail.into_inner())
}

/// Appends the plaintext rustls has, reading and decrypting records until there is some.
async fn read_tls<R: AsyncReadRent>(
    socket: &mut R,
    connection: &RefCell<ClientConnection>,
    ciphertext: &mut BytesMut,
    buf: BytesMut,
) -> (io::Result<usize>, BytesMut) {
    let mut buf = buf;
    reserve_read_room(&mut buf);
    loop {
        match take_plaintext(&mut connection.borrow_mut(), &mut buf) {
            Ok(0) => {}
            taken => return (taken, buf),
        }
        let (result, returned) = feed_records(socket, connection, std::mem::take(ciphertext)).await;
        *ciphertext = returned;
        match result {
            Ok(0) => return (Ok(0), buf),
            Ok(_) => {}
            Err(error) => return (Err(error), buf),
        }
    }
}

/// Moves the plaintext rustls holds into `buf`, at most its spare capacity. `Ok(0)`: none yet.
fn take_plaintext(connection: &mut ClientConnection, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut reader = connection.reader();
    match reader.fill_buf() {
        Ok([]) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the target ended TLS (close_notify)")),
        Ok(plaintext) => {
            let taken = plaintext.len().min(room);
            buf.extend_from_slice(&plaintext[..taken]);
            reader.consume(taken);
            Ok(taken)
        }
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(error) => Err(error),
    }
}

/// Hands rustls one more piece of ciphertext (what rustls takes at once), reading the socket
/// first when nothing read is left over. Feeding piece by piece, with the plaintext taken in
/// between, keeps rustls's received-plaintext buffer from filling up. `Ok(0)` is end of stream.
async fn feed_records<R: AsyncReadRent>(
    socket: &mut R,
    connection: &RefCell<ClientConnection>,
    ciphertext: BytesMut,
) -> (io::Result<usize>, BytesMut) {
    let mut ciphertext = ciphertext;
    if ciphertext.is_empty() {
        ciphertext.clear();
        ciphertext.reserve(TLS_READ_BYTES);
        let (result, returned) = socket.read(ciphertext).await;
        ciphertext = returned;
        match result {
            Ok(0) => return (Ok(0), ciphertext),
            Ok(_) => {}
            Err(error) => return (Err(error), ciphertext),
        }
    }
    let mut connection = connection.borrow_mut();
    let mut unread = &ciphertext[..];
    let fed = match connection.read_tls(&mut unread) {
        Ok(fed) => fed,
        Err(error) => return (Err(error), ciphertext),
    };
    ciphertext.advance(fed);
    if let Err(error) = connection.process_new_packets() {
        return (Err(io::Error::new(io::ErrorKind::InvalidData, error)), ciphertext);
    }
    // A piece of a record is progress too: rustls keeps it until the rest arrives.
    (Ok(fed.max(1)), ciphertext)
}

/// Encrypts `plaintext` and writes it, a buffer-limit's worth of records at a time.
async fn write_tls<W: AsyncWriteRent>(
    socket: &mut W,
    connection: &RefCell<ClientConnection>,
    ciphertext: &mut Vec<u8>,
    plaintext: BytesMut,
) -> (io::Result<()>, BytesMut) {
    let mut written = 0;
    loop {
        if written < plaintext.len() {
            match connection.borrow_mut().writer().write(&plaintext[written..]) {
                Ok(taken) => written += taken,
                Err(error) => return (Err(error), plaintext),
            }
        }
        match write_pending(socket, connection, std::mem::take(ciphertext)).await {
            Ok(buffer) => *ciphertext = buffer,
            Err(error) => return (Err(error), plaintext),
        }
        if written == plaintext.len() {
            return (Ok(()), plaintext);
        }
    }
}

/// Writes every record rustls has queued; returns the (emptied) ciphertext buffer.
async fn write_pending<W: AsyncWriteRent>(
    socket: &mut W,
    connection: &RefCell<ClientConnection>,
    ciphertext: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let mut ciphertext = ciphertext;
    loop {
        ciphertext.clear();
        {
            let mut connection = connection.borrow_mut();
            while connection.wants_write() {
                connection.write_tls(&mut ciphertext)?;
            }
        }
        if ciphertext.is_empty() {
            return Ok(ciphertext);
        }
        let (result, returned) = socket.write_all(ciphertext).await;
        ciphertext = returned;
        result?;
    }
}
