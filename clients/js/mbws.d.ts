/**
 * Encodes `frame` in `binding`: a Uint8Array (binary) or a string (text). A text SEND whose
 * body is bytes goes binary (a text message must be UTF-8; PROTOCOL 6.1 allows mixing).
 * @param {any} frame
 * @param {Binding} binding
 * @returns {Uint8Array | string}
 */
export function encode(frame: any, binding: Binding): Uint8Array | string;
/**
 * Decodes one WebSocket message (a string for text, bytes for binary) into a frame object.
 * Throws an Error saying what is wrong with a malformed frame.
 * @param {string | Uint8Array | ArrayBuffer} data
 * @returns {any}
 */
export function decode(data: string | Uint8Array | ArrayBuffer): any;
/**
 * Connects and opens a session; resolves once the broker answered OPENED.
 * @param {string} url `ws://host:port/` (or `wss://`)
 * @param {ConnectOptions} [options]
 * @returns {Promise<Client>}
 */
export function connect(url: string, options?: ConnectOptions): Promise<Client>;
/** The reliable subprotocol: receipts, resume. */
export const RELIABLE: "MBWS.huawei.com";
/** The light subprotocol: the same frames, at most once, no resume. */
export const LIGHT: "MBLWS.huawei.com";
/**
 * @typedef {'binary' | 'text'} Binding
 * @typedef {'connecting' | 'open' | 'reconnecting' | 'closing' | 'closed'} ConnectionState
 * @typedef {Array<[string, string]> | Record<string, string>} HeadersInit
 * @typedef {string | Uint8Array | ArrayBuffer} Body
 */
/**
 * @typedef {object} ConnectOptions
 * @property {string} [subprotocol] `RELIABLE` (default) or `LIGHT`.
 * @property {Binding} [binding] the binding of the frames this client sends (default binary).
 * @property {string} [token] credentials for the URL's query string (`?token=...`).
 * @property {string} [login] OPEN's `login` field.
 * @property {string} [passcode] OPEN's `passcode` field.
 * @property {number} [heartbeatMs] heartbeat interval to ask for; 0 for none (default 10000).
 * @property {number} [connectTimeoutMs] bound on each connection attempt up to OPENED (default 10000).
 * @property {boolean} [reconnect] resume after a lost connection (MBWS only; default true).
 * @property {number} [reconnectDelayMs] first reconnect delay, doubled per attempt (default 100).
 * @property {number} [maxReconnectDelayMs] largest reconnect delay (default 5000).
 * @property {number} [closeTimeoutMs] how long `close` waits for receipts and the broker's CLOSE (default 5000).
 * @property {any} [WebSocket] a WebSocket constructor (default: the global one, else the `ws` package).
 */
/**
 * @typedef {object} SendOptions
 * @property {string} [contentType]
 * @property {string} [correlationId]
 * @property {string} [replyTo]
 * @property {HeadersInit} [headers] application headers; names start with `x-`.
 * @property {boolean} [durable] receipted only once on disk (PROTOCOL 7.2).
 * @property {number} [ttlMs] time to live; 0 for none.
 * @property {boolean} [receipt] MBLWS only: false sends seq 0 (no receipt wanted).
 */
/**
 * @typedef {object} SubscribeOptions
 * @property {'anycast' | 'multicast'} [mode] default anycast.
 * @property {'client' | 'auto'} [ack] client (default: every delivery is acknowledged) or auto
 *   (the broker settles a delivery once written: at most once).
 * @property {boolean} [manualAck] with ack client: the application calls `message.ack()` or
 *   `message.nack()`; otherwise the client acknowledges once the handler returned (or its
 *   promise resolved), or once the iterator is asked for the next message.
 * @property {number} [credit] unacknowledged deliveries the subscription may hold (default 100).
 * @property {(message: Message) => unknown} [onMessage] handler; without it, iterate the subscription.
 * @property {(error: MbwsError) => void} [onError] called when the broker ends the subscription.
 */
/**
 * @typedef {object} Limits the limits the broker announced in OPENED (PROTOCOL 9).
 * @property {number} heartbeatMs
 * @property {number} sessionExpiryMs
 * @property {number} maxFrameBytes
 * @property {number} maxAddressBytes
 * @property {number} maxHeaders
 * @property {number} maxHeaderBytes
 * @property {number} maxCredit
 * @property {number} maxSubscriptions
 * @property {number} maxInflightSends
 * @property {number} maxQueuedMessages
 */
/** An MBWS error: a refused frame, a fatal session error, or a lost connection. */
export class MbwsError extends Error {
    /**
     * @param {number} code MBWS code (4000-4999), or the WebSocket close code of a lost connection.
     * @param {string} reason the broker's (or this client's) reason.
     * @param {{fatal?: boolean, seq?: number, subscriptionId?: number}} [details]
     */
    constructor(code: number, reason: string, details?: {
        fatal?: boolean;
        seq?: number;
        subscriptionId?: number;
    });
    /** @type {number} */
    code: number;
    /** @type {string} */
    reason: string;
    /** @type {boolean} */
    fatal: boolean;
    /** @type {number} */
    seq: number;
    /** @type {number} */
    subscriptionId: number;
}
/** A delivered message. */
export class Message {
    /** @param {Subscription} subscription @param {any} frame */
    constructor(subscription: Subscription, frame: any);
    /** @type {Subscription} */
    subscription: Subscription;
    /** @type {string} */
    address: string;
    /** @type {number} the session's delivery sequence (ACK and NACK name it) */
    deliverySeq: number;
    /** @type {string} unique within the address, also across broker restarts (decimal u64) */
    messageId: string;
    /** @type {boolean} */
    redelivered: boolean;
    /** @type {boolean} */
    durable: boolean;
    /** @type {string} */
    contentType: string;
    /** @type {string} */
    correlationId: string;
    /** @type {string} */
    replyTo: string;
    /** @type {Array<[string, string]>} application headers, in order */
    headers: Array<[string, string]>;
    /** @type {string | Uint8Array} */
    data: string | Uint8Array;
    /** @type {boolean} */
    settled: boolean;
    /** The body as bytes. */
    get body(): Uint8Array<ArrayBufferLike>;
    /** The body as text (UTF-8). */
    text(): string;
    /** The body parsed as JSON. */
    json(): any;
    /** The first application header called `name`, if any. @param {string} name */
    header(name: string): string | undefined;
    /** Acknowledges the delivery (client-ack subscriptions; once). */
    ack(): void;
    /** Gives the delivery back: requeued (default) or dead-lettered. @param {boolean} [requeue] */
    nack(requeue?: boolean): void;
}
/** A live subscription: a handler is called per message, or it is iterated (`for await`). */
export class Subscription {
    /**
     * @param {Client} client
     * @param {number} id
     * @param {string} address
     * @param {SubscribeOptions} options
     */
    constructor(client: Client, id: number, address: string, options: SubscribeOptions);
    client: Client;
    /** @type {number} */
    id: number;
    /** @type {string} */
    address: string;
    /** @type {'anycast' | 'multicast'} */
    mode: "anycast" | "multicast";
    /** @type {'client' | 'auto'} */
    ack: "client" | "auto";
    manualAck: boolean;
    /** @type {number} */
    credit: number;
    onMessage: ((message: Message) => unknown) | undefined;
    onError: ((error: MbwsError) => void) | undefined;
    confirmed: boolean;
    /** @type {MbwsError | null} why the subscription ended, or null while it lives */
    error: MbwsError | null;
    ended: boolean;
    /** @type {Message[]} delivered, not yet taken by the iterator (bounded by credit) */
    buffer: Message[];
    /** @type {((result: IteratorResult<Message>) => void) | null} */
    waiting: ((result: IteratorResult<Message>) => void) | null;
    /** @type {((error: MbwsError) => void) | null} */
    rejectWaiting: ((error: MbwsError) => void) | null;
    /** @type {Message | null} the message the iterator handed out last (acknowledged on the next call) */
    handedOut: Message | null;
    paused: boolean;
    /** @type {{resolve: (s: Subscription) => void, reject: (e: MbwsError) => void} | null} */
    pending: {
        resolve: (s: Subscription) => void;
        reject: (e: MbwsError) => void;
    } | null;
    /** The SUBSCRIBE frame (sent again after a resume until confirmed). */
    frame(): {
        kind: string;
        subscriptionId: number;
        address: string;
        mode: "anycast" | "multicast";
        ack: "client" | "auto";
        credit: number;
    };
    /** Sets the credit (FLOW, absolute). @param {number} credit */
    setCredit(credit: number): void;
    /** Ends the subscription; its unacknowledged anycast deliveries go back to the queue. */
    unsubscribe(): void;
    /** @param {Message} message @param {any} frame */
    _settle(message: Message, frame: any): void;
    /** @param {Message} message */
    _deliver(message: Message): void;
    /** A handler threw: the delivery goes back to the queue (client ack), and the client reports it.
     * @param {Message} message @param {unknown} error */
    _handlerFailed(message: Message, error: unknown): void;
    /** @param {MbwsError | null} error */
    _end(error: MbwsError | null): void;
    _ackHandedOut(): void;
    /** @returns {Promise<IteratorResult<Message>>} */
    _next(): Promise<IteratorResult<Message>>;
    /** @returns {AsyncIterator<Message>} */
    [Symbol.asyncIterator](): AsyncIterator<Message>;
}
/**
 * One MBWS session. Events (`on`): `state` (a ConnectionState, with the error that closed it),
 * `error` (an ERROR that no promise could carry, or a handler that threw).
 */
export class Client {
    /** @param {string} url @param {ConnectOptions} options */
    constructor(url: string, options: ConnectOptions);
    url: string;
    options: ConnectOptions;
    /** @type {string} */
    subprotocol: string;
    /** @type {Binding} */
    binding: Binding;
    reliable: boolean;
    /** @type {ConnectionState} */
    state: ConnectionState;
    /** @type {string} */
    sessionId: string;
    /** @type {string} */
    server: string;
    /** @type {Limits | null} */
    limits: Limits | null;
    /** @type {any} */
    ws: any;
    /** @type {any} */
    WebSocket: any;
    nextSeq: number;
    /** @type {Map<number, {frame: any, resolve: (r: {seq: number}) => void, reject: (e: MbwsError) => void}>} */
    unreceipted: Map<number, {
        frame: any;
        resolve: (r: {
            seq: number;
        }) => void;
        reject: (e: MbwsError) => void;
    }>;
    /** @type {Array<() => void>} sends waiting for a slot under max-inflight-sends */
    sendWaiters: Array<() => void>;
    reservedSlots: number;
    /** @type {Map<number, Subscription>} */
    subscriptions: Map<number, Subscription>;
    nextSubscriptionId: number;
    /** Highest delivery-seq received (the resume watermark). */
    lastDeliverySeq: number;
    /** @type {Array<{frame: any, token: number}>} settlements and FLOWs not yet proven read */
    unconfirmed: Array<{
        frame: any;
        token: number;
    }>;
    /** @type {any[]} control frames written while no connection was open */
    queuedControl: any[];
    /** @type {Message[]} client-ack deliveries in arrival order; settled ones leave from the front */
    unsettled: Message[];
    /** Index of the first entry of `unsettled` that may still be unsettled. */
    unsettledHead: number;
    /** Length of `unsettled` at which its settled entries are removed. */
    unsettledCompactAt: number;
    /** @type {any[]} ACKs and NACKs queued by the application, written by `_flushSettlements` */
    pendingSettlements: any[];
    flushScheduled: boolean;
    nextPingToken: number;
    lastSentAt: number;
    lastReceivedAt: number;
    /** @type {ReturnType<typeof setInterval> | null} */
    heartbeatTimer: ReturnType<typeof setInterval> | null;
    /** @type {MbwsError | null} the fatal ERROR received on the current connection */
    fatal: MbwsError | null;
    /** @type {Record<string, Array<(value: any) => void>>} */
    listeners: Record<string, Array<(value: any) => void>>;
    /** @type {((error: MbwsError | null) => void) | null} settles the current connection attempt */
    opening: ((error: MbwsError | null) => void) | null;
    /** @type {(() => void) | null} */
    closed: (() => void) | null;
    /** @type {MbwsError | null} why the session ended, once it has */
    failure: MbwsError | null;
    /** @type {Array<() => void>} woken when no SEND is unreceipted (close waits for it) */
    drainWaiters: Array<() => void>;
    /**
     * Listens to `state` or `error`; returns a function that stops listening.
     * @param {'state' | 'error'} event
     * @param {(value: any) => void} listener
     */
    on(event: "state" | "error", listener: (value: any) => void): () => void;
    /** @param {string} event @param {any} value */
    _emit(event: string, value: any): void;
    /** @param {ConnectionState} state @param {MbwsError | null} [error] @param {boolean} [resumed] */
    _setState(state: ConnectionState, error?: MbwsError | null, resumed?: boolean): void;
    _start(): Promise<void>;
    /**
     * One connection up to OPENED, bounded by connectTimeoutMs. Resolves null when open, or the
     * error that ended the attempt.
     * @returns {Promise<MbwsError | null>}
     */
    _attempt(): Promise<MbwsError | null>;
    /** Forgets the current socket (its events are ignored from now on) and closes it. */
    _dropSocket(): void;
    /** @param {any} frame */
    _write(frame: any): void;
    /** @param {any} data */
    _onData(data: any): void;
    /** @param {any} frame */
    _onOpened(frame: any): void;
    /** @param {number} heartbeatMs */
    _startHeartbeat(heartbeatMs: number): void;
    _ping(): void;
    /** @param {number} seq */
    _onReceipt(seq: number): void;
    _releaseSendSlots(): void;
    _sendWindow(): number;
    /** @param {any} frame */
    _onMessage(frame: any): void;
    /** @param {any} frame */
    _onError(frame: any): void;
    /** @param {{code: number, reason: string}} event */
    _onClose(event: {
        code: number;
        reason: string;
    }): void;
    /** @param {MbwsError} cause */
    _reconnect(cause: MbwsError): Promise<void>;
    /**
     * Ends the session: every pending promise is rejected with `error`; subscriptions end with
     * it, or normally (iterators finish) after `close`.
     * @param {MbwsError} error
     * @param {boolean} [graceful]
     */
    _fail(error: MbwsError, graceful?: boolean): void;
    _finish(): void;
    /** Queues an ACK or NACK for the next `_flushSettlements`. @param {any} frame */
    _queueSettlement(frame: any): void;
    /**
     * Writes the queued settlements (see the module comment): NACKs, then one cumulative ACK for
     * the queued ACKs below the oldest unsettled delivery, then single ACKs for the others.
     */
    _flushSettlements(): void;
    /** Sends a FLOW or UNSUBSCRIBE (after the queued settlements) now, or after the resume. @param {any} frame */
    _order(frame: any): void;
    /** Sends a settlement, FLOW or UNSUBSCRIBE now, or after the resume. @param {any} frame */
    _control(frame: any): void;
    /** @param {any} frame */
    _writeControl(frame: any): void;
    /**
     * Sends a message. Resolves with its seq once the broker receipted it; rejects with an
     * MbwsError (code and reason) if the broker refused it or the session ended first. Waits
     * while `max-inflight-sends` SENDs are unreceipted.
     * @param {string} address
     * @param {Body} [body]
     * @param {SendOptions} [options]
     * @returns {Promise<{seq: number}>}
     */
    send(address: string, body?: Body, options?: SendOptions): Promise<{
        seq: number;
    }>;
    /**
     * What the broker would refuse with a fatal 4400 or 4413 (PROTOCOL 6.4) is a TypeError here.
     * @param {string} kind @param {string} address
     */
    _checkAddress(kind: string, address: string): void;
    /**
     * Subscribes to `address`; resolves once the broker confirmed it (SUBSCRIBED), rejects with
     * the MbwsError of a refusal.
     * @param {string} address
     * @param {SubscribeOptions | ((message: Message) => unknown)} [options] options, or just a handler
     * @returns {Promise<Subscription>}
     */
    subscribe(address: string, options?: SubscribeOptions | ((message: Message) => unknown)): Promise<Subscription>;
    /**
     * Ends the session (CLOSE): waits (bounded by closeTimeoutMs) for the receipts of pending
     * SENDs, then closes; what is still unreceipted is rejected.
     */
    close(): Promise<void>;
}
export type Binding = "binary" | "text";
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closing" | "closed";
export type HeadersInit = Array<[string, string]> | Record<string, string>;
export type Body = string | Uint8Array | ArrayBuffer;
export type ConnectOptions = {
    /**
     * `RELIABLE` (default) or `LIGHT`.
     */
    subprotocol?: string | undefined;
    /**
     * the binding of the frames this client sends (default binary).
     */
    binding?: Binding | undefined;
    /**
     * credentials for the URL's query string (`?token=...`).
     */
    token?: string | undefined;
    /**
     * OPEN's `login` field.
     */
    login?: string | undefined;
    /**
     * OPEN's `passcode` field.
     */
    passcode?: string | undefined;
    /**
     * heartbeat interval to ask for; 0 for none (default 10000).
     */
    heartbeatMs?: number | undefined;
    /**
     * bound on each connection attempt up to OPENED (default 10000).
     */
    connectTimeoutMs?: number | undefined;
    /**
     * resume after a lost connection (MBWS only; default true).
     */
    reconnect?: boolean | undefined;
    /**
     * first reconnect delay, doubled per attempt (default 100).
     */
    reconnectDelayMs?: number | undefined;
    /**
     * largest reconnect delay (default 5000).
     */
    maxReconnectDelayMs?: number | undefined;
    /**
     * how long `close` waits for receipts and the broker's CLOSE (default 5000).
     */
    closeTimeoutMs?: number | undefined;
    /**
     * a WebSocket constructor (default: the global one, else the `ws` package).
     */
    WebSocket?: any;
};
export type SendOptions = {
    contentType?: string | undefined;
    correlationId?: string | undefined;
    replyTo?: string | undefined;
    /**
     * application headers; names start with `x-`.
     */
    headers?: HeadersInit | undefined;
    /**
     * receipted only once on disk (PROTOCOL 7.2).
     */
    durable?: boolean | undefined;
    /**
     * time to live; 0 for none.
     */
    ttlMs?: number | undefined;
    /**
     * MBLWS only: false sends seq 0 (no receipt wanted).
     */
    receipt?: boolean | undefined;
};
export type SubscribeOptions = {
    /**
     * default anycast.
     */
    mode?: "anycast" | "multicast" | undefined;
    /**
     * client (default: every delivery is acknowledged) or auto
     * (the broker settles a delivery once written: at most once).
     */
    ack?: "client" | "auto" | undefined;
    /**
     * with ack client: the application calls `message.ack()` or
     * `message.nack()`; otherwise the client acknowledges once the handler returned (or its
     * promise resolved), or once the iterator is asked for the next message.
     */
    manualAck?: boolean | undefined;
    /**
     * unacknowledged deliveries the subscription may hold (default 100).
     */
    credit?: number | undefined;
    /**
     * handler; without it, iterate the subscription.
     */
    onMessage?: ((message: Message) => unknown) | undefined;
    /**
     * called when the broker ends the subscription.
     */
    onError?: ((error: MbwsError) => void) | undefined;
};
/**
 * the limits the broker announced in OPENED (PROTOCOL 9).
 */
export type Limits = {
    heartbeatMs: number;
    sessionExpiryMs: number;
    maxFrameBytes: number;
    maxAddressBytes: number;
    maxHeaders: number;
    maxHeaderBytes: number;
    maxCredit: number;
    maxSubscriptions: number;
    maxInflightSends: number;
    maxQueuedMessages: number;
};
