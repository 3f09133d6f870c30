//! The running part of a benchmark (IO): connection tasks, publisher pacing, measurements.
//!
//! [`Bench::setup`] opens every consumer (and waits for its subscriptions) before any
//! publisher, then starts per connection a reader task (feeds the target's codec, counts
//! deliveries into the [`Flow`] and the latency histogram, tracks publish acknowledgements) and
//! a writer task ([`write_loop`]); each publisher also gets a producer task.
//!
//! A producer runs in one of three [`Mode`]s set by the scenario:
//! - `Unpaced`: as fast as the protocol window, the end-to-end window and the outbox allow;
//!   every message of a batch is stamped with the time the batch was built.
//! - `Paced`: message i of a step is due at `start + i / rate` and is stamped with that
//!   intended time, not the time it actually left. A producer that falls behind sends what is
//!   due at once and never skips, so any queueing (in the generator, the network or the
//!   target) shows up as latency: coordinated omission is corrected by construction. It sleeps
//!   on a timerfd ([`PaceTimer`]) until shortly before the next message is due, then polls
//!   until it is; how late messages still leave is recorded (`send_lag`) and reported.
//! - `Idle`.
//!
//! Everything runs on one thread: shared state is `Cell`/`RefCell`, and no borrow is held
//! across an `.await`.

use std::cell::{Cell, RefCell};
use std::net::Ipv4Addr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;

use super::cli::Plan;
use super::clock::{now_ns, PaceTimer};
use super::flow::{Flow, Semantics};
use super::net::{
    write_loop, Link, Notify, MAX_READ_BUFFER_BYTES, MIN_READ_BUFFER_BYTES, OUTBOX_HIGH_WATER_BYTES,
    READ_BUFFERS_TOTAL_BYTES,
};
use super::procfs;
use super::report::Progress;
use super::stream::{ReadHalf, Stream, WriteHalf};
use super::targets::{self, Codec, Failure, Inbound, PublishWire, Role, Session, TargetConfig};
use super::wire::{length_prefixed_frame, Deframer};
use super::BenchError;
use mbws_proto::ws::message::Received;
use mbws_proto::ws::OpCode;

/// A run fails if nothing is delivered for this long while messages are outstanding.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for outstanding messages after publishing stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for goodbyes to be written.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most messages a producer appends before looking at its windows again.
const MAX_BATCH_MESSAGES: u64 = 4096;
/// A paced producer sleeps on the timer until this long before a message is due, then polls
/// until it is: waking from a timer took 50 to 80 microseconds on the development VM, which
/// would otherwise show up as latency of the target. It polls through io_uring
/// ([`PaceTimer::poll_once`]) rather than by yielding: a task that only yields keeps monoio
/// from waiting on io_uring, and the readers' completions then stall.
/// At rates above 10,000 messages per second the producer therefore keeps its core busy.
const SPIN_BEFORE_DUE_NS: u64 = 100_000;
/// How often the scenario checks for failures, stalls and its stop condition.
const WATCH_INTERVAL: Duration = Duration::from_millis(20);
/// Histogram range: 1 ns to 1 hour, 3 significant digits.
const HISTOGRAM_MAX_NS: u64 = 3_600_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, 3).expect("valid histogram bounds")
}

/// State shared by every task of a run.
pub struct Run {
    pub flow: Flow,
    /// Delivery latency (ns) while `recording`.
    pub latency: RefCell<Histogram<u64>>,
    /// MBWS receipt latency (ns) of durable SENDs while `recording`.
    pub receipt_latency: RefCell<Histogram<u64>>,
    /// How late paced messages left the generator after their intended time (ns), while
    /// `recording`: the generator's own share of the measured latency.
    pub send_lag: RefCell<Histogram<u64>>,
    pub recording: Cell<bool>,
    pub delivered: Cell<u64>,
    pub last_delivery_ns: Cell<u64>,
    /// Set once the scenario is done: closed connections are expected from here on.
    pub stopping: Cell<bool>,
    /// Read buffer of each connection: `READ_BUFFERS_TOTAL_BYTES` shared out, within bounds.
    read_buffer_bytes: usize,
    failure: RefCell<Option<String>>,
}

impl Run {
    /// Records the first failure; the scenario reports it.
    pub fn fail(&self, message: String) {
        if !self.stopping.get() {
            self.failure.borrow_mut().get_or_insert(message);
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    pub fn has_failed(&self) -> bool {
        self.failure.borrow().is_some()
    }

    fn on_delivered(&self, consumer: usize, count: u64, now: u64) {
        self.flow.on_delivered(consumer, count);
        self.delivered.set(self.delivered.get() + count);
        self.last_delivery_ns.set(now);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Idle,
    Unpaced,
    /// `count` messages, message i intended at `start_ns + i * interval_ns`.
    Paced {
        start_ns: u64,
        interval_ns: f64,
        count: u64,
    },
}

/// One publishing connection.
pub struct Publisher {
    pub index: usize,
    pub mode: Cell<Mode>,
    /// Messages sent in the current paced step.
    pub step_sent: Cell<u64>,
    /// Wakes the producer: mode change, acknowledgements, outbox room, flow room.
    pub wake: Rc<Notify>,
    pub sent: Cell<u64>,
    pub acknowledged: Cell<u64>,
    pub refused: Cell<u64>,
    /// Most unacknowledged publishes (the protocol's window), if the target acknowledges.
    pub window: Option<u64>,
    /// Send time by seq (durable runs), a ring longer than the window.
    send_times: Option<RefCell<Vec<u64>>>,
    link: Rc<Link>,
    codec: Rc<RefCell<Codec>>,
}

impl Publisher {
    /// Messages that may be appended now: the least of the outbox's room (at least one frame
    /// while below its high water), the protocol window and the end-to-end window.
    fn room(&self, flow: &Flow, frame_bytes: usize) -> u64 {
        let queued = self.link.outbox.borrow().len();
        if queued >= OUTBOX_HIGH_WATER_BYTES {
            return 0;
        }
        let outbox_room = ((OUTBOX_HIGH_WATER_BYTES - queued) / frame_bytes).max(1) as u64;
        let unacknowledged = self.sent.get().saturating_sub(self.acknowledged.get());
        let protocol_room = self.window.map_or(u64::MAX, |window| window.saturating_sub(unacknowledged));
        if protocol_room == 0 {
            return 0;
        }
        outbox_room.min(protocol_room).min(flow.room())
    }
}

/// One consuming (or idle) connection's handles for the goodbye.
struct Consumer {
    link: Rc<Link>,
    codec: Rc<RefCell<Codec>>,
}

/// The shape of a run.
#[derive(Debug, Clone)]
pub struct Shape {
    pub publishers: usize,
    pub consumers: usize,
    pub addresses: usize,
    pub semantics: Semantics,
    /// Consumers subscribe in multicast (every subscriber gets every message).
    pub multicast: bool,
    pub durable: bool,
}

/// Counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub at_ns: u64,
    pub delivered: u64,
    pub published: u64,
    pub acknowledged: u64,
    pub refused: u64,
    pub broker_cpu_seconds: Option<f64>,
    pub own_cpu_seconds: f64,
}

pub struct Bench {
    pub run: Rc<Run>,
    pub publishers: Vec<Rc<Publisher>>,
    consumers: Vec<Consumer>,
    /// Every broker process of the target (a cluster has several): their CPU is summed.
    broker_pids: Vec<u32>,
}

/// Which addresses consumer `consumer` of `consumers` takes, out of `addresses`: consumer j
/// and address k belong together when j mod A = k mod C. Every address gets at least one
/// consumer and every consumer at least one address.
pub fn consumer_addresses(consumer: usize, consumers: usize, addresses: usize) -> Vec<usize> {
    (0..addresses).filter(|&address| consumer % addresses == address % consumers).collect()
}

impl Bench {
    /// Opens consumers (subscribed) and then publishers, and starts their tasks; publishers
    /// start `Idle`.
    pub async fn setup(plan: &Plan, config: &TargetConfig, shape: &Shape) -> Result<Bench, BenchError> {
        let failed = |message: String| BenchError::Failed(message);
        let consumer_addresses: Vec<Vec<usize>> = (0..shape.consumers)
            .map(|consumer| consumer_addresses(consumer, shape.consumers, shape.addresses))
            .collect();
        let wakes: Vec<Rc<Notify>> = (0..shape.publishers).map(|_| Rc::new(Notify::default())).collect();
        let flow = Flow::new(shape.semantics, plan.window, shape.addresses, consumer_addresses.clone(), wakes.clone());
        let run = Rc::new(Run {
            flow,
            latency: RefCell::new(new_histogram()),
            receipt_latency: RefCell::new(new_histogram()),
            send_lag: RefCell::new(new_histogram()),
            recording: Cell::new(false),
            delivered: Cell::new(0),
            last_delivery_ns: Cell::new(now_ns()),
            stopping: Cell::new(false),
            read_buffer_bytes: (READ_BUFFERS_TOTAL_BYTES / (shape.publishers + shape.consumers))
                .clamp(MIN_READ_BUFFER_BYTES, MAX_READ_BUFFER_BYTES),
            failure: RefCell::new(None),
        });
        let mut consumers = Vec::with_capacity(shape.consumers);
        for (index, addresses) in consumer_addresses.into_iter().enumerate() {
            let queue_group = !shape.multicast && shape.consumers > 1;
            let role = Role::Consumer { addresses, multicast: shape.multicast, queue_group };
            let session = targets::open(config, &role, index, None)
                .await
                .map_err(|error| failed(format!("consumer {index}: {error}")))?;
            consumers.push(start_consumer(&run, index, session));
        }
        let all_addresses: Vec<usize> = (0..shape.addresses).collect();
        let mut publishers = Vec::with_capacity(shape.publishers);
        for (index, wake) in wakes.into_iter().enumerate() {
            let role = Role::Publisher { addresses: all_addresses.clone(), durable: shape.durable };
            let session = targets::open(config, &role, index, None)
                .await
                .map_err(|error| failed(format!("publisher {index}: {error}")))?;
            publishers.push(start_publisher(&run, index, session, wake, shape.durable, plan.window));
        }
        Ok(Bench { run, publishers, consumers, broker_pids: plan.broker_pids.clone() })
    }

    pub fn set_mode(&self, mode: Mode) {
        for publisher in &self.publishers {
            publisher.step_sent.set(0);
            publisher.mode.set(mode);
            publisher.wake.notify();
        }
    }

    pub fn all_idle(&self) -> bool {
        self.publishers.iter().all(|publisher| publisher.mode.get() == Mode::Idle)
    }

    pub fn start_recording(&self) {
        self.run.latency.borrow_mut().reset();
        self.run.receipt_latency.borrow_mut().reset();
        self.run.send_lag.borrow_mut().reset();
        self.run.recording.set(true);
    }

    pub fn stop_recording(&self) {
        self.run.recording.set(false);
    }

    pub fn snapshot(&self) -> Result<Snapshot, BenchError> {
        let broker_cpu_seconds = match self.broker_pids.as_slice() {
            [] => None,
            pids => Some(pids.iter().map(|&pid| procfs::cpu_seconds(pid)).sum::<Result<f64, _>>()?),
        };
        Ok(Snapshot {
            at_ns: now_ns(),
            delivered: self.run.delivered.get(),
            published: self.publishers.iter().map(|publisher| publisher.sent.get()).sum(),
            acknowledged: self.publishers.iter().map(|publisher| publisher.acknowledged.get()).sum(),
            refused: self.publishers.iter().map(|publisher| publisher.refused.get()).sum(),
            broker_cpu_seconds,
            own_cpu_seconds: procfs::own_cpu_seconds(),
        })
    }

    /// Waits until `done` holds (true) or `limit` has passed (false), refreshing `progress`
    /// and failing on a task error or a stall.
    pub async fn watch(
        &self,
        limit: Duration,
        progress: &mut Progress,
        done: impl Fn(&Bench) -> bool,
    ) -> Result<bool, BenchError> {
        let started = Instant::now();
        let started_ns = now_ns();
        loop {
            if let Some(failure) = self.run.failure() {
                progress.finish();
                return Err(BenchError::Failed(failure));
            }
            let now = now_ns();
            progress.tick(now, self.run.delivered.get());
            if done(self) {
                return Ok(true);
            }
            let lag = self.run.flow.lag();
            let quiet_since = self.run.last_delivery_ns.get().max(started_ns);
            if lag > 0 && now.saturating_sub(quiet_since) > STALL_TIMEOUT.as_nanos() as u64 {
                progress.finish();
                return Err(BenchError::Failed(format!(
                    "nothing was delivered for {} s while {lag} messages were outstanding \
                     ({} published, {} delivered): the target stalled or dropped messages \
                     (a smaller --window may help)",
                    STALL_TIMEOUT.as_secs(),
                    self.run.flow.published_total(),
                    self.run.flow.received_total()
                )));
            }
            if started.elapsed() >= limit {
                return Ok(false);
            }
            monoio::time::sleep(WATCH_INTERVAL.min(limit.saturating_sub(started.elapsed()))).await;
        }
    }

    /// Waits until every published message has been delivered (or `DRAIN_TIMEOUT`).
    pub async fn drain(&self, progress: &mut Progress) -> Result<bool, BenchError> {
        self.watch(DRAIN_TIMEOUT, progress, |bench| bench.all_idle() && bench.run.flow.lag() == 0).await
    }

    /// Stops publishing, says goodbye on every connection and waits briefly for the writes.
    pub async fn finish(&self) {
        self.set_mode(Mode::Idle);
        self.run.stopping.set(true);
        let links = self
            .publishers
            .iter()
            .map(|publisher| (&publisher.link, &publisher.codec))
            .chain(self.consumers.iter().map(|consumer| (&consumer.link, &consumer.codec)));
        for (link, codec) in links.clone() {
            codec.borrow_mut().goodbye(link.framing, &mut link.outbox.borrow_mut());
            link.close();
        }
        let deadline = Instant::now() + GOODBYE_TIMEOUT;
        while Instant::now() < deadline && !links.clone().all(|(link, _)| link.finished.get()) {
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn start_consumer(run: &Rc<Run>, index: usize, session: Session) -> Consumer {
    let link = Link::new(session.framing, Box::new(|| {}));
    let codec = Rc::new(RefCell::new(session.codec));
    let (reader, writer) = session.stream.into_split();
    spawn_writer(run, &link, writer);
    let reader_task = Reader {
        run: run.clone(),
        deframer: session.deframer,
        codec: codec.clone(),
        link: link.clone(),
        role: ReaderRole::Consumer { index },
    };
    monoio::spawn(reader_task.run(reader, session.read_buf));
    Consumer { link, codec }
}

fn start_publisher(
    run: &Rc<Run>,
    index: usize,
    session: Session,
    wake: Rc<Notify>,
    durable: bool,
    flow_window: u64,
) -> Rc<Publisher> {
    let wire = session.publish.expect("a publisher session carries its templates");
    let drained = wake.clone();
    let link = Link::new(session.framing, Box::new(move || drained.notify()));
    let codec = Rc::new(RefCell::new(session.codec));
    let ring = (wire.window.unwrap_or(flow_window).max(flow_window) + 1).next_power_of_two() as usize;
    let publisher = Rc::new(Publisher {
        index,
        mode: Cell::new(Mode::Idle),
        step_sent: Cell::new(0),
        wake,
        sent: Cell::new(0),
        acknowledged: Cell::new(0),
        refused: Cell::new(0),
        window: wire.window,
        send_times: durable.then(|| RefCell::new(vec![0; ring])),
        link: link.clone(),
        codec: codec.clone(),
    });
    let (reader, writer) = session.stream.into_split();
    spawn_writer(run, &link, writer);
    let reader_task = Reader {
        run: run.clone(),
        deframer: session.deframer,
        codec,
        link,
        role: ReaderRole::Publisher(publisher.clone()),
    };
    monoio::spawn(reader_task.run(reader, session.read_buf));
    monoio::spawn(produce(run.clone(), publisher.clone(), wire));
    publisher
}

fn spawn_writer(run: &Rc<Run>, link: &Rc<Link>, writer: WriteHalf) {
    let run = run.clone();
    let link = link.clone();
    monoio::spawn(async move {
        if let Err(error) = write_loop(link, writer).await {
            run.fail(format!("writing to the target failed: {error}"));
        }
    });
}

enum ReaderRole {
    Consumer { index: usize },
    Publisher(Rc<Publisher>),
}

/// The reader task of one connection.
struct Reader {
    run: Rc<Run>,
    deframer: Deframer,
    codec: Rc<RefCell<Codec>>,
    link: Rc<Link>,
    role: ReaderRole,
}

impl Reader {
    async fn run(mut self, mut reader: ReadHalf, mut buf: BytesMut) {
        let read_buffer_bytes = self.run.read_buffer_bytes;
        if buf.capacity() < read_buffer_bytes {
            buf.reserve(read_buffer_bytes - buf.len());
        }
        loop {
            if let Err(failure) = self.process(&mut buf) {
                if !(self.run.stopping.get() && matches!(failure, Failure::Closed(_))) {
                    self.run.fail(failure.message().to_string());
                }
                return;
            }
            let (result, returned) = reader.read_more(buf).await;
            buf = returned;
            match result {
                Ok(0) => {
                    self.run.fail("the target closed the connection".to_string());
                    return;
                }
                Ok(_) => {}
                Err(error) => {
                    self.run.fail(format!("reading from the target failed: {error}"));
                    return;
                }
            }
        }
    }

    /// Decodes everything complete in `buf` and publishes the effects.
    fn process(&mut self, buf: &mut BytesMut) -> Result<(), Failure> {
        if buf.is_empty() {
            return Ok(());
        }
        let now = now_ns();
        let (result, deliveries) = {
            let mut outbox = self.link.outbox.borrow_mut();
            let mut histogram = self.run.latency.borrow_mut();
            let mut codec = self.codec.borrow_mut();
            let latency = if self.run.recording.get() { Some(&mut *histogram) } else { None };
            let mut cx =
                Inbound { now_ns: now, framing: self.link.framing, replies: &mut outbox, deliveries: 0, latency };
            let result = match self.deframer {
                Deframer::LengthPrefixed { max_payload_bytes } => {
                    deframe_in_place(buf, max_payload_bytes, |payload| codec.on_slice(payload, &mut cx))
                }
                Deframer::WebSocket(_) => deframe_units(&mut self.deframer, buf, &mut codec, &mut cx),
            };
            (result, cx.deliveries)
        };
        match &self.role {
            ReaderRole::Consumer { index } => {
                if deliveries > 0 {
                    self.run.on_delivered(*index, deliveries, now);
                }
            }
            ReaderRole::Publisher(publisher) => self.on_acknowledgements(publisher, now),
        }
        if !self.link.outbox.borrow().is_empty() {
            self.link.writer.notify();
        }
        result
    }

    fn on_acknowledgements(&self, publisher: &Publisher, now: u64) {
        let codec = self.codec.borrow();
        publisher.refused.set(codec.publishes_refused());
        let acknowledged = codec.publishes_acknowledged();
        let previous = publisher.acknowledged.get();
        if acknowledged <= previous {
            return;
        }
        if let (Some(send_times), true) = (&publisher.send_times, self.run.recording.get()) {
            let send_times = send_times.borrow();
            let mask = send_times.len() as u64 - 1;
            let mut histogram = self.run.receipt_latency.borrow_mut();
            for seq in previous + 1..=acknowledged {
                let sent_at = send_times[(seq & mask) as usize];
                histogram.saturating_record(now.saturating_sub(sent_at).max(1));
            }
        }
        publisher.acknowledged.set(acknowledged);
        publisher.wake.notify();
    }
}

/// Hands every complete WebSocket message of `buf` to the codec where it lies, answering
/// pings: no `Bytes` (and no reference count on the read buffer) per message, as
/// [`deframe_in_place`] does for length-prefixed frames. A fan-out run reads one WebSocket
/// message per delivery, and splitting each off as a `Bytes` made the generator, not the
/// broker, the limit of its deliveries/s (docs/PERFORMANCE.md, session 13).
fn deframe_units(
    deframer: &mut Deframer,
    buf: &mut BytesMut,
    codec: &mut Codec,
    cx: &mut Inbound<'_>,
) -> Result<(), Failure> {
    let Deframer::WebSocket(decoder) = deframer else {
        unreachable!("deframe_units is for WebSocket framing; length-prefixed frames go through deframe_in_place")
    };
    loop {
        let received = decoder
            .next_in_place(buf)
            .map_err(|error| Failure::Protocol(format!("invalid WebSocket data from the target: {error}")))?;
        match received {
            None => break Ok(()),
            Some(Received::Binary(message)) => codec.on_message(message, false, cx)?,
            Some(Received::Text(message)) => codec.on_message(message, true, cx)?,
            Some(Received::Ping(payload)) => cx.framing.control(cx.replies, OpCode::Pong, &payload),
            Some(Received::Pong(_)) => {}
            Some(Received::Close(frame)) => {
                let (code, reason) = match frame {
                    Some(frame) => (frame.code, String::from_utf8_lossy(&frame.reason).into_owned()),
                    None => (1005, String::new()),
                };
                break Err(Failure::Closed(format!("the target closed the WebSocket ({code}: {reason})")));
            }
        }
    }
}

/// Hands the payload of every complete length-prefixed frame of `buf` to `handle` where it
/// lies, then removes those frames: no `Bytes` and no reference count per message.
fn deframe_in_place(
    buf: &mut BytesMut,
    max_payload_bytes: usize,
    mut handle: impl FnMut(&[u8]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut consumed = 0;
    let result = loop {
        match length_prefixed_frame(&buf[consumed..], max_payload_bytes) {
            Err(error) => break Err(Failure::Protocol(error)),
            Ok(None) => break Ok(()),
            Ok(Some(payload)) => {
                if let Err(failure) = handle(&buf[consumed + payload.start..consumed + payload.end]) {
                    break Err(failure);
                }
                consumed += payload.end;
            }
        }
    };
    buf.advance(consumed);
    result
}

/// The producer task of one publisher.
async fn produce(run: Rc<Run>, publisher: Rc<Publisher>, wire: PublishWire) {
    let mut timer = match PaceTimer::new() {
        Ok(timer) => timer,
        Err(error) => {
            run.fail(format!("cannot create a pacing timer (timerfd): {error}"));
            return;
        }
    };
    let frame_bytes = wire.templates.iter().map(|template| template.wire_bytes()).max().unwrap_or(1);
    let address_count = wire.templates.len();
    let mut next_address = publisher.index % address_count;
    loop {
        if run.stopping.get() || run.has_failed() {
            return;
        }
        let mode = publisher.mode.get();
        let due = match mode {
            Mode::Idle => {
                publisher.wake.notified().await;
                continue;
            }
            Mode::Unpaced => u64::MAX,
            Mode::Paced { start_ns, interval_ns, count } => {
                let sent = publisher.step_sent.get();
                if sent >= count {
                    publisher.mode.set(Mode::Idle);
                    continue;
                }
                let now = now_ns();
                let next_due_ns = start_ns + (sent as f64 * interval_ns) as u64;
                if next_due_ns > now {
                    let waited = if next_due_ns - now > SPIN_BEFORE_DUE_NS {
                        timer.sleep_until(next_due_ns - SPIN_BEFORE_DUE_NS).await
                    } else {
                        timer.poll_once().await
                    };
                    if let Err(error) = waited {
                        run.fail(format!("waiting on the pacing timer failed: {error}"));
                        return;
                    }
                    continue;
                }
                // Message `sent` is due (checked above), so at least one is, whatever the rounding.
                let due_by_now = ((now - start_ns) as f64 / interval_ns) as u64 + 1;
                due_by_now.min(count).saturating_sub(sent).max(1)
            }
        };
        let room = publisher.room(&run.flow, frame_bytes);
        if room == 0 {
            publisher.wake.notified().await;
            continue;
        }
        let batch = due.min(room).min(MAX_BATCH_MESSAGES);
        emit(&run, &publisher, &wire, mode, batch, &mut next_address);
    }
}

/// Appends `count` messages to the publisher's outbox.
fn emit(run: &Run, publisher: &Publisher, wire: &PublishWire, mode: Mode, count: u64, next_address: &mut usize) {
    let batch_stamp = now_ns();
    let first = publisher.sent.get();
    let step_first = publisher.step_sent.get();
    {
        let mut outbox = publisher.link.outbox.borrow_mut();
        let mut send_times = publisher.send_times.as_ref().map(|times| times.borrow_mut());
        let mut send_lag = run.recording.get().then(|| run.send_lag.borrow_mut());
        for offset in 0..count {
            let index = first + offset;
            let stamp = match mode {
                Mode::Paced { start_ns, interval_ns, .. } => {
                    let intended = start_ns + ((step_first + offset) as f64 * interval_ns) as u64;
                    if let Some(histogram) = send_lag.as_deref_mut() {
                        histogram.saturating_record(batch_stamp.saturating_sub(intended).max(1));
                    }
                    intended
                }
                _ => batch_stamp,
            };
            let address = *next_address;
            *next_address = if address + 1 == wire.templates.len() { 0 } else { address + 1 };
            wire.templates[address].append(&mut outbox, stamp, wire.counter.value(index));
            run.flow.on_published(address);
            if let Some(times) = send_times.as_deref_mut() {
                let slot = ((index + 1) & (times.len() as u64 - 1)) as usize;
                times[slot] = stamp;
            }
        }
    }
    publisher.sent.set(first + count);
    publisher.step_sent.set(step_first + count);
    publisher.link.writer.notify();
}

/// An open idle session: its socket and the bytes that end it politely.
pub struct IdleSession {
    stream: Stream,
    goodbye: BytesMut,
}

/// How many of `sessions` the target has closed or reset (FIN, RST or a socket error), from one
/// non-blocking poll(2) over their sockets. Data waiting to be read (a server's PING) is not a
/// close.
pub fn closed_idle_sessions(sessions: &[IdleSession]) -> std::io::Result<usize> {
    let mut polls: Vec<libc::pollfd> = sessions
        .iter()
        .map(|session| libc::pollfd { fd: session.stream.socket_fd(), events: libc::POLLRDHUP, revents: 0 })
        .collect();
    // SAFETY: `polls` is an array of `polls.len()` initialised pollfd entries that outlives the
    // call; a timeout of 0 makes poll(2) return at once.
    let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 0) };
    if ready < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let closed = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok(polls.iter().filter(|poll| poll.revents & closed != 0).count())
}

/// Opens `count` idle sessions with at most `concurrency` set-ups in flight, spreading them over
/// `source_ips` loopback source addresses when more than one.
pub async fn open_idle_sessions(
    config: &TargetConfig,
    count: usize,
    source_ips: u8,
    concurrency: usize,
    progress: &mut Progress,
) -> Result<Vec<IdleSession>, BenchError> {
    let opened: Rc<RefCell<Vec<IdleSession>>> = Rc::new(RefCell::new(Vec::with_capacity(count)));
    let next = Rc::new(Cell::new(0usize));
    let failure: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
    let mut workers = Vec::new();
    for _ in 0..concurrency.min(count) {
        let (opened, next, failure, config) = (opened.clone(), next.clone(), failure.clone(), config.clone());
        workers.push(monoio::spawn(async move {
            loop {
                let index = next.get();
                if index >= count || failure.borrow().is_some() {
                    return;
                }
                next.set(index + 1);
                let source =
                    (source_ips > 1).then(|| Ipv4Addr::new(127, 0, 0, 1 + (index % usize::from(source_ips)) as u8));
                match targets::open(&config, &Role::Idle, index, source).await {
                    Ok(mut session) => {
                        let mut goodbye = BytesMut::new();
                        session.codec.goodbye(session.framing, &mut goodbye);
                        opened.borrow_mut().push(IdleSession { stream: session.stream, goodbye });
                    }
                    Err(error) => {
                        failure.borrow_mut().get_or_insert(format!("session {index}: {error}"));
                        return;
                    }
                }
            }
        }));
    }
    loop {
        progress.tick(now_ns(), opened.borrow().len() as u64);
        if opened.borrow().len() >= count || failure.borrow().is_some() {
            break;
        }
        monoio::time::sleep(WATCH_INTERVAL).await;
    }
    for worker in workers {
        worker.await;
    }
    let sessions = std::mem::take(&mut *opened.borrow_mut());
    let failure = failure.borrow_mut().take();
    if let Some(failure) = failure {
        progress.finish();
        close_idle_sessions(sessions, concurrency).await;
        return Err(BenchError::Failed(failure));
    }
    Ok(sessions)
}

/// Ends idle sessions politely (MBWS CLOSE, MQTT DISCONNECT), at most `concurrency` at a time,
/// so that the target does not keep them for resume; gives up after `DRAIN_TIMEOUT`.
pub async fn close_idle_sessions(sessions: Vec<IdleSession>, concurrency: usize) {
    let count = sessions.len();
    let sessions = Rc::new(RefCell::new(sessions));
    let closed = Rc::new(Cell::new(0usize));
    for _ in 0..concurrency.min(count) {
        let (sessions, closed) = (sessions.clone(), closed.clone());
        monoio::spawn(async move {
            loop {
                let next = sessions.borrow_mut().pop();
                let Some(IdleSession { mut stream, goodbye }) = next else { return };
                if !goodbye.is_empty() {
                    let _ = stream.write_all(goodbye).await;
                }
                drop(stream);
                closed.set(closed.get() + 1);
            }
        });
    }
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while closed.get() < count && Instant::now() < deadline {
        monoio::time::sleep(WATCH_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One unmasked server frame (what a broker sends) of `payload`.
    fn server_frame(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
        mbws_proto::ws::frame::encode_header(out, true, opcode, payload.len(), None);
        out.extend_from_slice(payload);
    }

    #[test]
    fn websocket_messages_are_read_in_place_and_a_partial_frame_waits() {
        use mbws_proto::mbws::{encode, Binding, Frame, Message, Properties, Receipt};
        let message = |delivery_seq: u64| {
            let body = bytes::Bytes::from(vec![0u8; 16]);
            let frame = Frame::Message(Message {
                subscription_id: 1,
                delivery_seq,
                message_id: delivery_seq,
                address: bytes::Bytes::from_static(b"orders"),
                redelivered: false,
                durable: false,
                properties: Properties::default(),
                body,
            });
            encode(Binding::Binary, &frame)
        };
        let mut wire = BytesMut::new();
        server_frame(&mut wire, OpCode::Binary, &message(1));
        server_frame(&mut wire, OpCode::Binary, &encode(Binding::Binary, &Frame::Receipt(Receipt { seq: 9 })));
        server_frame(&mut wire, OpCode::Ping, b"hi");
        server_frame(&mut wire, OpCode::Binary, &message(2));
        let mut last = BytesMut::new();
        server_frame(&mut last, OpCode::Binary, &message(3));
        wire.extend_from_slice(&last[..10]);

        let mut deframer = Deframer::websocket(1 << 20);
        // No ACKs: what is queued for the broker is the pong alone.
        let mut codec = Codec::Mbws(targets::mbws::MbwsCodec::new(0));
        let mut replies = BytesMut::new();
        let framing = crate::wire::Framing::WebSocket { mask: [1, 2, 3, 4] };
        let mut cx = Inbound { now_ns: 0, framing, replies: &mut replies, deliveries: 0, latency: None };
        deframe_units(&mut deframer, &mut wire, &mut codec, &mut cx).unwrap();
        assert_eq!(cx.deliveries, 2);
        assert_eq!(codec.publishes_acknowledged(), 9, "the RECEIPT, decoded off the in-place path");
        assert_eq!(&wire[..], &last[..10], "the partial frame stays for the next read");
        assert_eq!(replies.len(), 2 + 4 + 2, "one masked pong of the ping's two bytes");

        wire.extend_from_slice(&last[10..]);
        let mut cx = Inbound { now_ns: 0, framing, replies: &mut replies, deliveries: 0, latency: None };
        deframe_units(&mut deframer, &mut wire, &mut codec, &mut cx).unwrap();
        assert_eq!(cx.deliveries, 1);
        assert!(wire.is_empty());
    }

    #[test]
    fn every_address_and_every_consumer_is_paired() {
        for consumers in 1..12 {
            for addresses in 1..12 {
                let lists: Vec<Vec<usize>> =
                    (0..consumers).map(|consumer| consumer_addresses(consumer, consumers, addresses)).collect();
                assert!(lists.iter().all(|list| !list.is_empty()), "{consumers} consumers, {addresses} addresses");
                for address in 0..addresses {
                    assert!(lists.iter().any(|list| list.contains(&address)));
                }
            }
        }
    }

    #[test]
    fn fanout_subscribers_all_take_the_one_address() {
        assert!((0..10).all(|consumer| consumer_addresses(consumer, 10, 1) == vec![0]));
    }
}
