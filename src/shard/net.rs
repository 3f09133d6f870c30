//! Socket and CPU plumbing for shard start-up: SO_REUSEPORT listeners and thread pinning.

use std::io;
use std::mem;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd};

/// Binds `count` listeners on the same address with SO_REUSEPORT, so the kernel spreads
/// incoming connections over the shards. With port 0, the first bind picks the port and the
/// others join it.
///
/// SO_REUSEPORT would also let a second broker of the same user join our group (and take part
/// of our traffic) or us join its group. So a fixed port is first bound by a probe socket
/// *without* SO_REUSEPORT, which fails with "address already in use" if any socket holds the
/// address; the probe is closed and the group bound straight after. Another SO_REUSEPORT
/// socket could only slip in during those few system calls, which would take two brokers
/// started within microseconds of each other on the same port; anything else that binds there
/// in between makes our own bind fail with the same clear error. Port 0 needs no probe: the
/// kernel picks a port no socket holds.
pub fn bind_all(addr: SocketAddr, count: usize) -> io::Result<Vec<TcpListener>> {
    let in_use = |error: io::Error| {
        if error.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                error.kind(),
                format!(
                    "cannot listen on {addr}: address already in use (another process listens there, perhaps \
                     another mbws-broker); stop it, or give this broker another --listen address"
                ),
            )
        } else {
            io::Error::new(error.kind(), format!("cannot listen on {addr}: {error}; pick another --listen address"))
        }
    };
    if addr.port() != 0 {
        drop(bind_socket(addr, false).map_err(in_use)?);
    }
    let first = bind_reuseport(addr).map_err(in_use)?;
    let actual = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_reuseport(actual).map_err(in_use)?);
    }
    Ok(listeners)
}

/// One listening socket with SO_REUSEADDR and SO_REUSEPORT set before bind.
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = bind_socket(addr, true)?;
    // SAFETY: listen(2) on a socket the listener owns.
    if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// One bound (not yet listening) socket with SO_REUSEADDR, and SO_REUSEPORT if `reuse_port`,
/// set before bind. The probe never listens, so no connection can reach it.
fn bind_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns; the listener closes it on every path.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let options: &[libc::c_int] =
        if reuse_port { &[libc::SO_REUSEADDR, libc::SO_REUSEPORT] } else { &[libc::SO_REUSEADDR] };
    for &option in options {
        // SAFETY: passes a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&one as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let rc = match addr {
        SocketAddr::V4(v4) => {
            let raw = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: `raw` is a valid sockaddr_in and its exact size is passed.
            unsafe {
                libc::bind(fd, (&raw as *const libc::sockaddr_in).cast(), mem::size_of_val(&raw) as libc::socklen_t)
            }
        }
        SocketAddr::V6(v6) => {
            let raw = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: `raw` is a valid sockaddr_in6 and its exact size is passed.
            unsafe {
                libc::bind(fd, (&raw as *const libc::sockaddr_in6).cast(), mem::size_of_val(&raw) as libc::socklen_t)
            }
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(listener)
}

/// The CPUs this process may run on (its affinity mask), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    let mut set = empty_cpu_set();
    // SAFETY: `set` is a live cpu_set_t and its exact size is passed, so the kernel writes
    // inside it.
    if unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: CPU_ISSET reads one bit of the live `set`; every index is below CPU_SETSIZE,
    // the number of bits the set holds.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

fn empty_cpu_set() -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is an array of integers, for which all-zero bytes are a valid value
    // (the empty set).
    unsafe { mem::zeroed() }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    assert!(cpu < libc::CPU_SETSIZE as usize, "CPU {cpu} is beyond CPU_SETSIZE: it comes from allowed_cpus");
    let mut set = empty_cpu_set();
    // SAFETY: CPU_SET writes one bit of the live `set`; `cpu` is below CPU_SETSIZE (asserted).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t and its exact size is passed; the kernel only reads it.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
