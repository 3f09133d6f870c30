//! A TCP proxy for fault injection (127.0.0.1 only): forwards every client connection to the
//! broker and, driven by a seeded random schedule, cuts connections (both directions, at any
//! byte) and stalls them (stops forwarding for a while, then resumes). Everything it does is
//! bounded: it runs until dropped, cuts at most `max_cuts` times, and every stall is short.
//! A test can also black-hole it ([`ChaosProxy::set_blackholed`]: what is read is dropped,
//! counted) to lose chosen bytes before a cut.

#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A small deterministic generator (xorshift64*), so a failing run can be replayed by seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `low..high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low).max(1)
    }
}

struct Link {
    client: TcpStream,
    upstream: TcpStream,
    stalled: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    /// The proxy's [`ChaosProxy::set_blackholed`] and the bytes it dropped.
    blackholed: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub seed: u64,
    /// Pause between two faults, in milliseconds (uniform in this range).
    pub gap_ms: (u64, u64),
    /// Share of faults that are cuts (the rest are stalls), in percent.
    pub cut_percent: u64,
    /// Length of a stall, in milliseconds.
    pub stall_ms: (u64, u64),
    pub max_cuts: u64,
}

pub struct ChaosProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// A partition ([`ChaosProxy::set_partitioned`]): every link cut, new ones refused.
    partitioned: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<Link>>>,
    cuts: Arc<AtomicU64>,
    stalls: Arc<AtomicU64>,
    blackholed: Arc<AtomicBool>,
    /// Bytes read from the client side and dropped while black-holed.
    dropped: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl ChaosProxy {
    pub fn start(upstream: SocketAddr, schedule: Schedule) -> ChaosProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicU64::new(0));
        let stalls = Arc::new(AtomicU64::new(0));
        let links: Arc<Mutex<Vec<Link>>> = Arc::new(Mutex::new(Vec::new()));
        let partitioned = Arc::new(AtomicBool::new(false));
        let blackholed = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));

        let acceptor = {
            let (stop, links, partitioned) = (stop.clone(), links.clone(), partitioned.clone());
            let (blackholed, dropped) = (blackholed.clone(), dropped.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        // Partitioned: the connection is closed at once.
                        Ok(_) if partitioned.load(Ordering::Relaxed) => {}
                        Ok((client, _)) => {
                            client.set_nonblocking(false).unwrap();
                            let Ok(upstream) = TcpStream::connect(upstream) else { continue };
                            let _ = client.set_nodelay(true);
                            let _ = upstream.set_nodelay(true);
                            let link = Link {
                                client: client.try_clone().unwrap(),
                                upstream: upstream.try_clone().unwrap(),
                                stalled: Arc::new(AtomicBool::new(false)),
                                alive: Arc::new(AtomicBool::new(true)),
                                blackholed: blackholed.clone(),
                                dropped: dropped.clone(),
                            };
                            let from_client = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                            pump(from_client.0, from_client.1, &link, stop.clone(), true);
                            pump(upstream, client, &link, stop.clone(), false);
                            links.lock().unwrap().push(link);
                        }
                        Err(error) if error.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };

        let controller = {
            let (stop, links, cuts, stalls) = (stop.clone(), links.clone(), cuts.clone(), stalls.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(schedule.seed);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(rng.between(schedule.gap_ms.0, schedule.gap_ms.1)));
                    let mut links = links.lock().unwrap();
                    links.retain(|link| link.alive.load(Ordering::Relaxed));
                    if links.is_empty() {
                        continue;
                    }
                    let index = (rng.next() % links.len() as u64) as usize;
                    let cut = rng.between(0, 100) < schedule.cut_percent;
                    if cut && cuts.load(Ordering::Relaxed) < schedule.max_cuts {
                        let link = links.swap_remove(index);
                        link.alive.store(false, Ordering::Relaxed);
                        let _ = link.client.shutdown(Shutdown::Both);
                        let _ = link.upstream.shutdown(Shutdown::Both);
                        cuts.fetch_add(1, Ordering::Relaxed);
                    } else if !cut {
                        let stalled = links[index].stalled.clone();
                        let length = Duration::from_millis(rng.between(schedule.stall_ms.0, schedule.stall_ms.1));
                        stalled.store(true, Ordering::Relaxed);
                        stalls.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || {
                            std::thread::sleep(length);
                            stalled.store(false, Ordering::Relaxed);
                        });
                    }
                }
                for link in links.lock().unwrap().drain(..) {
                    let _ = link.client.shutdown(Shutdown::Both);
                    let _ = link.upstream.shutdown(Shutdown::Both);
                }
            })
        };
        ChaosProxy {
            addr,
            stop,
            partitioned,
            links,
            cuts,
            stalls,
            blackholed,
            dropped,
            threads: vec![acceptor, controller],
        }
    }

    /// A proxy that injects nothing by itself: faults come only from
    /// [`ChaosProxy::set_partitioned`].
    pub fn quiet(upstream: SocketAddr) -> ChaosProxy {
        let schedule = Schedule { seed: 1, gap_ms: (50, 60), cut_percent: 100, stall_ms: (1, 2), max_cuts: 0 };
        ChaosProxy::start(upstream, schedule)
    }

    /// `true`: a partition (every connection cut, new ones closed at once); `false`: healed.
    pub fn set_partitioned(&self, on: bool) {
        self.partitioned.store(on, Ordering::Relaxed);
        if on {
            for link in self.links.lock().unwrap().drain(..) {
                link.alive.store(false, Ordering::Relaxed);
                let _ = link.client.shutdown(Shutdown::Both);
                let _ = link.upstream.shutdown(Shutdown::Both);
            }
        }
    }

    /// `true`: every byte read, either way, is dropped (those from the client side counted in
    /// [`ChaosProxy::dropped`]); the connections stay up. `false`: forwarding again.
    pub fn set_blackholed(&self, on: bool) {
        self.blackholed.store(on, Ordering::Relaxed);
    }

    /// Bytes from the client side dropped while black-holed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// The live cut count, for a test that paces itself by the faults injected so far.
    pub fn cut_counter(&self) -> Arc<AtomicU64> {
        self.cuts.clone()
    }

    pub fn stalls(&self) -> u64 {
        self.stalls.load(Ordering::Relaxed)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Copies `from` to `to` until either side fails, the link is cut, or the proxy stops; holds
/// data back while the link is stalled, and drops it while the proxy is black-holed.
fn pump(mut from: TcpStream, mut to: TcpStream, link: &Link, stop: Arc<AtomicBool>, from_client: bool) {
    let (stalled, alive) = (link.stalled.clone(), link.alive.clone());
    let (blackholed, dropped) = (link.blackholed.clone(), link.dropped.clone());
    from.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    std::thread::spawn(move || {
        let mut chunk = vec![0u8; 16 * 1024];
        while alive.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            if stalled.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            match from.read(&mut chunk) {
                Ok(0) => break,
                Ok(read) if blackholed.load(Ordering::Relaxed) => {
                    if from_client {
                        dropped.fetch_add(read as u64, Ordering::Relaxed);
                    }
                }
                Ok(read) => {
                    if to.write_all(&chunk[..read]).is_err() {
                        break;
                    }
                }
                Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        alive.store(false, Ordering::Relaxed);
        let _ = from.shutdown(Shutdown::Both);
        let _ = to.shutdown(Shutdown::Both);
    });
}
