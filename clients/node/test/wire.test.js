// The pure framing and parsing, checked against the worked example of docs/PROTOCOL.md §13.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ProtocolError, checkQueueName, decode, delivery, encode, errorText, int, resultBytes } from "../src/wire.js";

const hex = (/** @type {string} */ s) => Buffer.from(s.replace(/\s+/g, ""), "hex");
const utf8 = (/** @type {string} */ s) => Buffer.from(s, "utf8");

test("SUBMIT encodes to the bytes of §13.1", () => {
  const frames = encode("SUBMIT", { rid: 7, tasks: [{ queue: "email", payload: utf8("hello") }] });
  assert.deepEqual(Buffer.from(frames[0]), hex("63 6f 6e 64 75 69 74 2f 31"));
  assert.deepEqual(Buffer.from(frames[1]), hex("53 55 42 4d 49 54"));
  assert.deepEqual(
    Buffer.from(frames[2]),
    hex(`82 a3 72 69 64 07 a5 74 61 73 6b 73 91 82 a5 71 75 65 75 65 a5 65 6d 61 69 6c
         a7 70 61 79 6c 6f 61 64 c4 05 68 65 6c 6c 6f`),
  );
});

test("POLL and COMPLETE encode to the bytes of §13.2 and §13.3", () => {
  const poll = encode("POLL", { rid: 8, worker: "w1", queues: ["email"], max: 1, timeout: 10 });
  assert.deepEqual(
    Buffer.from(poll[2]),
    hex(`85 a3 72 69 64 08 a6 77 6f 72 6b 65 72 a2 77 31 a6 71 75 65 75 65 73 91 a5 65 6d 61 69 6c
         a3 6d 61 78 01 a7 74 69 6d 65 6f 75 74 0a`),
  );
  const complete = encode("COMPLETE", { rid: 9, tasks: [[5003, 1, utf8("sent")]] });
  assert.deepEqual(Buffer.from(complete[2]), hex("82 a3 72 69 64 09 a5 74 61 73 6b 73 91 93 cd 13 8b 01 c4 04 73 65 6e 74"));
});

test("the DELIVER of §13.2 decodes to a delivery", () => {
  const body = hex(`82 a3 72 69 64 08 a5 74 61 73 6b 73 91 89 a2 69 64 cd 13 8b a5 71 75 65 75 65
    a5 65 6d 61 69 6c a7 61 74 74 65 6d 70 74 01 a7 70 61 79 6c 6f 61 64 c4 05 68 65 6c 6c 6f
    a8 70 72 69 6f 72 69 74 79 00 a8 66 61 69 6c 75 72 65 73 00 ac 6d 61 78 5f 61 74 74 65 6d 70 74 73 05
    ad 6c 65 61 73 65 5f 74 69 6d 65 6f 75 74 cb 40 3e 00 00 00 00 00 00
    a6 62 72 6f 6b 65 72 aa 64 6f 63 2d 62 72 6f 6b 65 72`);
  const msg = decode([utf8("conduit/1"), utf8("DELIVER"), body]);
  assert.equal(msg.command, "DELIVER");
  assert.equal(msg.body.rid, 8);
  const task = delivery(msg.body.tasks[0]);
  assert.deepEqual({ ...task, payload: Buffer.from(task.payload).toString() }, {
    id: 5003, queue: "email", attempt: 1, payload: "hello", priority: 0, failures: 0, max_attempts: 5,
    lease_timeout: 30, broker: "doc-broker",
  });
});

test("the ACK of §13.3 decodes", () => {
  const msg = decode([utf8("conduit/1"), utf8("ACK"), hex("82 a3 72 69 64 09 a8 6f 75 74 63 6f 6d 65 73 91 a2 6f 6b")]);
  assert.deepEqual(msg, { command: "ACK", body: { rid: 9, outcomes: ["ok"] } });
});

test("64-bit ids survive: uint 64 decodes to a number when exact, else a BigInt, and encodes back", () => {
  const small = decode([utf8("conduit/1"), utf8("ACK"), hex("81 a3 72 69 64 cf 00 00 00 00 00 00 00 05")]);
  assert.equal(int(small.body.rid), 5);
  const big = 2n ** 62n + 1n;
  const frames = encode("HEARTBEAT", { rid: 1, tasks: [[big, 3]] });
  assert.deepEqual(Buffer.from(frames[2]).subarray(-10), hex("cf 40 00 00 00 00 00 00 01 03"));
  const back = decode([utf8("conduit/1"), utf8("ACK"), frames[2]]);
  assert.equal(int(back.body.tasks[0][0]), big);
});

test("bad replies are ProtocolErrors, never crashes", () => {
  const bad = [
    [utf8("conduit/1"), utf8("ACK")],
    [utf8("conduit/2"), utf8("ACK"), hex("80")],
    [utf8("conduit/1"), utf8("SUBMIT"), hex("80")],
    [utf8("conduit/1"), utf8("ACK"), hex("c1")],
    [utf8("conduit/1"), utf8("ACK"), hex("91 01")],
  ];
  for (const frames of bad) assert.throws(() => decode(frames), ProtocolError);
  assert.equal(decode([utf8("conduit/1"), utf8("GOSSIP"), hex("80")], ["GOSSIP"]).command, "GOSSIP");
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
