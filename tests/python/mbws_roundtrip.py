"""MBWS interop peer in Python: the `websockets` library for WebSocket, MBWS frames by hand.

Usage: mbws_roundtrip.py WS_URL [COUNT] [CA_FILE [TLS_VERSION]]

With a wss:// URL, Python's `ssl` module speaks TLS: CA_FILE is the PEM file to trust and
TLS_VERSION (1.2 or 1.3, default any) pins the version; the negotiated one is printed.

For each subprotocol (MBWS.huawei.com, MBLWS.huawei.com) and each binding (binary, text) it
opens a consumer session and a producer session on their own address, subscribes (anycast,
client ack), sends COUNT messages with sequence numbers 1..COUNT, waits for the cumulative
RECEIPT of the last, then receives the COUNT messages, acknowledging each, and checks bodies
and order. The frames follow docs/PROTOCOL.md (crates/mbws-proto/src/mbws/binary.rs and
text.rs): binary frames are built with struct.pack, text frames with string formatting.

Prints one summary line per run and `OK ...` at the end; exits 1 on any mismatch.
"""

import asyncio
import ssl
import struct
import sys

import websockets

RELIABLE = "MBWS.huawei.com"
LIGHT = "MBLWS.huawei.com"
VERSION = 1
TIMEOUT_S = 10

OPEN, OPENED, SEND, RECEIPT, SUBSCRIBE, SUBSCRIBED = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
MESSAGE, ACK, ERROR, CLOSE = 0x08, 0x09, 0x0E, 0x0F


class Mismatch(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Mismatch(what)


# --- binary binding -------------------------------------------------------------------------


def str8(value: bytes) -> bytes:
    return struct.pack("!B", len(value)) + value


def str16(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def binary_open() -> bytes:
    # version, kind, flags; last-received-seq u64, heartbeat-ms u32; session-id, login, passcode
    return struct.pack("!BBBQI", VERSION, OPEN, 0, 0, 0) + str8(b"") + str8(b"") + str16(b"")


def binary_send(seq: int, address: str, body: bytes) -> bytes:
    # seq u64, ttl-ms u32; address; content-type, correlation-id, reply-to, header-count; body
    head = struct.pack("!BBBQI", VERSION, SEND, 0, seq, 0) + str8(address.encode())
    return head + str8(b"") + str8(b"") + str8(b"") + struct.pack("!B", 0) + body


def binary_subscribe(subscription_id: int, address: str, credit: int) -> bytes:
    # flags: bit0 multicast, bit1 auto-ack (both clear: anycast, client ack)
    return struct.pack("!BBBII", VERSION, SUBSCRIBE, 0, subscription_id, credit) + str8(address.encode())


def binary_ack(delivery_seq: int) -> bytes:
    return struct.pack("!BBBQ", VERSION, ACK, 0, delivery_seq)


def binary_close() -> bytes:
    return struct.pack("!BBB", VERSION, CLOSE, 0)


class Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.position = 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        check(self.position + size <= len(self.data), f"frame truncated at offset {self.position}")
        values = struct.unpack_from(fmt, self.data, self.position)
        self.position += size
        return values

    def str8(self) -> str:
        (length,) = self.take("!B")
        return self.raw(length).decode()

    def str16(self) -> str:
        (length,) = self.take("!H")
        return self.raw(length).decode()

    def raw(self, length: int) -> bytes:
        check(self.position + length <= len(self.data), f"string truncated at offset {self.position}")
        value = self.data[self.position : self.position + length]
        self.position += length
        return value

    def rest(self) -> bytes:
        value = self.data[self.position :]
        self.position = len(self.data)
        return value

    def done(self):
        check(self.position == len(self.data), f"{len(self.data) - self.position} trailing bytes")


def parse_binary(data: bytes) -> dict:
    reader = Reader(data)
    version, kind, flags = reader.take("!BBB")
    check(version == VERSION, f"binary frame version {version}")
    if kind == OPENED:
        reader.take("!QIIIHHIIIII")
        frame = {"kind": "OPENED", "session-id": reader.str8(), "server": reader.str8()}
    elif kind == RECEIPT:
        frame = {"kind": "RECEIPT", "seq": reader.take("!Q")[0]}
    elif kind == SUBSCRIBED:
        frame = {"kind": "SUBSCRIBED", "subscription-id": reader.take("!I")[0]}
    elif kind == MESSAGE:
        subscription_id, delivery_seq, message_id = reader.take("!IQQ")
        address = reader.str8()
        for _ in range(3):  # content-type, correlation-id, reply-to
            reader.str8()
        (header_count,) = reader.take("!B")
        for _ in range(header_count):
            reader.str8()
            reader.str16()
        frame = {
            "kind": "MESSAGE",
            "subscription-id": subscription_id,
            "delivery-seq": delivery_seq,
            "message-id": message_id,
            "address": address,
            "body": reader.rest(),
        }
    elif kind == ERROR:
        code, seq, _subscription_id = reader.take("!HQI")
        frame = {"kind": "ERROR", "code": code, "fatal": bool(flags & 1), "reason": reader.str16()}
    elif kind == CLOSE:
        frame = {"kind": "CLOSE"}
    else:
        raise Mismatch(f"unexpected binary kind 0x{kind:02x}")
    reader.done()
    return frame


# --- text binding ---------------------------------------------------------------------------


def text_frame(kind: str, fields: list, body: str = "") -> str:
    return kind + "\n" + "".join(f"{name}:{value}\n" for name, value in fields) + "\n" + body


def text_open() -> str:
    return text_frame("OPEN", [("version", VERSION)])


def text_send(seq: int, address: str, body: str) -> str:
    return text_frame("SEND", [("seq", seq), ("address", address)], body)


def text_subscribe(subscription_id: int, address: str, credit: int) -> str:
    fields = [("subscription-id", subscription_id), ("address", address), ("mode", "anycast"), ("ack", "client")]
    return text_frame("SUBSCRIBE", fields + [("credit", credit)])


def text_ack(delivery_seq: int) -> str:
    return text_frame("ACK", [("delivery-seq", delivery_seq)])


def text_close() -> str:
    return text_frame("CLOSE", [])


def parse_text(text: str) -> dict:
    check("\n\n" in text, f"text frame without a blank line: {text!r}")
    head, body = text.split("\n\n", 1)
    lines = [line[:-1] if line.endswith("\r") else line for line in head.split("\n")]
    frame = {"kind": lines[0]}
    for line in lines[1:]:
        check(":" in line, f"header line without ':': {line!r}")
        name, value = line.split(":", 1)
        frame[name] = value
    for name in ("seq", "subscription-id", "delivery-seq", "message-id", "code"):
        if name in frame:
            frame[name] = int(frame[name])
    frame["fatal"] = frame.get("fatal") == "true"
    if frame["kind"] == "MESSAGE":
        frame["body"] = body
    else:
        check(body == "", f"{frame['kind']} has a body: {body!r}")
    return frame


# --- sessions -------------------------------------------------------------------------------


class BinaryBinding:
    name = "binary"
    message_type = bytes
    open = staticmethod(binary_open)
    send = staticmethod(binary_send)
    subscribe = staticmethod(binary_subscribe)
    ack = staticmethod(binary_ack)
    close = staticmethod(binary_close)
    parse = staticmethod(parse_binary)


class TextBinding:
    name = "text"
    message_type = str
    open = staticmethod(text_open)
    send = staticmethod(text_send)
    subscribe = staticmethod(text_subscribe)
    ack = staticmethod(text_ack)
    close = staticmethod(text_close)
    parse = staticmethod(parse_text)


class Session:
    """One WebSocket connection and MBWS session in one binding."""

    def __init__(self, url: str, subprotocol: str, binding):
        self.url = url
        self.subprotocol = subprotocol
        self.binding = binding
        self.ws = None

    async def open(self):
        tls = {"ssl": SSL_CONTEXT} if self.url.startswith("wss://") else {}
        self.ws = await asyncio.wait_for(
            websockets.connect(self.url, subprotocols=[self.subprotocol], open_timeout=TIMEOUT_S, **tls), TIMEOUT_S
        )
        if tls:
            print(f"TLS version {self.ws.transport.get_extra_info('ssl_object').version()}", flush=True)
        check(
            self.ws.subprotocol == self.subprotocol,
            f"negotiated subprotocol {self.ws.subprotocol!r}, offered {self.subprotocol!r}",
        )
        await self.ws.send(self.binding.open())
        opened = await self.recv()
        check(opened["kind"] == "OPENED", f"expected OPENED, got {opened}")
        check(opened["session-id"] != "", "OPENED without a session id")
        return self

    async def recv(self) -> dict:
        data = await asyncio.wait_for(self.ws.recv(), TIMEOUT_S)
        check(
            isinstance(data, self.binding.message_type),
            f"{self.binding.name} session got a {type(data).__name__} WebSocket message: {data!r}",
        )
        frame = self.binding.parse(data)
        check(frame["kind"] != "ERROR", f"broker error: {frame}")
        return frame

    async def close(self):
        await self.ws.send(self.binding.close())
        reply = await self.recv()
        check(reply["kind"] == "CLOSE", f"expected CLOSE, got {reply}")
        await asyncio.wait_for(self.ws.wait_closed(), TIMEOUT_S)
        check(self.ws.close_code == 1000, f"WebSocket close code {self.ws.close_code}, expected 1000")


def body_of(binding, index: int):
    if binding is BinaryBinding:
        return b"\x00\xff binary " + str(index).encode() + b" \x80"
    return f"text {index}: naïve café ✓"


async def round_trip(url: str, subprotocol: str, binding: str, count: int) -> str:
    address = f"python-{subprotocol}-{binding.name}"
    consumer = await Session(url, subprotocol, binding).open()
    await consumer.ws.send(binding.subscribe(1, address, 10))
    subscribed = await consumer.recv()
    check(
        subscribed["kind"] == "SUBSCRIBED" and subscribed["subscription-id"] == 1,
        f"expected SUBSCRIBED 1, got {subscribed}",
    )

    producer = await Session(url, subprotocol, binding).open()
    sent = [body_of(binding, index) for index in range(count)]
    for seq, body in enumerate(sent, start=1):
        await producer.ws.send(binding.send(seq, address, body))
    receipted = 0
    while receipted < count:
        receipt = await producer.recv()
        check(receipt["kind"] == "RECEIPT", f"expected RECEIPT, got {receipt}")
        check(receipted < receipt["seq"] <= count, f"receipt {receipt['seq']} after {receipted}")
        receipted = receipt["seq"]

    received = []
    last_delivery = 0
    while len(received) < count:
        message = await consumer.recv()
        check(message["kind"] == "MESSAGE", f"expected MESSAGE, got {message}")
        check(message["subscription-id"] == 1 and message["address"] == address, f"wrong message {message}")
        check(message["delivery-seq"] > last_delivery, f"delivery seq {message['delivery-seq']} after {last_delivery}")
        last_delivery = message["delivery-seq"]
        await consumer.ws.send(binding.ack(last_delivery))
        received.append(message["body"])
    for index, (want, got) in enumerate(zip(sent, received)):
        check(want == got, f"message {index}: sent {want!r}, received {got!r}")

    await producer.close()
    await consumer.close()
    return f"{subprotocol} {binding.name}: {count} sent, {receipted} receipted, {len(received)} received in order"


SSL_CONTEXT = None


def ssl_context(ca_file: str, version: str):
    context = ssl.create_default_context(cafile=ca_file)
    if version:
        pinned = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}[version]
        context.minimum_version = pinned
        context.maximum_version = pinned
    return context


async def main() -> int:
    global SSL_CONTEXT
    url = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    if len(sys.argv) > 3:
        SSL_CONTEXT = ssl_context(sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
    runs = 0
    for subprotocol in (RELIABLE, LIGHT):
        for binding in (BinaryBinding, TextBinding):
            print(await round_trip(url, subprotocol, binding, count), flush=True)
            runs += 1
    print(f"OK {runs} round trips of {count} messages (websockets {websockets.__version__})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except (Mismatch, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as error:
        print(f"FAIL: {type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(1)
