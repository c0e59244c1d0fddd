// Real Conduit brokers for the Node tests: a fresh schema on CONDUIT_TEST_DSN, or else an
// embedded PostgreSQL in a temporary folder, and `python -m conduit broker` processes.
// The Python comes from CONDUIT_PYTHON, else the repository's .venv, else python3.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";

import { Dealer } from "zeromq";

import { PROTOCOL, decode, encode } from "../src/wire.js";

const REPO = resolve(import.meta.dirname, "..", "..", "..");
export const PYTHON =
  process.env.CONDUIT_PYTHON ?? (existsSync(join(REPO, ".venv", "bin", "python")) ? join(REPO, ".venv", "bin", "python") : "python3");

/** Why no broker can run here, or null. */
export function brokerMissing() {
  const probe = spawnSync(PYTHON, ["-c", "import conduit"], { cwd: REPO, encoding: "utf8" });
  return probe.status === 0 ? null : `${PYTHON} cannot import conduit: ${probe.stderr || probe.error}`;
}

/** The `conduit` command's output, or an error with its stderr. @param {string[]} args */
export function conduit(args) {
  const run = spawnSync(PYTHON, ["-m", "conduit", ...args], { cwd: REPO, encoding: "utf8" });
  if (run.status !== 0) throw new Error(`conduit ${args.join(" ")} failed: ${run.stderr}`);
  return run.stdout;
}

/** A database of our own: {args for conduit commands, cleanup()}. */
export function database() {
  const schema = `node_${process.pid}_${Date.now() % 1e8}`;
  if (process.env.CONDUIT_TEST_DSN) {
    const dsn = process.env.CONDUIT_TEST_DSN;
    conduit(["db", "init", "--dsn", dsn, "--schema", schema]);
    const drop = `import psycopg; psycopg.connect(${JSON.stringify(dsn)}, autocommit=True).execute('DROP SCHEMA "${schema}" CASCADE')`;
    return { args: ["--dsn", dsn, "--schema", schema], cleanup: () => spawnSync(PYTHON, ["-c", drop]) };
  }
  const folder = mkdtempSync(join(tmpdir(), "conduit-node-"));
  const dataDir = join(folder, "pgdata");
  conduit(["db", "init", "--data-dir", dataDir, "--schema", schema]);
  return {
    args: ["--data-dir", dataDir, "--schema", schema],
    cleanup: () => {
      spawnSync(PYTHON, ["-m", "conduit", "db", "stop", "--data-dir", dataDir], { cwd: REPO });
      rmSync(folder, { recursive: true, force: true });
    },
  };
}

/**
 * Start a broker; resolves once it printed its endpoint(s).
 * @param {string[]} dbArgs @param {string} id @param {boolean} pub @param {string[]} extra more flags
 */
export async function startBroker(dbArgs, id, pub = false, extra = []) {
  const args = ["-m", "conduit", "broker", ...dbArgs, "--bind", "tcp://127.0.0.1:*", "--broker-id", id, "--lease-term", "3", ...extra];
  if (pub) args.push("--pub", "tcp://127.0.0.1:*");
  const proc = spawn(PYTHON, args, { cwd: REPO, stdio: ["ignore", "pipe", "ignore"] });
  const lines = createInterface({ input: proc.stdout })[Symbol.asyncIterator]();
  const endpoint = (await lines.next()).value;
  const gossip = pub ? (await lines.next()).value : null;
  if (!endpoint) throw new Error("broker did not start");
  return { proc, endpoint, gossip, stop: () => new Promise((done) => (proc.exitCode !== null ? done(proc.exitCode) : (proc.once("exit", done), proc.kill("SIGTERM")))) };
}

/** A minimal request/reply client over a raw DEALER, one request at a time. */
export class RawClient {
  /** @param {string} endpoint @param {object} curve CURVE socket options (src/curve.js) */
  constructor(endpoint, curve = {}) {
    this.sock = new Dealer({ linger: 0, immediate: true, ...curve });
    this.sock.connect(endpoint);
    this.rid = 100;
  }

  /**
   * One request; its reply. Sent as `protocol` (a reply in another version is read all the same).
   * @param {string} command @param {Record<string, unknown>} body @param {string} protocol
   */
  async request(command, body, protocol = PROTOCOL) {
    const rid = this.rid++;
    const frames = encode(command, { ...body, rid });
    frames[0] = Buffer.from(protocol);
    await this.sock.send(frames);
    for (;;) {
      const [version, ...rest] = await this.sock.receive();
      const reply = decode([Buffer.from(PROTOCOL), ...rest]);
      if (reply.body.rid === rid || reply.body.rid === null) return { ...reply, protocol: version.toString() };
    }
  }

  /**
   * Submit one task per payload to `queue` (SUBMIT's columns, §6.1); their ids.
   * @param {string} queue @param {Uint8Array[]} payloads @param {Record<string, unknown>} options
   */
  async submit(queue, payloads, options = {}) {
    const reply = await this.request("SUBMIT", { queue, payload: payloads, ...options });
    if (reply.command !== "SUBMITTED") throw new Error(`submit refused: ${JSON.stringify(reply.body)}`);
    return reply.body.ids;
  }

  /** RESULTS as one row per task. @param {unknown[]} ids */
  async lookup(ids) {
    const { body } = await this.request("RESULT", { ids });
    return body.id.map((/** @type {unknown} */ id, /** @type {number} */ i) => ({
      id, state: body.state[i], attempt: body.attempt[i], result: body.result[i], error: body.error[i],
    }));
  }

  /** Wait until every task is final; their RESULTS rows. @param {unknown[]} ids */
  async results(ids, timeoutMs = 30_000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const rows = await this.lookup(ids);
      if (rows.every((r) => ["completed", "dead", "cancelled"].includes(r.state))) return rows;
      if (Date.now() > deadline) throw new Error(`tasks not final: ${JSON.stringify(rows.map((r) => r.state))}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  close() {
    this.sock.close();
  }
}
