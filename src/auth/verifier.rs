//! The authentication step of a connection's opening (IO): the slow-down of failing peers, the
//! decision of [`Auth::check`], and argon2 verifications on threads of their own.
//!
//! Verification threads: [`VERIFY_THREADS`] threads, started with the first password check,
//! take jobs from one bounded queue ([`MAX_QUEUED_VERIFICATIONS`]; a check that finds it full
//! is refused with 4429 at once rather than wait). Each job carries one end of a socket pair;
//! the thread writes one byte (1: the password matched) to it, and the connection's task waits
//! for that byte with an io_uring read, so the shard's event loop serves its other connections
//! meanwhile, at most [`VERIFY_TIMEOUT`].
//!
//! The threads start from whichever shard checks a password first, and a thread inherits its
//! creator's CPU affinity: left so, every verification of the broker would run on that one
//! shard's core. Each thread therefore first takes the CPUs the process may use (its main
//! thread's set) and the lowest priority (SCHED_IDLE, and [`VERIFY_NICE`]), so a storm of
//! logins runs beside the shards on any idle core and yields to them at once on a busy one
//! (scripts/login-storm.sh: the other clients' p99 during 400 logins on one pinned shard was
//! 6.0 ms with nice 10 alone, 2.7 ms with SCHED_IDLE, 1.0 ms without logins). On a machine
//! whose every core is busy with shards, logins wait (up to [`VERIFY_TIMEOUT`], then 4429):
//! the clients already connected keep their latency first.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};
use monoio::io::AsyncReadRent;

use super::failures::FailureTable;
use super::{verify_password, Access, Auth, Check, Credentials};
use crate::mbws::ErrorCode;

/// Threads that verify argon2 hashes. Each verification takes tens of milliseconds of one core
/// (argon2's default cost); two keep a storm of logins from taking more than two cores from the
/// shards, and keep one slow login from waiting behind another.
pub const VERIFY_THREADS: usize = 2;
/// Password checks waiting for a verification thread, in the whole broker.
pub const MAX_QUEUED_VERIFICATIONS: usize = 256;
/// The verification threads' nice value, added to the process's (at most 19): a shard preempts
/// them when both want a core, so other clients keep their latency while logins wait a little
/// longer.
pub const VERIFY_NICE: libc::c_int = 10;
/// Longest wait for a verification (queued and run).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

struct Job {
    password_hash: Arc<str>,
    password: String,
    reply: UnixStream,
}

/// The queue of the verification threads, which start on first use.
fn queue() -> &'static Sender<Job> {
    static QUEUE: OnceLock<Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(MAX_QUEUED_VERIFICATIONS);
        for index in 0..VERIFY_THREADS {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("mbws-verify-{index}"))
                .spawn(move || {
                    leave_the_shards_cores();
                    for mut job in receiver {
                        let matched = verify_password(&job.password_hash, &job.password);
                        // The connection may be gone (its task dropped its end): nothing to do.
                        let _ = job.reply.write_all(&[u8::from(matched)]);
                    }
                })
                .expect("start a password verification thread");
        }
        sender
    })
}

/// Gives the calling thread the CPU set of the process's main thread (which no shard pins) and
/// [`VERIFY_NICE`] more than the process's nice value. Best effort: a failure leaves the thread as it was, which is
/// correct, only less fair to the shards.
fn leave_the_shards_cores() {
    const SET_BYTES: usize = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `cpu_set_t` is plain data, valid all zero.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: getpid has no preconditions; its id is the main thread's.
    let main_thread = unsafe { libc::getpid() };
    // SAFETY: writes at most SET_BYTES into the live `set`.
    if unsafe { libc::sched_getaffinity(main_thread, SET_BYTES, &mut set) } == 0 {
        // SAFETY: reads SET_BYTES from the live `set`; pid 0 is the calling thread.
        unsafe { libc::sched_setaffinity(0, SET_BYTES, &set) };
    }
    // SAFETY: gettid has no preconditions.
    let thread = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // Relative to the nice value the thread inherited (the process's): a broker started under
    // `nice` keeps its verifications below its shards, rather than above them at nice 10.
    // SAFETY: plain syscalls on the calling thread (on Linux a nice value is per thread: the
    // `who` of PRIO_PROCESS is a thread id). Neither can fail on the calling thread.
    let inherited = unsafe { libc::getpriority(libc::PRIO_PROCESS, thread) };
    // SAFETY: as above.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, thread, (inherited + VERIFY_NICE).min(19)) };
    // SCHED_IDLE: a verification runs only when no shard wants the core, and a shard that
    // wakes preempts it at once (a nice value alone still lets it finish a slice of
    // milliseconds first).
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a live sched_param.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
}

thread_local! {
    /// This shard's failures per peer (each shard is one thread).
    static FAILURES: std::cell::RefCell<FailureTable> = std::cell::RefCell::new(FailureTable::default());
}

/// Decides the access of a connection from `peer` whose credentials are `credentials` (`Err`:
/// unreadable, with the reason), on a broker that allows anonymous sessions or not. Waits
/// first if `peer` failed repeatedly; `now_ms` reads the broker's clock.
pub async fn authenticate(
    auth: &Auth,
    credentials: Result<Credentials, String>,
    anonymous_allowed: bool,
    peer: IpAddr,
    now_ms: fn() -> u64,
) -> Access {
    let delay_ms = FAILURES.with(|table| table.borrow().delay_ms(peer, now_ms()));
    if delay_ms > 0 {
        monoio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    let access = match credentials {
        Err(reason) => Access::Refused(ErrorCode::Unauthenticated, reason),
        Ok(credentials) => match auth.check(credentials, anonymous_allowed, now_ms(), crate::clock::now_unix_ms()) {
            Check::Done(access) => access,
            Check::Verify(check) => match verify_off_loop(check.password_hash.clone(), &check.password).await {
                Ok(matched) => auth.verified(check, matched, now_ms()),
                Err(refusal) => refusal,
            },
        },
    };
    FAILURES.with(|table| match &access {
        Access::Granted(..) => table.borrow_mut().record_success(peer),
        Access::Refused(ErrorCode::Unauthenticated, _) => table.borrow_mut().record_failure(peer, now_ms()),
        Access::Refused(..) => {}
    });
    access
}

/// Runs one verification on the verification threads and waits for it without blocking the
/// event loop. `Err` is the refusal when it cannot be run in time.
async fn verify_off_loop(password_hash: Arc<str>, password: &str) -> Result<bool, Access> {
    let overloaded = |reason: String| Access::Refused(ErrorCode::Overloaded, reason);
    let (ours, theirs) =
        UnixStream::pair().map_err(|error| overloaded(format!("OPEN: cannot check the password now ({error})")))?;
    let job = Job { password_hash, password: password.to_owned(), reply: theirs };
    match queue().try_send(job) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err(overloaded(format!(
                "OPEN: {MAX_QUEUED_VERIFICATIONS} password checks are waiting already; retry in a moment"
            )))
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(overloaded("OPEN: the password checks have stopped".into()));
        }
    }
    let ours = monoio::net::UnixStream::from_std(ours)
        .map_err(|error| overloaded(format!("OPEN: cannot check the password now ({error})")))?;
    let mut ours = ours;
    match monoio::time::timeout(VERIFY_TIMEOUT, ours.read(vec![0u8; 1])).await {
        Ok((Ok(1), answer)) => Ok(answer[0] == 1),
        Ok(_) => Err(overloaded("OPEN: the password check failed; retry".into())),
        Err(_) => Err(overloaded(format!(
            "OPEN: the password check did not finish within {} s (the broker is overloaded); retry later",
            VERIFY_TIMEOUT.as_secs()
        ))),
    }
}
