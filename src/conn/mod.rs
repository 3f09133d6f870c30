//! Connections: the IO shell around the sans-IO WebSocket codec and MBWS session.
//!
//! Each accepted socket gets two monoio tasks on its shard:
//! - the reader ([`serve`]): HTTP upgrade (bounded by `handshake_timeout` and
//!   `max_handshake_bytes`), then reads into a `BytesMut`, decodes WebSocket messages in place
//!   and feeds them to the [`Session`]; it stops reading while the session holds
//!   `max_inflight_sends` unanswered SENDs or the write queue is over `max_outbound_bytes`;
//! - the writer ([`write_loop`]): takes everything queued in the [`Outbound`] as one batch and
//!   writes it with one vectored write, returning auto-ack credit once the batch is on the wire.
//!
//! State the shard's dispatcher also touches (session, write queue, wakers) sits in one
//! `RefCell` per connection. Nobody holds that borrow across an `.await` or while calling back
//! into the shard, so borrows never overlap.

pub mod outbound;
pub mod session;

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Splitable};
use monoio::net::TcpStream;

use crate::broker::{AddressCommand, ConnRef, ShardId};
use crate::log;
use crate::logging::Level;
use crate::mbws::{Binding, ErrorCode};
use crate::shard::{now_ms, Shard};
use crate::ws::handshake::{self, HandshakeError};
use crate::ws::message::{close_payload, Decoder, WsEvent};
use crate::ws::{OpCode, Role, WsError};
use outbound::{Outbound, WriteBatch};
use session::{Effects, Session};

pub type ConnectionCell = Rc<RefCell<Connection>>;

/// How long a closing connection waits for the peer's close frame, and for its last writes.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// The part of a connection shared by its reader, its writer and the shard's dispatcher.
pub struct Connection {
    pub session: Session,
    pub outbound: Outbound,
    max_outbound_bytes: usize,
    writer_waker: Option<Waker>,
    reader_waker: Option<Waker>,
    /// A close frame is queued (or the socket failed): no more input is processed.
    closing: bool,
    /// The reader has finished: the writer exits once the queue is written.
    reader_done: bool,
}

impl Connection {
    fn new(session: Session, max_outbound_bytes: usize) -> Connection {
        Connection {
            session,
            outbound: Outbound::new(),
            max_outbound_bytes,
            writer_waker: None,
            reader_waker: None,
            closing: false,
            reader_done: false,
        }
    }

    /// End of a round of work: cumulative receipt, then wake whoever can make progress.
    pub fn flush(&mut self) {
        self.session.flush(&mut self.outbound);
        if !self.outbound.is_empty() {
            if let Some(waker) = self.writer_waker.take() {
                waker.wake();
            }
        }
        if self.reader_may_continue() {
            if let Some(waker) = self.reader_waker.take() {
                waker.wake();
            }
        }
    }

    fn reader_may_continue(&self) -> bool {
        self.closing || (self.session.can_accept_sends() && self.outbound.queued_bytes() < self.max_outbound_bytes)
    }

    /// Queues a close frame and stops processing input.
    pub fn begin_close(&mut self, code: u16, reason: &str) {
        if !self.closing {
            self.closing = true;
            self.outbound.push_control(OpCode::Close, &close_payload(code, reason));
        }
        self.wake_all();
    }

    fn wake_all(&mut self) {
        if let Some(waker) = self.writer_waker.take() {
            waker.wake();
        }
        if let Some(waker) = self.reader_waker.take() {
            waker.wake();
        }
    }
}

/// A `BytesMut` that io_uring reads into after its current contents.
struct ReadTail(BytesMut);

// SAFETY: the pointer is the start of the spare capacity and `bytes_total` its exact length;
// the buffer is owned by this value (heap memory that does not move with it) while the runtime
// holds it; `set_init(n)` marks the `n` bytes the kernel wrote as initialized.
unsafe impl IoBufMut for ReadTail {
    fn write_ptr(&mut self) -> *mut u8 {
        // SAFETY: `len <= capacity`, so the result is inside (or one past) the allocation.
        unsafe { self.0.as_mut_ptr().add(self.0.len()) }
    }

    fn bytes_total(&mut self) -> usize {
        self.0.capacity() - self.0.len()
    }

    unsafe fn set_init(&mut self, written: usize) {
        // SAFETY: the kernel initialized `written` bytes of spare capacity (caller contract).
        unsafe { self.0.set_len(self.0.len() + written) }
    }
}

/// Reads once into the spare capacity of `buf` (grown first if nearly full). Ok(0) is EOF.
async fn read_more(
    reader: &mut OwnedReadHalf<TcpStream>,
    buf: BytesMut,
    grow_bytes: usize,
) -> (std::io::Result<usize>, BytesMut) {
    let mut buf = buf;
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(grow_bytes.max(4096));
    }
    let (result, tail) = reader.read(ReadTail(buf)).await;
    (result, tail.0)
}

/// Serves one accepted TCP connection until it closes.
pub async fn serve(shard: Rc<Shard>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let config = shard.config.clone();
    let mut buf = BytesMut::with_capacity(config.read_buffer_bytes.min(16 * 1024));

    let upgrade = match monoio::time::timeout(
        config.handshake_timeout,
        read_upgrade(&mut stream, &mut buf, config.max_handshake_bytes),
    )
    .await
    {
        Ok(Ok(upgrade)) => upgrade,
        Ok(Err(Some(refusal))) => {
            log!(
                Level::Debug,
                "shard {}: refused upgrade from {peer}: {} {}",
                shard.id.0,
                refusal.status,
                refusal.reason
            );
            let (_, _) = stream.write_all(refusal.response()).await;
            let _ = stream.shutdown().await;
            return;
        }
        Ok(Err(None)) => return, // The peer went away mid-request.
        Err(_) => {
            let refusal = HandshakeError {
                status: 408,
                reason: format!(
                    "the WebSocket upgrade request did not complete within {} ms (handshake timeout)",
                    config.handshake_timeout.as_millis()
                ),
            };
            let (_, _) = stream.write_all(refusal.response()).await;
            let _ = stream.shutdown().await;
            return;
        }
    };

    let session_config = shard.session_config.clone();
    let (me, cell) = shard
        .register(|me| Connection::new(Session::new(me, upgrade.protocol, session_config), config.max_outbound_bytes));
    log!(
        Level::Debug,
        "shard {}: connection {}.{} from {peer} upgraded with {}",
        shard.id.0,
        me.conn.index,
        me.conn.generation,
        upgrade.protocol.name()
    );
    cell.borrow_mut().outbound.push_raw(&handshake::accept_response(&upgrade));

    let (mut reader, writer) = stream.into_split();
    monoio::spawn(write_loop(shard.clone(), me, cell.clone(), writer));
    read_loop(&shard, me, &cell, &mut reader, buf).await;

    // Teardown: owners drop this connection's subscriptions and requeue its deliveries.
    let mut commands = Vec::new();
    {
        let mut connection = cell.borrow_mut();
        connection.session.on_disconnect(&mut commands);
        connection.reader_done = true;
        connection.closing = true;
        connection.wake_all();
    }
    shard.unregister(me.conn);
    shard.submit_address_commands(&mut commands);
    shard.run_work();
    log!(Level::Debug, "shard {}: connection {}.{} from {peer} closed", shard.id.0, me.conn.index, me.conn.generation);
}

/// Reads until a complete upgrade request is parsed and accepted. `Err(Some)` is a refusal to
/// send back; `Err(None)` means the peer went away.
async fn read_upgrade(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max_bytes: usize,
) -> Result<handshake::Upgrade, Option<HandshakeError>> {
    loop {
        match handshake::parse_request(buf, max_bytes) {
            Ok(Some((request, consumed))) => {
                let upgrade = handshake::validate_upgrade(&request).map_err(Some)?;
                // Bytes after the request (a first frame sent eagerly) stay in `buf`.
                buf.advance(consumed);
                return Ok(upgrade);
            }
            Ok(None) => {}
            Err(refusal) => return Err(Some(refusal)),
        }
        let owned = std::mem::take(buf);
        if owned.capacity() - owned.len() == 0 {
            return Err(Some(HandshakeError {
                status: 431,
                reason: format!("the upgrade request is larger than {max_bytes} bytes (max_handshake_bytes)"),
            }));
        }
        let (result, tail) = stream.read(ReadTail(owned)).await;
        *buf = tail.0;
        match result {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

enum Step {
    /// Everything buffered is handled; read more.
    NeedMore,
    /// Stop until the session can take more SENDs or the write queue drains.
    Paused,
    /// The connection is closing.
    Closing,
}

async fn read_loop(
    shard: &Rc<Shard>,
    me: ConnRef,
    cell: &ConnectionCell,
    reader: &mut OwnedReadHalf<TcpStream>,
    mut buf: BytesMut,
) {
    let config = shard.config.clone();
    let mut decoder = Decoder::new(Role::Server, config.max_frame_bytes, config.max_message_bytes);
    let mut commands: Vec<(ShardId, AddressCommand)> = Vec::new();
    loop {
        wait_until_reader_may_continue(cell).await;
        let step = process_buffered(shard, me, cell, &mut decoder, &mut buf, &mut commands);
        shard.submit_address_commands(&mut commands);
        shard.mark_dirty(me.conn);
        shard.run_work();
        match step {
            Step::Closing => break,
            Step::Paused => continue,
            Step::NeedMore => {}
        }
        // Silence is bounded: before OPEN by open_timeout, after it by twice the heartbeat.
        let (open, heartbeat_ms) = {
            let connection = cell.borrow();
            (connection.session.is_open(), connection.session.heartbeat_ms())
        };
        let deadline = match (open, heartbeat_ms) {
            (false, _) => Some(config.open_timeout),
            (true, 0) => None,
            (true, heartbeat_ms) => Some(Duration::from_millis(2 * u64::from(heartbeat_ms))),
        };
        let grow = config.read_buffer_bytes;
        let read = match deadline {
            None => read_more(reader, buf, grow).await,
            Some(deadline) => match monoio::time::timeout(deadline, read_more(reader, buf, grow)).await {
                Ok(read) => read,
                Err(_) => {
                    let reason = if open {
                        format!(
                            "nothing received for {} ms, twice the heartbeat interval; send PING when idle",
                            deadline.as_millis()
                        )
                    } else {
                        format!("no OPEN within {} ms of the upgrade; send OPEN first", deadline.as_millis())
                    };
                    close_with_error(cell, ErrorCode::Timeout, reason);
                    shard.run_work();
                    return;
                }
            },
        };
        let (result, returned) = read;
        buf = returned;
        match result {
            Ok(0) | Err(_) => return, // EOF or reset: nothing more to say to this peer.
            Ok(_) => {}
        }
    }
    wait_for_peer_close(reader, &mut decoder, buf, config.read_buffer_bytes).await;
}

fn close_with_error(cell: &ConnectionCell, code: ErrorCode, reason: String) {
    let mut connection = cell.borrow_mut();
    let frame = crate::mbws::Frame::Error(crate::mbws::ErrorFrame {
        code: code.as_u16(),
        fatal: true,
        seq: 0,
        subscription_id: 0,
        reason: bytes::Bytes::from(reason.clone()),
    });
    connection.outbound.push_frame(Binding::Binary, &frame);
    connection.begin_close(code.as_u16(), &reason);
}

async fn wait_until_reader_may_continue(cell: &ConnectionCell) {
    std::future::poll_fn(|cx| {
        let mut connection = cell.borrow_mut();
        if connection.reader_may_continue() {
            Poll::Ready(())
        } else {
            connection.reader_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    })
    .await
}

/// Decodes and handles every complete WebSocket message in `buf`.
fn process_buffered(
    shard: &Shard,
    me: ConnRef,
    cell: &ConnectionCell,
    decoder: &mut Decoder,
    buf: &mut BytesMut,
    commands: &mut Vec<(ShardId, AddressCommand)>,
) -> Step {
    let mut connection = cell.borrow_mut();
    let connection = &mut *connection;
    let now = now_ms();
    loop {
        if connection.closing {
            return Step::Closing;
        }
        if !connection.reader_may_continue() {
            return Step::Paused;
        }
        let event = match decoder.next_event(buf) {
            Ok(Some(event)) => event,
            Ok(None) => return Step::NeedMore,
            Err(WsError { close_code, reason }) => {
                log!(
                    Level::Debug,
                    "shard {}: conn {}: websocket error {close_code}: {reason}",
                    shard.id.0,
                    me.conn.index
                );
                connection.begin_close(close_code, &reason);
                return Step::Closing;
            }
        };
        let (binding, payload) = match event {
            WsEvent::Binary(payload) => (Binding::Binary, payload),
            WsEvent::Text(payload) => (Binding::Text, payload),
            WsEvent::Ping(payload) => {
                connection.outbound.push_control(OpCode::Pong, &payload);
                continue;
            }
            WsEvent::Pong(_) => continue,
            WsEvent::Close(frame) => {
                // Echo the peer's code (RFC 6455 section 5.5.1); no code means none is echoed.
                let payload = match &frame {
                    Some(frame) => close_payload(frame.code, ""),
                    None => BytesMut::new(),
                };
                connection.closing = true;
                connection.outbound.push_control(OpCode::Close, &payload);
                connection.wake_all();
                return Step::Closing;
            }
        };
        let mut fx = Effects { outbound: &mut connection.outbound, commands };
        if let Err(end) = connection.session.on_message(binding, payload, now, &mut fx) {
            log!(
                Level::Debug,
                "shard {}: conn {}: session ended: {} {}",
                shard.id.0,
                me.conn.index,
                end.close_code,
                end.reason
            );
            connection.begin_close(end.close_code, &end.reason);
            return Step::Closing;
        }
    }
}

/// After we queued a close frame: discard input until the peer's close frame or EOF, bounded
/// by `CLOSE_GRACE`.
async fn wait_for_peer_close(
    reader: &mut OwnedReadHalf<TcpStream>,
    decoder: &mut Decoder,
    mut buf: BytesMut,
    grow: usize,
) {
    let _ = monoio::time::timeout(CLOSE_GRACE, async {
        loop {
            loop {
                match decoder.next_event(&mut buf) {
                    Ok(Some(WsEvent::Close(_))) | Err(_) => return,
                    Ok(Some(_)) => continue,
                    Ok(None) => break,
                }
            }
            let (result, returned) = read_more(reader, buf, grow).await;
            buf = returned;
            match result {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Writes whatever the connection queues, one vectored write per batch.
async fn write_loop(shard: Rc<Shard>, me: ConnRef, cell: ConnectionCell, mut writer: OwnedWriteHalf<TcpStream>) {
    let mut batch = WriteBatch::default();
    let mut commands: Vec<(ShardId, AddressCommand)> = Vec::new();
    loop {
        let mut spare = Some(std::mem::take(&mut batch));
        let next = std::future::poll_fn(|cx| {
            let mut connection = cell.borrow_mut();
            if let Some(taken) = connection.outbound.take_batch(spare.take().unwrap_or_default()) {
                return Poll::Ready(Some(taken));
            }
            if connection.reader_done || (connection.closing && connection.outbound.close_queued()) {
                return Poll::Ready(None);
            }
            connection.writer_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        let Some(taken) = next else { break };
        batch = taken;
        let closing = cell.borrow().closing;
        let written = if closing {
            monoio::time::timeout(CLOSE_GRACE, write_batch(&mut writer, batch)).await.ok()
        } else {
            Some(write_batch(&mut writer, batch).await)
        };
        let Some((result, returned)) = written else { break };
        batch = returned;
        if result.is_err() {
            // The peer is gone; the reader sees it too and tears the connection down.
            let mut connection = cell.borrow_mut();
            connection.closing = true;
            connection.wake_all();
            break;
        }
        for (owner, subscription, count) in batch.credits.drain(..) {
            commands.push((owner, AddressCommand::ReturnCredit { consumer: me, subscription, count }));
        }
        if !commands.is_empty() {
            shard.submit_address_commands(&mut commands);
            shard.run_work();
        }
        let mut connection = cell.borrow_mut();
        if connection.reader_may_continue() {
            if let Some(waker) = connection.reader_waker.take() {
                waker.wake();
            }
        }
    }
    let _ = writer.shutdown().await;
}

/// Writes a whole batch, resuming after partial writes.
async fn write_batch(
    writer: &mut OwnedWriteHalf<TcpStream>,
    mut batch: WriteBatch,
) -> (std::io::Result<()>, WriteBatch) {
    while !batch.is_done() {
        let (result, returned) = writer.writev(batch).await;
        batch = returned;
        match result {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), batch),
            Ok(written) => batch.advance(written),
            Err(error) => return (Err(error), batch),
        }
    }
    (Ok(()), batch)
}
