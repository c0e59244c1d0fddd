// Against a real Conduit broker and PostgreSQL: raw exchanges, then the Worker end to end.
import assert from "node:assert/strict";
import { hostname } from "node:os";
import { after, before, test } from "node:test";

import { PermanentError, Worker, logfmt } from "../src/index.js";
import { RawClient, brokerMissing, conduit, database, startBroker } from "./support.js";

const missing = brokerMissing();
const skip = missing && process.env.CONDUIT_REQUIRE_NODE !== "1" ? missing : false;
const utf8 = (/** @type {string} */ s) => Buffer.from(s);

/** @type {ReturnType<typeof database>} */ let db;
/** @type {Awaited<ReturnType<typeof startBroker>>} */ let broker;
/** @type {RawClient} */ let client;

before(async () => {
  if (skip) return;
  db = database();
  broker = await startBroker(db.args, "node-test");
  client = new RawClient(broker.endpoint);
});

after(async () => {
  client?.close();
  if (broker) assert.equal(await broker.stop(), 0);
  db?.cleanup();
});

test("raw exchanges: PING, a wrong version, a submit and its result", { skip }, async () => {
  const pong = await client.request("PING", {});
  assert.equal(pong.command, "PONG");
  assert.equal(pong.body.broker, "node-test");
  const wrong = await client.request("PING", {}, "conduit/3");
  assert.deepEqual([wrong.protocol, wrong.command, wrong.body.code, wrong.body.rid], ["conduit/2", "ERROR", "bad_version", null]);
  // an old peer is answered in its own version, with its rid, and told both versions
  const old = await client.request("POLL", { worker: "w", queues: ["raw"] }, "conduit/1");
  assert.deepEqual([old.protocol, old.command, old.body.code, old.body.rid], ["conduit/1", "ERROR", "bad_version", client.rid - 1]);
  assert.equal(old.body.message, "this broker speaks conduit/2; the request was conduit/1");
  const bad = await client.request("POLL", { worker: "w", queues: ["no spaces"] });
  assert.deepEqual([bad.command, bad.body.code], ["ERROR", "invalid_task"]);
  const [id] = await client.submit("raw", [utf8("x")], { idempotency_key: "once" });
  const again = await client.request("SUBMIT", { queue: "raw", payload: [utf8("y")], idempotency_key: "once" });
  assert.deepEqual(again.body, { rid: again.body.rid, ids: [id], created: [false] });
  const [row] = await client.lookup([id]);
  assert.deepEqual([row.state, row.attempt], ["pending", 0]);
});

test("the Worker runs handlers concurrently, completes, retries and fails for good", { skip }, async () => {
  const worker = new Worker({ endpoints: broker.endpoint, concurrency: 8, pollTimeout: 1, heartbeatInterval: 0.5, log: logfmt("test", "error") });
  let running = 0;
  let most = 0;
  worker
    .handle("upper", async (task) => {
      running++;
      most = Math.max(most, running);
      await new Promise((r) => setTimeout(r, 20));
      running--;
      return task.payload.toString().toUpperCase();
    })
    .handle("retry", (task) => {
      if (task.failures < 2) throw new Error(`try ${task.attempt}`);
      return null;
    })
    .handle("never", () => {
      throw new PermanentError("no");
    });
  const done = worker.run();
  const ids = await client.submit("upper", Array.from({ length: 100 }, (_, i) => utf8(`t${i}`)));
  const [retry] = await client.submit("retry", [utf8("")], { backoff_base: 0.01 });
  const [never] = await client.submit("never", [utf8("")]);
  const rows = await client.results(ids);
  assert.deepEqual(rows.map((r) => Buffer.from(r.result).toString()), ids.map((_, i) => `T${i}`));
  assert.ok(most > 1 && most <= 8, `${most} handlers ran at once`);
  // its polls say who it is: the broker shows host, pid and concurrency in WORKERS (§6.5a)
  const { workers } = JSON.parse(conduit(["workers", "--connect", broker.endpoint, "--json"]));
  const seen = workers.find((/** @type {{worker: string}} */ w) => w.worker === worker.workerId);
  assert.ok(seen, `the broker knows ${worker.workerId}`);
  assert.deepEqual([seen.host, seen.pid, seen.concurrency], [hostname(), process.pid, 8]);
  const [r, n] = await client.results([retry, never]);
  assert.deepEqual([r.state, r.attempt, r.result], ["completed", 3, null]);
  assert.deepEqual([n.state, n.error], ["dead", "PermanentError: no"]);
  await worker.stop();
  await done;
});

test("a task cancelled while it runs: its handler's signal aborts and its outcome is dropped", { skip }, async () => {
  const worker = new Worker({ endpoints: broker.endpoint, pollTimeout: 1, heartbeatInterval: 0.2, log: logfmt("test", "error") });
  /** @type {(id: unknown) => void} */ let started = () => {};
  const running = new Promise((resolve) => (started = resolve));
  /** @type {unknown} */ let reason = null;
  worker.handle("cancel-me", (task) =>
    new Promise((_, reject) => {
      task.signal.addEventListener("abort", () => reject((reason = task.signal.reason)));
      started(task.id);
    }),
  );
  const done = worker.run();
  const [id] = await client.submit("cancel-me", [utf8("")]);
  assert.equal(await running, id);
  assert.deepEqual((await client.request("CANCEL", { ids: [id] })).body.outcomes, ["ok"]);
  for (let i = 0; i < 100 && reason === null; i++) await new Promise((r) => setTimeout(r, 50));
  assert.match(String(reason), /lease lost: cancelled/); // the next heartbeat said so
  await worker.stop();
  await done;
  const [row] = await client.lookup([id]);
  assert.deepEqual([row.state, row.error], ["cancelled", null]); // no FAIL was sent for it
});
