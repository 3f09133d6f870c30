//! `mbws-relay`: the physical-limit baseline. A single-threaded monoio io_uring TCP relay that
//! forwards length-prefixed frames from publishers to subscribers and does nothing else: no
//! WebSocket, no masking, no protocol, no queue, no per-message syscall.
//!
//! Wire format (`mbws_bench::targets::relay`): every frame is a u32 big-endian length and a
//! payload. A connection's first frame is its hello: `PUB`, `SUB` (anycast: each chunk of frames
//! goes to one such subscriber, round-robin) or `SUBALL` (broadcast: every such subscriber gets
//! every frame). The relay answers `OK` once the connection is registered.
//!
//! Data path: a publisher's read buffer (256 KiB) is scanned for the end of its last complete
//! frame, and that whole prefix is appended to the chosen subscribers' outboxes at once (one
//! copy per subscriber, not per frame); each subscriber's writer writes its whole outbox with one
//! io_uring write. Anycast is round-robin per read chunk, not per frame: cheaper, and each frame
//! still reaches exactly one subscriber. Bounds: a frame over `--max-frame-bytes` closes its
//! publisher; while any subscriber has `--max-outbound-bytes` queued, publishers are not read
//! (TCP pushes back on them). Frames published while nobody subscribes are dropped.
//!
//! mbws-bench's `relay` target speaks this protocol, so mbws-bench results against the broker
//! divided by the same results against the relay say how close the broker is to the machine.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::{Buf, BytesMut};
use clap::Parser;
use monoio::net::{TcpListener, TcpStream};

use mbws_bench::net::{write_loop, Link};
use mbws_bench::stream::{ReadHalf, Stream};
use mbws_bench::targets::relay::{HELLO_ANYCAST, HELLO_BROADCAST, HELLO_PUBLISHER, READY};
use mbws_bench::wire::{Framing, LENGTH_PREFIX_BYTES};

/// Read buffer of a publisher connection.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Longest hello frame.
const MAX_HELLO_BYTES: usize = 16;

/// A relay between publishers and subscribers, for benchmarks (see mbws-bench).
#[derive(Parser, Debug)]
#[command(name = "mbws-relay", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7450")]
    listen: SocketAddr,
    /// Bytes queued for one subscriber beyond which no publisher is read.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    max_outbound_bytes: usize,
    /// Largest frame payload accepted from a publisher.
    #[arg(long, default_value_t = 16 * 1024 * 1024 + 64 * 1024)]
    max_frame_bytes: usize,
}

/// Publishers waiting for subscribers' outboxes to drain.
#[derive(Default)]
struct WaitList {
    wakers: RefCell<Vec<Waker>>,
}

impl WaitList {
    fn wake_all(&self) {
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

/// Who gets what; only the runtime's one thread touches it.
struct Hub {
    anycast: RefCell<Vec<Rc<Link>>>,
    broadcast: RefCell<Vec<Rc<Link>>>,
    next_anycast: Cell<usize>,
    waiting: Rc<WaitList>,
    max_outbound_bytes: usize,
    max_frame_bytes: usize,
    warned_no_subscriber: Cell<bool>,
}

impl Hub {
    /// Appends a run of whole frames to one anycast subscriber and every broadcast one.
    fn forward(&self, frames: &[u8]) {
        let anycast = self.anycast.borrow();
        let broadcast = self.broadcast.borrow();
        if anycast.is_empty() && broadcast.is_empty() {
            if !self.warned_no_subscriber.replace(true) {
                eprintln!("mbws-relay: frames published while nobody subscribes are dropped");
            }
            return;
        }
        if !anycast.is_empty() {
            let next = self.next_anycast.get();
            self.next_anycast.set(next.wrapping_add(1));
            append(&anycast[next % anycast.len()], frames);
        }
        for link in broadcast.iter() {
            append(link, frames);
        }
    }

    fn over_limit(&self) -> bool {
        let full = |links: &RefCell<Vec<Rc<Link>>>| {
            links.borrow().iter().any(|link| link.outbox.borrow().len() >= self.max_outbound_bytes)
        };
        full(&self.anycast) || full(&self.broadcast)
    }

    /// Waits until every subscriber has room.
    async fn room(&self) {
        std::future::poll_fn(|cx| {
            if self.over_limit() {
                self.waiting.wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    fn remove(&self, link: &Rc<Link>) {
        for links in [&self.anycast, &self.broadcast] {
            links.borrow_mut().retain(|other| !Rc::ptr_eq(other, link));
        }
        self.waiting.wake_all();
    }
}

fn append(link: &Link, frames: &[u8]) {
    link.outbox.borrow_mut().extend_from_slice(frames);
    link.writer.notify();
}

/// Length of the longest prefix of `buf` made of whole frames.
fn complete_frames(buf: &[u8], max_frame_bytes: usize) -> Result<usize, String> {
    let mut end = 0;
    while let Some(prefix) = buf.get(end..end + LENGTH_PREFIX_BYTES) {
        let length = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if length > max_frame_bytes {
            return Err(format!("a {length}-byte frame is over --max-frame-bytes {max_frame_bytes}"));
        }
        if buf.len() < end + LENGTH_PREFIX_BYTES + length {
            break;
        }
        end += LENGTH_PREFIX_BYTES + length;
    }
    Ok(end)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !monoio::utils::detect_uring() {
        eprintln!("mbws-relay: io_uring is not available (kernel older than 5.6, or disabled); it is required");
        return ExitCode::from(1);
    }
    let mut runtime = match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().with_entries(4096).build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mbws-relay: cannot start an io_uring event loop: {error}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let listener = match TcpListener::bind(args.listen) {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("mbws-relay: cannot listen on {}: {error}", args.listen);
                return ExitCode::from(1);
            }
        };
        let local = listener.local_addr().unwrap_or(args.listen);
        eprintln!("mbws-relay: listening on {local} (io_uring, one thread)");
        let hub = Rc::new(Hub {
            anycast: RefCell::new(Vec::new()),
            broadcast: RefCell::new(Vec::new()),
            next_anycast: Cell::new(0),
            waiting: Rc::new(WaitList::default()),
            max_outbound_bytes: args.max_outbound_bytes,
            max_frame_bytes: args.max_frame_bytes,
            warned_no_subscriber: Cell::new(false),
        });
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let hub = hub.clone();
                    monoio::spawn(async move {
                        if let Err(error) = serve(hub, stream).await {
                            eprintln!("mbws-relay: connection from {peer}: {error}");
                        }
                    });
                }
                Err(error) => {
                    eprintln!("mbws-relay: accept failed: {error}");
                    monoio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn serve(hub: Rc<Hub>, stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = Stream::Plain(stream).into_split();
    let mut buf = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let hello = loop {
        if let Some(prefix) = buf.get(..LENGTH_PREFIX_BYTES) {
            let length = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
            if length > MAX_HELLO_BYTES {
                return Err(format!("a {length}-byte hello; expected PUB, SUB or SUBALL"));
            }
            if buf.len() >= LENGTH_PREFIX_BYTES + length {
                buf.advance(LENGTH_PREFIX_BYTES);
                break buf.split_to(length);
            }
        }
        let (result, returned) = reader.read_more(buf).await;
        buf = returned;
        match result {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) => return Err(format!("read failed: {error}")),
        }
    };
    let waiting = hub.waiting.clone();
    let link = Link::new(Framing::LengthPrefixed, Box::new(move || waiting.wake_all()));
    link.send(READY);
    let writer_task = monoio::spawn(write_loop(link.clone(), writer));
    let result = match &hello[..] {
        HELLO_PUBLISHER => publish(&hub, &mut reader, buf).await,
        HELLO_ANYCAST | HELLO_BROADCAST => {
            let list = if &hello[..] == HELLO_ANYCAST { &hub.anycast } else { &hub.broadcast };
            list.borrow_mut().push(link.clone());
            let result = drain_until_closed(&mut reader, buf).await;
            hub.remove(&link);
            result
        }
        other => Err(format!("unknown hello {:?}; expected PUB, SUB or SUBALL", String::from_utf8_lossy(other))),
    };
    link.close();
    let _ = writer_task.await;
    result
}

/// Forwards a publisher's frames until it disconnects.
async fn publish(hub: &Hub, reader: &mut ReadHalf, mut buf: BytesMut) -> Result<(), String> {
    loop {
        let complete = complete_frames(&buf, hub.max_frame_bytes)?;
        if complete > 0 {
            hub.forward(&buf[..complete]);
            buf.advance(complete);
        }
        hub.room().await;
        if buf.capacity() < READ_BUFFER_BYTES {
            buf.reserve(READ_BUFFER_BYTES - buf.len());
        }
        let (result, returned) = reader.read_more(buf).await;
        buf = returned;
        match result {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) => return Err(format!("read failed: {error}")),
        }
    }
}

/// Reads (and ignores) whatever a subscriber sends until it disconnects.
async fn drain_until_closed(reader: &mut ReadHalf, mut buf: BytesMut) -> Result<(), String> {
    loop {
        buf.clear();
        let (result, returned) = reader.read_more(buf).await;
        buf = returned;
        match result {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(error) => return Err(format!("read failed: {error}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_the_last_whole_frame() {
        let mut buf = vec![0, 0, 0, 2, b'a', b'b', 0, 0, 0, 1, b'c', 0, 0, 0, 5, b'x'];
        assert_eq!(complete_frames(&buf, 16), Ok(11));
        buf.truncate(3);
        assert_eq!(complete_frames(&buf, 16), Ok(0));
        assert!(complete_frames(&[0, 0, 1, 0], 16).is_err());
    }
}
