// The pure framing and parsing, checked against the worked example of docs/PROTOCOL.md §13 (bytes
// captured from a real broker).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  PROTOCOL,
  ProtocolError,
  VersionError,
  checkQueueName,
  decode,
  deliveries,
  encode,
  errorText,
  int,
  reportBody,
  resultBytes,
} from "../src/wire.js";

const hex = (/** @type {string} */ s) => Buffer.from(s.replace(/\s+/g, ""), "hex");
const utf8 = (/** @type {string} */ s) => Buffer.from(s, "utf8");
const reply = (/** @type {string} */ command, /** @type {Buffer} */ body) => decode([utf8(PROTOCOL), utf8(command), body]);

test("SUBMIT encodes to the bytes of §13.1: a scalar for every row, an array per row", () => {
  const body = { rid: 7, queue: "email", payload: [utf8("hello"), utf8("hi")], max_attempts: 3, delay: [0, 60] };
  const frames = encode("SUBMIT", body);
  assert.deepEqual(Buffer.from(frames[0]), hex("63 6f 6e 64 75 69 74 2f 32"));
  assert.deepEqual(Buffer.from(frames[1]), hex("53 55 42 4d 49 54"));
  assert.deepEqual(
    Buffer.from(frames[2]),
    hex(`85 a3 72 69 64 07 a5 71 75 65 75 65 a5 65 6d 61 69 6c a7 70 61 79 6c 6f 61 64 92 c4 05 68 65
         6c 6c 6f c4 02 68 69 ac 6d 61 78 5f 61 74 74 65 6d 70 74 73 03 a5 64 65 6c 61 79 92 00 3c`),
  );
  const submitted = reply("SUBMITTED", hex("83 a3 72 69 64 07 a3 69 64 73 92 cd 13 8b cd 13 8c a7 63 72 65 61 74 65 64 92 c3 c3"));
  assert.deepEqual(submitted.body, { rid: 7, ids: [5003, 5004], created: [true, true] });
});

test("POLL and COMPLETE encode to the bytes of §13.2 and §13.3", () => {
  const poll = encode("POLL", { rid: 8, worker: "w1", queues: ["email"], max: 2, timeout: 10 });
  assert.deepEqual(
    Buffer.from(poll[2]),
    hex(`85 a3 72 69 64 08 a6 77 6f 72 6b 65 72 a2 77 31 a6 71 75 65 75 65 73 91 a5 65 6d 61 69 6c a3
         6d 61 78 02 a7 74 69 6d 65 6f 75 74 0a`),
  );
  const complete = encode("COMPLETE", { rid: 9, ...reportBody("COMPLETE", [[5003, 1, utf8("sent")]]) });
  assert.deepEqual(
    Buffer.from(complete[2]),
    hex("84 a3 72 69 64 09 a2 69 64 91 cd 13 8b a7 61 74 74 65 6d 70 74 91 01 a6 72 65 73 75 6c 74 91 c4 04 73 65 6e 74"),
  );
});

test("the DELIVER of §13.2 decodes, column by column, to deliveries", () => {
  const body = hex(`8a a3 72 69 64 08 a6 62 72 6f 6b 65 72 aa 64 6f 63 2d 62 72 6f 6b 65 72 a2 69 64 91 cd 13 8b
    a7 61 74 74 65 6d 70 74 91 01 a5 71 75 65 75 65 91 a5 65 6d 61 69 6c a7 70 61 79 6c 6f 61 64
    91 c4 05 68 65 6c 6c 6f a8 70 72 69 6f 72 69 74 79 91 00 a8 66 61 69 6c 75 72 65 73 91 00 ac
    6d 61 78 5f 61 74 74 65 6d 70 74 73 91 03 ad 6c 65 61 73 65 5f 74 69 6d 65 6f 75 74 91 cb 40
    3e 00 00 00 00 00 00`);
  const msg = reply("DELIVER", body);
  assert.equal(msg.body.rid, 8);
  const [task, ...more] = deliveries(msg.body);
  assert.deepEqual(more, []);
  assert.deepEqual({ ...task, payload: Buffer.from(task.payload).toString() }, {
    id: 5003, queue: "email", attempt: 1, payload: "hello", priority: 0, failures: 0, max_attempts: 3,
    lease_timeout: 30, broker: "doc-broker",
  });
  const empty = { rid: 9, broker: "b", id: [], attempt: [], queue: [], payload: [], priority: [], failures: [], max_attempts: [], lease_timeout: [] };
  assert.deepEqual(deliveries(empty), []);
  for (const broken of [{ ...empty, id: [1] }, { ...empty, payload: undefined }, { ...empty, queue: "q" }]) {
    assert.throws(() => deliveries(broken), ProtocolError);
  }
});

test("the ACK and RESULTS of §13.3 and §13.4 decode", () => {
  assert.deepEqual(reply("ACK", hex("82 a3 72 69 64 09 a8 6f 75 74 63 6f 6d 65 73 91 a2 6f 6b")).body, { rid: 9, outcomes: ["ok"] });
  const results = reply("RESULTS", hex(`86 a3 72 69 64 0b a2 69 64 92 cd 13 8b cd 13 8c a5 73 74 61 74 65 92 a9 63 6f 6d 70 6c 65 74
    65 64 a7 70 65 6e 64 69 6e 67 a7 61 74 74 65 6d 70 74 92 01 00 a6 72 65 73 75 6c 74 92 c4 04
    73 65 6e 74 c0 a5 65 72 72 6f 72 92 c0 c0`)).body;
  assert.deepEqual([results.id, results.state, results.attempt, results.error], [[5003, 5004], ["completed", "pending"], [1, 0], [null, null]]);
  assert.deepEqual([Buffer.from(results.result[0]).toString(), results.result[1]], ["sent", null]);
});

test("reports go as columns: no results when all are nil, one retry when all agree", () => {
  assert.deepEqual(reportBody("RELEASE", [[1, 2], [3, 4]]), { id: [1, 3], attempt: [2, 4] });
  assert.deepEqual(reportBody("COMPLETE", [[1, 2, null], [3, 4, null]]), { id: [1, 3], attempt: [2, 4] });
  assert.deepEqual(reportBody("COMPLETE", [[1, 2, null], [3, 4, utf8("r")]]).result, [null, utf8("r")]);
  assert.deepEqual(reportBody("FAIL", [[1, 2, "e", true], [3, 4, "f", true]]), { id: [1, 3], attempt: [2, 4], error: ["e", "f"], retry: true });
  assert.deepEqual(reportBody("FAIL", [[1, 2, "e", true], [3, 4, "f", false]]).retry, [true, false]);
  assert.deepEqual(reportBody("COMPLETE", [[1, 2, null, 0.5], [3, 4, null, 1]]).elapsed, [0.5, 1]);
  assert.deepEqual(reportBody("FAIL", [[1, 2, "e", true, 0.25], [3, 4, "f", true]]).elapsed, [0.25, null]);
  assert.equal(reportBody("COMPLETE", [[1, 2, null]]).elapsed, undefined);
});

test("64-bit ids survive: uint 64 decodes to a number when exact, else a BigInt, and encodes back", () => {
  const small = reply("ACK", hex("81 a3 72 69 64 cf 00 00 00 00 00 00 00 05"));
  assert.equal(int(small.body.rid), 5);
  const big = 2n ** 62n + 1n;
  const frames = encode("HEARTBEAT", { rid: 1, ...reportBody("HEARTBEAT", [[big, 3]]) });
  assert.ok(Buffer.from(frames[2]).includes(hex("a2 69 64 91 cf 40 00 00 00 00 00 00 01"))); // id: [uint 64]
  const back = reply("ACK", frames[2]);
  assert.equal(int(back.body.id[0]), big);
});

test("a conduit/1 broker's refusal (§13.5) is a VersionError naming both versions", () => {
  const old = [utf8("conduit/1"), utf8("ERROR"), hex(`83 a3 72 69 64 c0 a4 63 6f 64 65 ab 62 61 64 5f 76 65 72 73 69 6f 6e a7 6d 65 73 73 61 67 65
    d9 3e 75 6e 73 75 70 70 6f 72 74 65 64 20 70 72 6f 74 6f 63 6f 6c 20 27 63 6f 6e 64 75 69 74
    2f 32 27 3b 20 74 68 69 73 20 62 72 6f 6b 65 72 20 73 70 65 61 6b 73 20 63 6f 6e 64 75 69 74
    2f 31`)];
  assert.throws(() => decode(old), (err) => err instanceof VersionError && err.message === "the broker speaks conduit/1; this peer speaks conduit/2");
  assert.throws(() => decode([utf8("conduit/9"), utf8("ACK"), hex("80")]), VersionError);
});

test("bad replies are ProtocolErrors, never crashes", () => {
  const bad = [
    [utf8("conduit/2"), utf8("ACK")],
    [utf8("conduit/1"), utf8("ACK"), hex("80")],
    [utf8("conduit/2"), utf8("SUBMIT"), hex("80")],
    [utf8("conduit/2"), utf8("ACK"), hex("c1")],
    [utf8("conduit/2"), utf8("ACK"), hex("91 01")],
  ];
  for (const frames of bad) assert.throws(() => decode(frames), ProtocolError);
  assert.equal(decode([utf8("conduit/2"), utf8("GOSSIP"), hex("80")], ["GOSSIP"]).command, "GOSSIP");
});

test("results, errors and queue names follow the limits", () => {
  assert.equal(resultBytes(null), null);
  assert.equal(resultBytes(undefined), null);
  assert.deepEqual(resultBytes("é"), new Uint8Array([0xc3, 0xa9]));
  assert.throws(() => resultBytes(42), TypeError);
  assert.equal(errorText("a\0b"), "a\\0b");
  assert.equal(Array.from(errorText("€".repeat(9000))).length, 8192);
  checkQueueName("emails.v2:high-1");
  for (const bad of ["", "-x", "has space", "x".repeat(65), "ü"]) assert.throws(() => checkQueueName(bad), TypeError);
});
