// conduit/2 framing and parsing, as pure functions (no sockets): docs/PROTOCOL.md §3, §4, §14.
//
// A message is three ZeroMQ frames: the protocol frame "conduit/2", the command in ASCII
// capitals, and one msgpack map (the body). Requests carry `rid`, echoed by the reply. Batches
// are columns: one array per field (a DELIVER's `id`, `attempt`, `payload`...; a report's `id`,
// `attempt`, `result`...), entry i of each belonging to task i.

import { Decoder, Encoder } from "@msgpack/msgpack";

export const PROTOCOL = "conduit/2";
export const PREVIOUS = "conduit/1"; // a broker speaking it refuses ours: see VersionError
export const MAX_BODY_BYTES = 16 * 1024 * 1024; // §8: a body frame over this gets too_large
export const MAX_FRAME_BYTES = MAX_BODY_BYTES + 4096; // the sockets' maxMessageSize
export const MAX_BATCH = 10_000; // rows, ids or tasks in one message
export const MAX_QUEUES = 64; // queues in one POLL
export const MAX_NAME_CHARS = 200; // worker ids

export const REQUESTS = Object.freeze([
  "SUBMIT", "POLL", "HEARTBEAT", "COMPLETE", "FAIL", "RELEASE", "CANCEL", "RESULT", "PING",
]);
export const REPLIES = Object.freeze(["SUBMITTED", "DELIVER", "ACK", "RESULTS", "PONG", "ERROR"]);

/** Error codes a broker may answer with (§7.1); an unknown one is a refusal not to retry. */
export const RETRYABLE = Object.freeze(new Set(["busy", "unavailable", "shutting_down", "internal"]));

const QUEUE_NAME = /^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$/;
const PROTOCOL_BYTES = Buffer.from(PROTOCOL);
const PREVIOUS_BYTES = Buffer.from(PREVIOUS);
/** @type {Map<string, Buffer>} command frames, made once */
const COMMANDS = new Map([...REQUESTS, ...REPLIES, "GOSSIP"].map((c) => [c, Buffer.from(c)]));

// Task ids are PostgreSQL bigints (§4): decode 64-bit integers as BigInt rather than lose bits,
// and encode BigInt back as msgpack int 64. Bodies are maps with str keys.
const encoder = new Encoder({ useBigInt64: true, ignoreUndefined: true });
const decoder = new Decoder({
  useBigInt64: true,
  maxStrLength: MAX_BODY_BYTES,
  maxBinLength: MAX_BODY_BYTES,
  maxArrayLength: MAX_BATCH * 4,
  maxMapLength: 1024,
  maxExtLength: 0,
});

/** A reply or gossip that breaks the protocol. */
export class ProtocolError extends Error {}

/** A message from a broker of another protocol version (§12): repeating will not help. */
export class VersionError extends ProtocolError {}

/**
 * @typedef {{command: string, body: Record<string, any>}} Message
 * @typedef {number | bigint} TaskId
 * @typedef {{id: TaskId, queue: string, attempt: number, payload: Uint8Array, priority: number,
 *   failures: number, max_attempts: number, lease_timeout: number, broker: string}} Delivery
 * @typedef {"HEARTBEAT" | "RELEASE" | "COMPLETE" | "FAIL"} Settling
 */

/** A DELIVER's columns (§6.2), always all present, one entry per task. */
export const DELIVER_COLUMNS = Object.freeze(["id", "attempt", "queue", "payload", "priority", "failures", "max_attempts", "lease_timeout"]);

/**
 * Frames for one request. `body` must already hold `rid` (§4); payloads and results must be
 * Uint8Array (Buffer is one) so they go out as msgpack bin, never str.
 * @param {string} command
 * @param {Record<string, any>} body
 * @returns {[Uint8Array, Uint8Array, Uint8Array]}
 */
export function encode(command, body) {
  return [PROTOCOL_BYTES, COMMANDS.get(command) ?? Buffer.from(command), encoder.encode(body)];
}

/**
 * Parse one received message: three frames, the right protocol, a known command, a map body.
 * @param {ArrayLike<Uint8Array>} frames
 * @param {readonly string[]} allowed commands accepted here (REPLIES, or ["GOSSIP"])
 * @returns {Message}
 */
export function decode(frames, allowed = REPLIES) {
  if (frames.length !== 3) throw new ProtocolError(`expected 3 frames, got ${frames.length}`);
  const [protocol, command, raw] = frames;
  if (!PROTOCOL_BYTES.equals(view(protocol))) {
    const shown = PREVIOUS_BYTES.equals(view(protocol)) ? PREVIOUS : JSON.stringify(text(protocol).slice(0, 32));
    throw new VersionError(`the broker speaks ${shown}; this peer speaks ${PROTOCOL}`);
  }
  const name = text(command);
  if (!allowed.includes(name)) throw new ProtocolError(`unexpected command ${JSON.stringify(name.slice(0, 32))}`);
  let body;
  try {
    body = decoder.decode(raw);
  } catch (err) {
    throw new ProtocolError(`body is not valid msgpack: ${err.message}`);
  }
  if (body === null || typeof body !== "object" || Array.isArray(body) || body instanceof Uint8Array) {
    throw new ProtocolError("body must be a msgpack map");
  }
  return { command: name, body };
}

/** A Buffer over the same memory (zeromq gives Buffers already; no copy either way). @param {Uint8Array} bytes */
function view(bytes) {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** @param {Uint8Array} bytes */
function text(bytes) {
  return view(bytes).toString("utf8");
}

/**
 * A task id or count as a JS number when it fits exactly, else the BigInt: an id decoded from a
 * msgpack uint 64 arrives as BigInt even when small.
 * @param {number | bigint} value
 * @returns {number | bigint}
 */
export function int(value) {
  if (typeof value === "bigint" && value <= BigInt(Number.MAX_SAFE_INTEGER) && value >= BigInt(Number.MIN_SAFE_INTEGER)) {
    return Number(value);
  }
  return value;
}

/**
 * A DELIVER's tasks as the worker uses them, read column by column (§6.2: every column is
 * always present, all of one length, empty for an empty DELIVER).
 * @param {Record<string, any>} body
 * @returns {Delivery[]}
 */
export function deliveries(body) {
  const columns = DELIVER_COLUMNS.map((name) => body[name]);
  const rows = Array.isArray(columns[0]) ? columns[0].length : -1;
  if (!columns.every((c) => Array.isArray(c) && c.length === rows)) {
    throw new ProtocolError("a DELIVER needs its columns as arrays of one length");
  }
  const [ids, attempts, queues, payloads, priorities, failures, maxAttempts, leaseTimeouts] = columns;
  const broker = String(body.broker ?? "");
  return ids.map((/** @type {number | bigint} */ id, /** @type {number} */ i) => ({
    id: int(id),
    queue: String(queues[i]),
    attempt: Number(attempts[i]),
    payload: payloads[i] instanceof Uint8Array ? payloads[i] : new Uint8Array(),
    priority: Number(priorities[i]),
    failures: Number(failures[i]),
    max_attempts: Number(maxAttempts[i]),
    lease_timeout: Number(leaseTimeouts[i]),
    broker,
  }));
}

/**
 * A settling request's body from its rows (§6.3): `[id, attempt]` for HEARTBEAT and RELEASE,
 * `[id, attempt, result, elapsed?]` for COMPLETE, `[id, attempt, error, retry, elapsed?]` for FAIL,
 * sent as columns. Results that are all nil are left out; a retry the same for every row is sent
 * once; `elapsed` (seconds the run took) goes as a column when any row has it.
 * @param {Settling} command
 * @param {unknown[][]} rows
 * @returns {Record<string, unknown>}
 */
export function reportBody(command, rows) {
  /** @type {Record<string, unknown>} */
  const body = { id: rows.map((r) => r[0]), attempt: rows.map((r) => r[1]) };
  if (command === "COMPLETE" && rows.some((r) => r[2] !== null && r[2] !== undefined)) {
    body.result = rows.map((r) => r[2] ?? null);
  } else if (command === "FAIL") {
    body.error = rows.map((r) => r[2]);
    const retry = rows.map((r) => r[3] !== false);
    body.retry = retry.every((r) => r === retry[0]) ? retry[0] : retry;
  }
  const at = command === "COMPLETE" ? 3 : command === "FAIL" ? 4 : -1;
  if (at > 0 && rows.some((r) => typeof r[at] === "number")) {
    body.elapsed = rows.map((r) => (typeof r[at] === "number" ? r[at] : null));
  }
  return body;
}

/**
 * Check a queue name against §6.1 before polling it (the broker answers invalid_task otherwise).
 * @param {string} name
 */
export function checkQueueName(name) {
  if (typeof name !== "string" || !QUEUE_NAME.test(name)) {
    throw new TypeError(`invalid queue name ${JSON.stringify(name)}: 1-64 of A-Z a-z 0-9 _ . : - starting with a letter or digit`);
  }
}

/**
 * A result as msgpack bin (or nil): Uint8Array/Buffer as is, a string as UTF-8, null/undefined
 * as nil. Anything else is a handler bug.
 * @param {unknown} value
 * @returns {Uint8Array | null}
 */
export function resultBytes(value) {
  if (value === null || value === undefined) return null;
  if (value instanceof Uint8Array) return value;
  if (typeof value === "string") return new TextEncoder().encode(value);
  throw new TypeError(`handler returned ${typeof value}, not Uint8Array, string or null`);
}

/** Text safe to store: PostgreSQL refuses NUL (§4), the broker keeps 8,192 characters (§8). */
export function errorText(/** @type {string} */ message) {
  const chars = Array.from(message.replaceAll("\0", "\\0"));
  return chars.length > 8192 ? chars.slice(0, 8192).join("") : chars.join("");
}
