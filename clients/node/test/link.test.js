// Liveness of one broker link (docs/PROTOCOL.md §11), against a ROUTER on loopback that plays
// the broker: it answers or stays silent as each test needs, and can go away.
import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { Router } from "zeromq";

import { Link } from "../src/link.js";
import { decode, encode } from "../src/wire.js";

const INTERVAL = 200; // ms: the link's liveness interval in these tests

/**
 * A ROUTER the link talks to; it records what it receives and answers PINGs if `pong`. Closed
 * when the test ends, whatever happens (an open socket would keep the test process alive).
 * @param {import("node:test").TestContext} t
 */
async function peer(t, { pong = false } = {}) {
  const router = new Router({ linger: 0 });
  t.after(() => router.close());
  await router.bind("tcp://127.0.0.1:*");
  /** @type {{command: string, rid: unknown, at: number}[]} */
  const received = [];
  (async () => {
    for await (const [id, ...frames] of router) {
      const { command, body } = decode(frames, ["PING", "POLL"]);
      received.push({ command, rid: body.rid, at: performance.now() });
      if (pong && command === "PING") await router.send([id, ...encode("PONG", { rid: body.rid, broker: "b", pub: null })]);
    }
  })().catch(() => {}); // ends when the router is closed
  return { router, endpoint: router.lastEndpoint, received };
}

/**
 * A link whose alarms are counted, connected once `peer` has heard a first request from it.
 * @param {import("node:test").TestContext} t @param {Awaited<ReturnType<typeof peer>>} broker
 */
async function connected(t, broker) {
  const alarms = { count: 0 };
  const link = new Link(broker.endpoint, INTERVAL, () => alarms.count++);
  t.after(() => link.close());
  link.send(encode("POLL", { rid: 1 }), (err) => assert.fail(`send failed: ${err}`));
  while (broker.received.length === 0) await sleep(5);
  return { link, alarms };
}

/** Call gone() every 10 ms until it gives a reason or `ms` pass; [reason, when]. */
async function watch(/** @type {Link} */ link, ms) {
  const end = performance.now() + ms;
  while (performance.now() < end) {
    const why = link.gone(performance.now());
    if (why) return [why, performance.now()];
    await sleep(10);
  }
  return [null, performance.now()];
}

test("a broker waited on is PINGed after one interval of silence and given up after two", async (t) => {
  const broker = await peer(t);
  const { link } = await connected(t, broker);
  const began = performance.now();
  link.expect(began);
  const [why, at] = await watch(link, 5 * INTERVAL);
  assert.match(String(why), /^silent for 0\.[45]s$/);
  assert.ok(at - began >= 2 * INTERVAL && at - began < 3 * INTERVAL, `gone after ${at - began} ms`);
  const pings = broker.received.filter((m) => m.command === "PING");
  assert.equal(pings.length, 1); // at most one an interval
  assert.ok(pings[0].at - began >= INTERVAL - 5, `PINGed after ${pings[0].at - began} ms`);
  assert.equal(typeof pings[0].rid, "bigint"); // from 2^62 up, apart from request rids (§6.6)
  assert.ok(/** @type {bigint} */ (pings[0].rid) >= 2n ** 62n);
});

test("a broker that answers its PINGs stays; silence means nothing while nothing is awaited", async (t) => {
  const broker = await peer(t, { pong: true });
  const { link } = await connected(t, broker);
  (async () => {
    for await (const _ of link.sock) link.heard(performance.now()); // a PONG counts as heard
  })().catch(() => {});
  link.expect(performance.now());
  assert.deepEqual((await watch(link, 6 * INTERVAL))[0], null);
  const pings = broker.received.filter((m) => m.command === "PING").length;
  assert.ok(pings >= 3 && pings <= 6, `${pings} PINGs in 6 intervals`);
  link.idle();
  broker.router.close(); // gone, but we wait on nothing: nothing is lost, nothing to say
  assert.deepEqual((await watch(link, 3 * INTERVAL))[0], null);
});

test("a connection that drops during a wait is gone at once; one dropped before it lost nothing", async (t) => {
  const during = await peer(t);
  const a = await connected(t, during);
  a.link.expect(performance.now());
  const dropped = performance.now();
  during.router.close();
  while (a.alarms.count === 0 && performance.now() - dropped < 2000) await sleep(5);
  assert.ok(a.alarms.count > 0, "no alarm for the drop");
  assert.equal(a.link.gone(performance.now()), "its connection dropped");
  assert.ok(performance.now() - dropped < INTERVAL, "the drop took an interval to be seen");

  const before = await peer(t);
  const b = await connected(t, before);
  before.router.close();
  await sleep(100); // the drop is seen while nothing is awaited
  assert.equal(b.alarms.count, 0);
  const began = performance.now();
  b.link.expect(began); // a new wait: the old drop does not count...
  assert.equal(b.link.gone(began), null);
  // ...but with no connection the first PING cannot go, and that is enough
  const [why, at] = await watch(b.link, 3 * INTERVAL);
  assert.equal(why, "no connection for a PING");
  assert.ok(at - began < 2 * INTERVAL, `found after ${at - began} ms`);
});
