//! Socket plumbing for the generator (IO): connecting, reading into spare capacity, the
//! per-connection write queue and its writer task, and a single-threaded notification.
//!
//! A connection's tasks share its [`Link`]: whoever has bytes to send appends them to the
//! outbox and notifies the writer, which swaps the outbox for an empty buffer and writes the
//! whole batch with one io_uring write. The outbox is bounded by its producers
//! ([`OUTBOX_HIGH_WATER_BYTES`]); replies a reader queues (acks, pongs) are small and bounded
//! by what the target sent.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::BytesMut;
use monoio::net::TcpStream;

use super::stream::WriteHalf;
use super::wire::Framing;

/// A publisher stops appending once its outbox holds this much; the writer drains it.
pub const OUTBOX_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Read buffers of all connections of a run together (each between the two bounds below), so
/// that a fan-out to thousands of subscribers stays within a few MiB.
pub const READ_BUFFERS_TOTAL_BYTES: usize = 4 * 1024 * 1024;
/// Read buffer of a busy connection; grown only for a message larger than this.
pub const MAX_READ_BUFFER_BYTES: usize = 256 * 1024;
pub const MIN_READ_BUFFER_BYTES: usize = 16 * 1024;
/// A read is issued with at least this much spare capacity.
const MIN_READ_SPARE_BYTES: usize = 16 * 1024;

/// A wake-up for one waiting task, remembered if it comes before the wait.
#[derive(Default)]
pub struct Notify {
    notified: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Notify {
    pub fn notify(&self) {
        self.notified.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Completes once `notify` has been called since the last completed wait.
    pub fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.notified.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
    }
}

/// Connects to `addr`, from `source` (port chosen by the kernel at connect time) when given.
/// Sets TCP_NODELAY.
pub async fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    let stream = match (source, addr) {
        (None, _) => TcpStream::connect_addr(addr).await?,
        (Some(source), SocketAddr::V4(_)) => connect_from(addr, source).await?,
        (Some(_), SocketAddr::V6(_)) => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "--source-ips needs an IPv4 target address"))
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A non-blocking connect from `source`, completed through the runtime. With
/// IP_BIND_ADDRESS_NO_PORT the source port is picked per 4-tuple at connect time, so each
/// source address gives its own ~28K ephemeral ports per target.
async fn connect_from(addr: SocketAddr, source: Ipv4Addr) -> io::Result<TcpStream> {
    let SocketAddr::V4(target) = addr else { unreachable!("checked by the caller") };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns; the std stream closes it on every
    // path from here on.
    let std_stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: passes a pointer to a live c_int and its exact size. Failure only costs ports.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let local = sockaddr_in(source, 0);
    // SAFETY: `local` is a valid sockaddr_in and its exact size is passed.
    let rc = unsafe { libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), sockaddr_in_len()) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(error.kind(), format!("cannot bind to source address {source}: {error}")));
    }
    let remote = sockaddr_in(*target.ip(), target.port());
    // SAFETY: `fd` is open (owned by `std_stream`); `remote` is a valid sockaddr_in and its
    // exact size is passed.
    let rc = unsafe { libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), sockaddr_in_len()) };
    if rc != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(error);
        }
    }
    let stream = TcpStream::from_std(std_stream)?;
    stream.writable(false).await?;
    let mut socket_error: libc::c_int = 0;
    let mut length = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the stream owns `fd` and is alive; we pass a live c_int and its size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut socket_error as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if socket_error != 0 {
        return Err(io::Error::from_raw_os_error(socket_error));
    }
    Ok(stream)
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    }
}

fn sockaddr_in_len() -> libc::socklen_t {
    mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
}

/// Raises the open-files soft limit to the hard limit; returns the soft limit now in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit through the pointer, which points at the live `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads one rlimit through the pointer, which points at the live `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    Ok(limit.rlim_cur)
}

/// Gives `buf` at least `MIN_READ_SPARE_BYTES` of spare capacity for the next read.
pub fn reserve_read_room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_READ_SPARE_BYTES {
        buf.reserve(MIN_READ_SPARE_BYTES.max(buf.capacity() / 2));
    }
}

/// The write side of one connection, shared by its tasks.
pub struct Link {
    pub framing: Framing,
    pub outbox: RefCell<BytesMut>,
    /// Wakes the writer: the outbox has bytes, or the link is closing.
    pub writer: Notify,
    /// Called whenever the writer has taken the outbox's contents (a publisher waits for room).
    on_drained: Box<dyn Fn()>,
    /// The writer exits once the outbox is empty.
    pub closing: Cell<bool>,
    /// The writer has exited.
    pub finished: Cell<bool>,
}

impl Link {
    pub fn new(framing: Framing, on_drained: Box<dyn Fn()>) -> Rc<Link> {
        Rc::new(Link {
            framing,
            // Grown on demand: a consumer's outbox only ever holds a few acknowledgements.
            outbox: RefCell::new(BytesMut::new()),
            writer: Notify::default(),
            on_drained,
            closing: Cell::new(false),
            finished: Cell::new(false),
        })
    }

    /// Appends one framed payload and wakes the writer.
    pub fn send(&self, payload: &[u8]) {
        self.framing.frame(&mut self.outbox.borrow_mut(), payload);
        self.writer.notify();
    }

    pub fn close(&self) {
        self.closing.set(true);
        self.writer.notify();
    }
}

/// Writes everything queued on `link` until it closes; returns the first write error.
pub async fn write_loop(link: Rc<Link>, mut writer: WriteHalf) -> io::Result<()> {
    let mut batch = BytesMut::new();
    let result = loop {
        if link.outbox.borrow().is_empty() {
            if link.closing.get() {
                break Ok(());
            }
            link.writer.notified().await;
            continue;
        }
        mem::swap(&mut *link.outbox.borrow_mut(), &mut batch);
        // The outbox is empty again: producers may refill it while this batch is written.
        (link.on_drained)();
        let (result, written) = writer.write_all(batch).await;
        batch = written;
        batch.clear();
        if let Err(error) = result {
            break Err(error);
        }
    };
    link.finished.set(true);
    (link.on_drained)();
    result
}
