// The Worker's liveness (docs/PROTOCOL.md §11) against real brokers: a paused broker is left after
// two liveness intervals of silence, a stopping one at its first `shutting_down`. The conformance
// scenarios (tests/conformance) time the same against both workers, with the default interval.
// And where it goes: a worker given one broker finds the others (PONG's `peers`, §6.6).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { Worker } from "../src/index.js";
import { RawClient, brokerMissing, database, startBroker } from "./support.js";

const missing = brokerMissing();
const skip = missing && process.env.CONDUIT_REQUIRE_NODE !== "1" ? missing : false;

/** @type {ReturnType<typeof database>} */ let db;
before(() => {
  if (!skip) db = database();
});
after(() => db?.cleanup());

/**
 * Two brokers with gossip, stopped when the test ends (after hooks run in the order they were
 * added: brokers first, so a worker's waiting poll is answered and its stop need not wait).
 * @param {import("node:test").TestContext} t @param {string} name
 */
async function twoBrokers(t, name) {
  const brokers = [await startBroker(db.args, `${name}-1`, true), await startBroker(db.args, `${name}-2`, true)];
  t.after(async () => {
    for (const b of brokers) {
      b.proc.kill("SIGCONT");
      await b.stop();
    }
  });
  return brokers;
}

/**
 * A Worker whose log lines are kept, with when they were written; stopped when the test ends.
 * @param {import("node:test").TestContext} t @param {Record<string, unknown>} options
 */
function worker(t, options) {
  /** @type {{event: string, fields: Record<string, unknown>, at: number}[]} */
  const events = [];
  const log = (/** @type {string} */ _level, /** @type {string} */ event, fields = {}) => events.push({ event, fields, at: performance.now() });
  const w = new Worker({ log, ...options, endpoints: /** @type {string[]} */ (options.endpoints) });
  t.after(() => w.stop());
  return { w, events };
}

async function until(/** @type {() => unknown} */ predicate, what, ms = 10_000) {
  const end = performance.now() + ms;
  while (!predicate()) {
    if (performance.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

test("a paused broker is left after two liveness intervals of silence, not at the poll timeout", { skip }, async (t) => {
  const [b1, b2] = await twoBrokers(t, "paused");
  const { w, events } = worker(t, { endpoints: [b1.endpoint, b2.endpoint], pollTimeout: 10, liveness: 0.25 });
  w.handle("where", (task) => task.broker);
  const done = w.run();
  const client = new RawClient(b2.endpoint);
  t.after(() => client.close());
  await client.request("PING", {});
  await sleep(800); // its first poll waits at b1 (10 s): PINGed after each 0.25 s, PONGs keep it
  assert.deepEqual(events.filter((e) => e.event === "broker_gone"), []);
  const paused = performance.now();
  b1.proc.kill("SIGSTOP");
  await until(() => events.some((e) => e.event === "broker_gone"), "the worker to leave b1");
  const gone = /** @type {(typeof events)[0]} */ (events.find((e) => e.event === "broker_gone"));
  assert.equal(gone.fields.endpoint, b1.endpoint);
  assert.match(String(gone.fields.why), /^silent for 0\.[5-9]s$/); // two intervals, not the poll's 15 s
  assert.ok(gone.at - paused < 1000, `left ${gone.at - paused} ms after the pause`);
  const [id] = await client.submit("where", [Buffer.from("")]);
  const [row] = await client.results([id]);
  assert.equal(Buffer.from(row.result).toString(), "paused-2");
  const stopped = w.stop();
  await b2.stop(); // answers the worker's waiting poll at once: the stop need not wait 10 s for it
  await stopped;
  await done; // run() resolves: nothing failed inside the worker
});

test("a stopping broker's shutting_down to a heartbeat moves the worker at once", { skip }, async (t) => {
  const [b1, b2] = await twoBrokers(t, "stopping");
  /** @type {(value?: unknown) => void} */ let started = () => {};
  const running = new Promise((resolve) => (started = resolve));
  /** @type {(value?: unknown) => void} */ let release = () => {};
  const held = new Promise((resolve) => (release = resolve));
  t.after(() => release()); // before the worker's stop, which waits for its handler
  const options = { concurrency: 1, prefetch: 0, pollTimeout: 1, heartbeatInterval: 0.05 };
  const { w, events } = worker(t, { endpoints: [b1.endpoint, b2.endpoint], ...options });
  w.handle("hold", async () => {
    started();
    await held;
    return "held";
  });
  const done = w.run();
  const client = new RawClient(b1.endpoint);
  t.after(() => client.close());
  const [id] = await client.submit("hold", [Buffer.from("")]);
  await running; // no room: it waits on b1 only for its heartbeats' ACKs
  assert.deepEqual(events.filter((e) => e.event === "failover"), []);
  b1.proc.kill("SIGTERM"); // it serves heartbeats until its last commit, then refuses for 0.5 s
  await until(() => events.some((e) => e.event === "failover"), "the worker to leave b1");
  const i = events.findIndex((e) => e.event === "request_refused");
  assert.equal(events[i]?.fields.code, "shutting_down");
  // Moved on that refusal itself, not on missed heartbeats or the drop when b1 exits, which
  // would each have logged why first.
  assert.deepEqual([events[i + 1].event, events[i + 1].fields.endpoint], ["failover", b1.endpoint]);
  release();
  const other = new RawClient(b2.endpoint);
  t.after(() => other.close());
  const [row] = await other.results([id]);
  assert.deepEqual([row.state, row.attempt, Buffer.from(row.result).toString()], ["completed", 1, "held"]);
  await w.stop();
  await done;
});

test("a worker given one broker hears of the others from its PONG and uses them", { skip }, async (t) => {
  const [b1, b2] = await twoBrokers(t, "peers");
  const client = new RawClient(b2.endpoint);
  t.after(() => client.close());
  // b1 started first: it names b2 once it read its peers again, with a lease renewal (1 s)
  const asker = new RawClient(b1.endpoint);
  t.after(() => asker.close());
  const peers = async () => (await asker.request("PING", {})).body.peers ?? [];
  for (let tries = 0; (await peers()).length === 0; tries++) {
    assert.ok(tries < 100, "b1 never named b2");
    await sleep(100);
  }
  const { w } = worker(t, { endpoints: [b1.endpoint], pollTimeout: 0.5 });
  w.handle("where", (task) => task.broker);
  const done = w.run();
  // an idle worker spreads its polls over every broker it hears: b2 delivers to it at last
  for (let tries = 0; ; tries++) {
    const [id] = await client.submit("where", [Buffer.from("")]);
    const [row] = await client.results([id]);
    if (Buffer.from(row.result).toString() === "peers-2") break;
    assert.ok(tries < 100, "the worker never polled b2");
  }
  await b1.stop(); // the only broker it was given
  const [id] = await client.submit("where", [Buffer.from("")]);
  const [row] = await client.results([id]);
  assert.deepEqual([row.state, Buffer.from(row.result).toString()], ["completed", "peers-2"]);
  await w.stop();
  await done;
});
