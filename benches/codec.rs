//! Criterion micro-benchmarks of the hot codecs: WebSocket frames (ours next to tungstenite's)
//! and MBWS frames in both bindings.
//!
//! Run: `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3` (add a regex such
//! as `ws_decode/` to run some). Every benchmark reports bytes of payload per second, so sizes
//! compare directly; ids read `group/implementation/payload_bytes`. Results are written up in
//! docs/PERFORMANCE.md ("Benchmark suite").
//!
//! - `ws_decode`: one masked client frame at the front of a read buffer is decoded and its
//!   payload unmasked. Buffers are prepared outside the timing (`iter_batched_ref`, 64 or fewer
//!   per batch so they are cache-hot), already in the shared mode a connection's read buffer is
//!   in, and each is decoded where it lies (by `&mut`, not moved in and out of the routine), so
//!   the timed part is header parse + checks + unmask (+ split, where a row makes a `Bytes`).
//!   `ours` is the receive path the broker uses (`ws::frame::decode_frame_in_place`: the payload
//!   unmasked where it lies, read as a slice, the frame consumed with a pointer move, no
//!   `Bytes`); `ours_bytes` is `ws::frame::decode_frame`, which splits the payload off as a
//!   `Bytes` (what the broker did per frame before, and still does for a SEND it stores).
//!   `tungstenite` is `tungstenite::protocol::frame::
//!   FrameHeader::parse` followed by what its private `FrameCodec::read_frame` does next: the
//!   size check, the split and the unmask. tungstenite's masking routine is private
//!   (`protocol::frame::mask`), so that row unmasks with ours: the comparison is header parsing
//!   and framing, and the unmask is the same code in both rows. The tungstenite row also skips
//!   the RSV, opcode and mask-required checks tungstenite makes later (in `WebSocketContext`)
//!   and `decode_frame` includes.
//! - `ws_decode_reused`: the same on one reused 64 KiB read buffer, the append of each frame
//!   timed; `copy_only` is the append alone, to subtract.
//! - `ws_unmask`: `ws::frame::apply_mask` alone.
//! - `ws_read`: the whole receive path of each library as a server uses it, fed from the same
//!   endless in-memory stream of masked binary frames: copy from the "socket" into the read
//!   buffer, frame decode, unmask (tungstenite's own routine here) and message assembly. `ours`
//!   is `ws::message::Decoder::next_in_place` (the message read where it lies), `ours_bytes`
//!   `Decoder::next_event` (each message a `Bytes`), `tungstenite` `WebSocket::read`, server role.
//! - `ws_encode_header`: the header of an unmasked server frame (`ws::frame::encode_header`, and
//!   tungstenite's `FrameHeader::format` for comparison).
//! - `mbws_decode` / `mbws_encode_header`: a SEND with a realistic address, content type,
//!   correlation id and one application header, in the binary and the text binding.

use std::hint::black_box;
use std::io::{self, Cursor, Read, Write};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use mbws_proto::mbws::{self as codec, Binding, CodecLimits, Frame, Properties, Send};
use mbws_proto::ws::frame::{apply_mask, decode_frame, decode_frame_in_place, encode_frame, encode_header};
use mbws_proto::ws::message::{Decoder, Received, WsEvent};
use mbws_proto::ws::{OpCode, Role};

use tungstenite::protocol::frame::coding::{Data, OpCode as TungsteniteOpCode};
use tungstenite::protocol::frame::FrameHeader as TungsteniteHeader;
use tungstenite::protocol::{Role as TungsteniteRole, WebSocket, WebSocketConfig};
use tungstenite::Message as TungsteniteMessage;

/// Payload sizes of every group: a tiny message, a typical small one (7-bit length), a page
/// (16-bit length) and 64 KiB (just past the 16-bit length, so a 64-bit one).
const PAYLOAD_SIZES: [usize; 4] = [16, 128, 4 * 1024, 64 * 1024];
/// A connection's read buffer in `ws_decode_reused`: frames are appended until it is full.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Limit handed to both decoders; larger than every payload so it never triggers.
const MAX_FRAME_BYTES: usize = 1 << 20;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Bytes copied from the in-memory stream per refill in `ws_read`: tungstenite's default read
/// buffer, used for ours too so both read in chunks of the same size.
const READ_CHUNK_BYTES: usize = 128 * 1024;

/// Keeps `value` opaque to the optimiser and drops it inside the timing. Benchmarks return `()`
/// through this instead of handing their result to criterion: criterion 0.5's own `black_box`
/// (without its nightly-only feature) is a volatile read, which copies a returned struct byte by
/// byte and costs more than the decode being measured.
fn consume<T>(value: T) {
    black_box(&value);
}

/// Deterministic, non-constant payload bytes.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|index| (index * 31 + 7) as u8).collect()
}

/// A masked client binary frame carrying `payload_bytes` bytes, as it arrives on the wire.
fn masked_client_frame(payload_bytes: usize) -> Vec<u8> {
    encode_frame(true, OpCode::Binary, &payload(payload_bytes), Some(MASK)).to_vec()
}

/// A read buffer holding `wire` that is already in `BytesMut`'s shared (reference-counted) mode,
/// like a connection's read buffer after its first split. A fresh `Vec`-backed buffer would make
/// the first `split_to` allocate, a cost a live connection does not pay per frame.
fn shared_read_buffer(wire: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(wire.len() + 1);
    buf.put_u8(0);
    buf.extend_from_slice(wire);
    drop(buf.split_to(1));
    buf
}

/// What tungstenite's frame codec does with one buffered frame: parse the header with its
/// public parser, check the size, split the payload off, unmask it. Returns the opcode and the
/// payload; `None` if the buffer does not hold a whole frame.
fn tungstenite_decode(buf: &mut BytesMut, max_frame_bytes: usize) -> Option<(TungsteniteOpCode, Bytes)> {
    let mut cursor = Cursor::new(&buf[..]);
    let (header, payload_bytes) = TungsteniteHeader::parse(&mut cursor).expect("benchmark frames are valid")?;
    let header_bytes = cursor.position() as usize;
    assert!(payload_bytes <= max_frame_bytes as u64, "benchmark frames are within the limit");
    let payload_bytes = payload_bytes as usize;
    if buf.len() < header_bytes + payload_bytes {
        return None;
    }
    buf.advance(header_bytes);
    let mut payload = buf.split_to(payload_bytes);
    if let Some(mask) = header.mask {
        apply_mask(&mut payload, mask);
    }
    Some((header.opcode, payload.freeze()))
}

/// Our receive path's frame decode: the frame at the front of `buf` decoded and unmasked in
/// place, its payload handed on as a slice (here to the optimiser's black box), the frame consumed.
fn decode_in_place(buf: &mut BytesMut, max_frame_bytes: usize) {
    let frame = decode_frame_in_place(buf, Role::Server, max_frame_bytes).expect("benchmark frames are valid");
    if let Some(frame) = frame {
        black_box(&buf[frame.payload.clone()]);
        buf.advance(frame.frame_bytes());
    }
}

fn ws_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_decode");
    for size in PAYLOAD_SIZES {
        let wire = masked_client_frame(size);
        let expected = payload(size);
        // Both decoders must agree with the encoder before anything is timed.
        let ours = decode_frame(&mut shared_read_buffer(&wire), Role::Server, MAX_FRAME_BYTES).unwrap().unwrap();
        assert_eq!(ours.payload[..], expected[..]);
        let mut buf = shared_read_buffer(&wire);
        let ours = decode_frame_in_place(&mut buf, Role::Server, MAX_FRAME_BYTES).unwrap().unwrap();
        assert_eq!(buf[ours.payload][..], expected[..]);
        let (opcode, theirs) = tungstenite_decode(&mut shared_read_buffer(&wire), MAX_FRAME_BYTES).unwrap();
        assert_eq!(opcode, TungsteniteOpCode::Data(Data::Binary));
        assert_eq!(theirs[..], expected[..]);

        group.throughput(Throughput::Bytes(size as u64));
        let batch = batch_size(size);
        // `iter_batched_ref`: each buffer stays where setup put it and the routine gets `&mut`,
        // as a connection's read buffer stays in its connection. (Moving the buffer into the
        // routine and back out by value, as `iter_batched` does, cost the in-place row a
        // store-forwarding stall per frame that no receive path pays: docs/PERFORMANCE.md,
        // "Session 14".) Buffers and returned frames are dropped outside the timing.
        group.bench_function(BenchmarkId::new("ours", size), |b| {
            b.iter_batched_ref(
                || shared_read_buffer(&wire),
                |buf| decode_in_place(buf, black_box(MAX_FRAME_BYTES)),
                batch,
            )
        });
        group.bench_function(BenchmarkId::new("ours_bytes", size), |b| {
            b.iter_batched_ref(
                || shared_read_buffer(&wire),
                |buf| decode_frame(buf, Role::Server, black_box(MAX_FRAME_BYTES)),
                batch,
            )
        });
        group.bench_function(BenchmarkId::new("tungstenite", size), |b| {
            b.iter_batched_ref(
                || shared_read_buffer(&wire),
                |buf| tungstenite_decode(buf, black_box(MAX_FRAME_BYTES)),
                batch,
            )
        });
    }
    group.finish();
}

/// The same decodes on one reused, cache-hot read buffer of a connection's usual size: each
/// iteration appends the frame (a copy, timed) and decodes it. `copy_only` appends and consumes
/// the same bytes without decoding, so `ours - copy_only` is the decode alone; in all three rows
/// the buffer reclaims its storage in place when it has been consumed to the end.
fn ws_decode_reused(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_decode_reused");
    for size in PAYLOAD_SIZES {
        let wire = masked_client_frame(size);
        group.throughput(Throughput::Bytes(size as u64));
        // Empty, shared, with room for READ_BUFFER_BYTES (or one frame, if that is larger).
        let mut buf = shared_read_buffer(&vec![0; READ_BUFFER_BYTES.max(wire.len())]);
        buf.clear();
        group.bench_function(BenchmarkId::new("copy_only", size), |b| {
            b.iter(|| {
                buf.extend_from_slice(black_box(&wire));
                black_box(&buf);
                buf.advance(wire.len());
            })
        });
        group.bench_function(BenchmarkId::new("ours", size), |b| {
            b.iter(|| {
                buf.extend_from_slice(black_box(&wire));
                decode_in_place(&mut buf, black_box(MAX_FRAME_BYTES));
            })
        });
        group.bench_function(BenchmarkId::new("ours_bytes", size), |b| {
            b.iter(|| {
                buf.extend_from_slice(black_box(&wire));
                consume(decode_frame(&mut buf, Role::Server, black_box(MAX_FRAME_BYTES)));
            })
        });
        group.bench_function(BenchmarkId::new("tungstenite", size), |b| {
            b.iter(|| {
                buf.extend_from_slice(black_box(&wire));
                consume(tungstenite_decode(&mut buf, black_box(MAX_FRAME_BYTES)));
            })
        });
    }
    group.finish();
}

/// Unmasking alone, in place, at an 8-byte-aligned and at an odd start.
fn ws_unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_unmask");
    for size in PAYLOAD_SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut data = payload(size + 3);
        for (name, offset) in [("ours", 0), ("ours_offset_3", 3)] {
            group.bench_function(BenchmarkId::new(name, size), |b| {
                b.iter(|| apply_mask(black_box(&mut data[offset..offset + size]), MASK))
            });
        }
    }
    group.finish();
}

/// Inputs prepared per timed batch: about 128 KiB of frames, so a batch's buffers are still in
/// the core's L2 cache when they are decoded, as a just-read buffer is. (`SmallInput` prepares a
/// tenth of all iterations at once: megabytes of separately allocated buffers, and the
/// measurement becomes one of cache misses.) Two clock reads per batch cost under 1 ns per
/// iteration at 64 iterations per batch.
fn batch_size(payload_bytes: usize) -> BatchSize {
    let frames = (128 * 1024 / payload_bytes.max(1)).clamp(2, 64);
    BatchSize::NumIterations(frames as u64)
}

/// An endless stream of identical wire frames, copied out in the order they would arrive.
struct RepeatingStream {
    /// A whole number of frames, at least `READ_CHUNK_BYTES` long.
    pattern: Vec<u8>,
    position: usize,
}

impl RepeatingStream {
    fn new(frame: &[u8]) -> RepeatingStream {
        let copies = READ_CHUNK_BYTES.div_ceil(frame.len()) + 1;
        RepeatingStream { pattern: frame.repeat(copies), position: 0 }
    }

    /// The next at most `max_bytes` bytes of the stream, as one slice of the pattern.
    fn next_chunk(&mut self, max_bytes: usize) -> &[u8] {
        if self.position == self.pattern.len() {
            self.position = 0;
        }
        let start = self.position;
        let end = self.pattern.len().min(start + max_bytes);
        self.position = end;
        &self.pattern[start..end]
    }
}

impl Read for RepeatingStream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let chunk = self.next_chunk(out.len());
        out[..chunk.len()].copy_from_slice(chunk);
        Ok(chunk.len())
    }
}

/// tungstenite writes only to answer pings and closes, which these streams never carry.
impl Write for RepeatingStream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Our server-side receive path over an in-memory stream: read buffer, `Decoder`, refills of
/// `READ_CHUNK_BYTES` copied from the stream when a message is incomplete.
struct OurReceiver {
    stream: RepeatingStream,
    buf: BytesMut,
    decoder: Decoder,
}

impl OurReceiver {
    fn new(frame: &[u8]) -> OurReceiver {
        OurReceiver {
            stream: RepeatingStream::new(frame),
            buf: BytesMut::with_capacity(READ_CHUNK_BYTES),
            decoder: Decoder::new(Role::Server, MAX_FRAME_BYTES, MAX_FRAME_BYTES),
        }
    }

    /// The next message as a `Bytes` (`Decoder::next_event`).
    fn next_message(&mut self) -> Bytes {
        loop {
            match self.decoder.next_event(&mut self.buf) {
                Ok(Some(WsEvent::Binary(message))) => return message,
                Ok(None) => self.refill(),
                other => panic!("benchmark stream decodes to binary messages, got {other:?}"),
            }
        }
    }

    /// The next message read where it lies (`Decoder::next_in_place`), as the broker's
    /// connection reads a frame it does not keep: `read` sees the payload, then it is consumed.
    fn read_next_in_place(&mut self, read: impl FnOnce(&[u8])) {
        loop {
            match self.decoder.next_in_place(&mut self.buf) {
                Ok(Some(Received::Binary(message))) => return read(message.payload()),
                Ok(None) => {}
                other => panic!("benchmark stream decodes to binary messages, got {other:?}"),
            }
            self.refill();
        }
    }

    fn refill(&mut self) {
        self.buf.reserve(READ_CHUNK_BYTES);
        let room = self.buf.capacity() - self.buf.len();
        self.buf.extend_from_slice(self.stream.next_chunk(room.min(READ_CHUNK_BYTES)));
    }
}

fn ws_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_read");
    for size in PAYLOAD_SIZES {
        let wire = masked_client_frame(size);
        let expected = payload(size);
        let mut ours = OurReceiver::new(&wire);
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK_BYTES)
            .max_frame_size(Some(MAX_FRAME_BYTES))
            .max_message_size(Some(MAX_FRAME_BYTES));
        let mut theirs = WebSocket::from_raw_socket(RepeatingStream::new(&wire), TungsteniteRole::Server, Some(config));
        for _ in 0..3 {
            assert_eq!(ours.next_message()[..], expected[..]);
            match theirs.read().expect("tungstenite reads the benchmark stream") {
                TungsteniteMessage::Binary(message) => assert_eq!(message[..], expected[..]),
                other => panic!("tungstenite decoded {other:?}"),
            }
        }

        ours.read_next_in_place(|message| assert_eq!(message, &expected[..]));

        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("ours", size), |b| {
            b.iter(|| ours.read_next_in_place(|message| consume(message)))
        });
        group.bench_function(BenchmarkId::new("ours_bytes", size), |b| b.iter(|| consume(ours.next_message())));
        group.bench_function(BenchmarkId::new("tungstenite", size), |b| {
            b.iter(|| consume(theirs.read().expect("tungstenite reads the benchmark stream")))
        });
    }
    group.finish();
}

fn ws_encode_header(c: &mut Criterion) {
    let mut group = c.benchmark_group("ws_encode_header");
    for size in PAYLOAD_SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut out = Vec::with_capacity(64);
        group.bench_function(BenchmarkId::new("ours", size), |b| {
            b.iter(|| {
                out.clear();
                encode_header(&mut out, true, OpCode::Binary, black_box(size), None);
                black_box(&out);
            })
        });
        let header = TungsteniteHeader {
            is_final: true,
            opcode: TungsteniteOpCode::Data(Data::Binary),
            mask: None,
            ..TungsteniteHeader::default()
        };
        group.bench_function(BenchmarkId::new("tungstenite", size), |b| {
            b.iter(|| {
                out.clear();
                header.format(black_box(size as u64), &mut out).expect("formatting into a Vec cannot fail");
                black_box(&out);
            })
        });
    }
    group.finish();
}

/// A SEND as a service would publish it: dotted address, content type, correlation id, one
/// application header.
fn realistic_send(body_bytes: usize) -> Frame {
    Frame::Send(Send {
        seq: 1_234_567,
        address: Bytes::from_static(b"orders.eu-west-1.priority"),
        durable: false,
        ttl_ms: 0,
        properties: Properties {
            content_type: Bytes::from_static(b"application/json"),
            correlation_id: Bytes::from_static(b"c0ffee-42"),
            reply_to: Bytes::new(),
            headers: [(Bytes::from_static(b"x-tenant"), Bytes::from_static(b"acme"))].into_iter().collect(),
        },
        body: Bytes::from(payload(body_bytes)),
    })
}

fn binding_name(binding: Binding) -> &'static str {
    match binding {
        Binding::Binary => "binary",
        Binding::Text => "text",
    }
}

fn mbws_codec(c: &mut Criterion) {
    let limits = CodecLimits::default();
    let mut decode_group = c.benchmark_group("mbws_decode");
    for binding in [Binding::Binary, Binding::Text] {
        for size in PAYLOAD_SIZES {
            let frame = realistic_send(size);
            let encoded = codec::encode(binding, &frame).freeze();
            assert_eq!(codec::decode(binding, encoded.clone(), &limits).as_ref(), Ok(&frame));
            decode_group.throughput(Throughput::Bytes(encoded.len() as u64));
            decode_group.bench_function(BenchmarkId::new(binding_name(binding), size), |b| {
                b.iter(|| consume(codec::decode(binding, black_box(encoded.clone()), &limits)))
            });
        }
    }
    decode_group.finish();

    let mut encode_group = c.benchmark_group("mbws_encode_header");
    for binding in [Binding::Binary, Binding::Text] {
        for size in PAYLOAD_SIZES {
            let frame = realistic_send(size);
            let mut out = BytesMut::with_capacity(256);
            encode_group.throughput(Throughput::Bytes(size as u64));
            encode_group.bench_function(BenchmarkId::new(binding_name(binding), size), |b| {
                b.iter(|| {
                    out.clear();
                    codec::encode_header(binding, black_box(&frame), &mut out);
                    black_box(&out);
                })
            });
        }
    }
    encode_group.finish();
}

criterion_group!(benches, ws_decode, ws_decode_reused, ws_unmask, ws_read, ws_encode_header, mbws_codec);
criterion_main!(benches);
