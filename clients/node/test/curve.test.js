// CURVE: key files read as the Python side writes them, and the Worker against a secure broker.
import assert from "node:assert/strict";
import { chmodSync, copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { curveOptions } from "../src/curve.js";
import { Worker, logfmt } from "../src/index.js";
import { RawClient, brokerMissing, conduit, database, startBroker } from "./support.js";

const missing = brokerMissing();
const skip = missing && process.env.CONDUIT_REQUIRE_NODE !== "1" ? missing : false;
const keys = mkdtempSync(join(tmpdir(), "conduit-node-keys-"));
const allow = join(keys, "allow");
const key = (/** @type {string} */ name, /** @type {boolean} */ allowed) => {
  conduit(["keys", "new", name, "--dir", keys]);
  if (allowed) copyFileSync(join(keys, `${name}.key`), join(allow, `${name}.key`));
  return { secret: join(keys, `${name}.key_secret`), server: join(keys, "broker.key") };
};

/** @type {ReturnType<typeof database>} */ let db;
/** @type {Awaited<ReturnType<typeof startBroker>>} */ let broker;
/** @type {RawClient} */ let client;

before(async () => {
  if (skip) return;
  mkdirSync(allow);
  conduit(["keys", "new", "broker", "--dir", keys]);
  const app = curveOptions(key("app", true));
  db = database();
  broker = await startBroker(db.args, "node-curve", true, ["--curve-secret", join(keys, "broker.key_secret"), "--curve-allow", allow]);
  client = new RawClient(broker.endpoint, app);
});

after(async () => {
  client?.close();
  if (broker) assert.equal(await broker.stop(), 0);
  db?.cleanup();
  rmSync(keys, { recursive: true, force: true });
});

test("bad key files are refused at the worker's start, with the reason", { skip }, () => {
  const files = key("bad", false);
  const worker = (/** @type {object} */ more) => new Worker({ endpoints: "tcp://127.0.0.1:1", ...more });
  assert.throws(() => worker({ curveSecret: files.secret }), /CURVE needs both/);
  assert.throws(() => worker({ curveSecret: join(keys, "none"), curveServer: files.server }), /cannot read secret key file/);
  assert.throws(() => worker({ curveSecret: files.secret, curveServer: join(keys, "broker.key_secret") }), /holds a secret key/);
  chmodSync(files.secret, 0o644);
  assert.throws(() => worker({ curveSecret: files.secret, curveServer: files.server }), /chmod 600/);
  writeFileSync(join(keys, "junk.key"), 'public-key = "short"\n');
  assert.throws(() => curveOptions({ secret: join(keys, "app.key_secret"), server: join(keys, "junk.key") }), /not 40 characters of Z85/);
  assert.deepEqual(curveOptions({}, {}), {});
});

test("an allowed worker runs tasks through CURVE; one not allowed gets nothing until its key is added", { skip }, async () => {
  const quiet = logfmt("test", "error");
  const late = key("late", false);
  const allowed = new Worker({ endpoints: broker.endpoint, pollTimeout: 1, log: quiet, curveSecret: key("node", true).secret, curveServer: late.server });
  allowed.handle("secured", (task) => task.payload.toString().toUpperCase());
  let running = allowed.run();
  const [first] = await client.submit("secured", [Buffer.from("hello")]);
  const [done] = await client.results([first]);
  assert.equal(Buffer.from(done.result).toString(), "HELLO");
  await allowed.stop();
  await running;

  const refused = new Worker({ endpoints: broker.endpoint, gossip: [broker.gossip ?? ""], pollTimeout: 1, log: quiet, curveSecret: late.secret, curveServer: late.server });
  refused.handle("secured", (task) => task.payload.toString());
  running = refused.run();
  const [second] = await client.submit("secured", [Buffer.from("waits")]);
  await new Promise((r) => setTimeout(r, 2000));
  assert.equal((await client.lookup([second]))[0].state, "pending");
  copyFileSync(join(keys, "late.key"), join(allow, "late.key")); // no restart on either side
  const [later] = await client.results([second]);
  assert.equal(Buffer.from(later.result).toString(), "waits");
  for (let i = 0; i < 40 && !refused.loop.table.brokers.has("node-curve"); i++) await new Promise((r) => setTimeout(r, 50));
  assert.ok(refused.loop.table.brokers.has("node-curve"), "gossip heard over CURVE");
  await refused.stop();
  await running;
});
