// A Conduit worker: long-polls brokers, runs async handlers with bounded concurrency, heartbeats
// what it holds, reports outcomes until they are acknowledged, fails over between brokers.
// Written from docs/PROTOCOL.md (§9 worker rules, §11 liveness); section numbers below refer there.

import { hostname } from "node:os";
import { randomBytes } from "node:crypto";

import { curveOptions } from "./curve.js";
import { PermanentError } from "./errors.js";
import { LIVENESS, Link } from "./link.js";
import { logfmt } from "./log.js";
import { Gossip, MeshTable } from "./mesh.js";
import { dispatcher } from "./tasks.js";
import {
  MAX_BATCH,
  ProtocolError,
  VersionError,
  checkQueueName,
  decode,
  deliveries,
  encode,
  errorText,
  reportBody,
  resultBytes,
} from "./wire.js";

const RESEND_AFTER = 5000; // ms without an ACK before a COMPLETE/FAIL/RELEASE is sent again (§9.6)
const MAX_UNACKED = 2; // report messages awaiting their ACK; later outcomes wait and go together
const REFUSED_PAUSE = 100; // ms to wait after an ERROR to a report (busy, unavailable)
const STOP_GRACE = 30_000; // ms a stopping worker keeps resending unacknowledged reports
const TICK = 100; // ms between bookkeeping passes when nothing else happens

export { PermanentError };

/**
 * What a handler receives: one delivery of a task. `attempt` grows with every delivery and a task
 * may run more than once (§9.8), so handlers must be idempotent. `signal` aborts when the worker
 * learns it no longer holds the task (a heartbeat answered stale, finished or cancelled).
 * @typedef {{id: number | bigint, queue: string, attempt: number, payload: Buffer, priority: number,
 *   failures: number, maxAttempts: number, leaseTimeout: number, broker: string, signal: AbortSignal}} Task
 * @typedef {(task: Task) => Promise<Uint8Array | string | null | undefined> | Uint8Array | string | null | undefined} Handler
 * @typedef {"COMPLETE" | "FAIL" | "RELEASE"} Report
 */

/**
 * @typedef {object} WorkerOptions
 * @property {string | string[]} endpoints broker ROUTER endpoints; the first is polled first
 * @property {string[]} [gossip] gossip (PUB) endpoints; brokers also advertise theirs in PONG
 * @property {number} [concurrency] handlers running at once (4)
 * @property {number} [prefetch] tasks held beyond the running ones (= concurrency)
 * @property {number} [pollTimeout] seconds a POLL may wait at the broker (5)
 * @property {number} [heartbeatInterval] seconds between heartbeats, which keep task leases alive (2.5)
 * @property {number} [liveness] seconds of silence from a broker waited on before it is PINGed;
 *   twice this and it is left for another (1)
 * @property {string} [workerId] default: hostname-pid-random
 * @property {string} [curveSecret] this worker's CURVE keypair file, NAME.key_secret (env
 *   CONDUIT_CURVE_SECRET); with curveServer, every socket is a CURVE client (README, Security)
 * @property {string} [curveServer] the brokers' public key file, NAME.key (env CONDUIT_CURVE_SERVER)
 * @property {ReturnType<typeof logfmt>} [log]
 */

export class Worker {
  /** @param {WorkerOptions} options */
  constructor(options) {
    const endpoints = typeof options.endpoints === "string" ? options.endpoints.split(/\s+/).filter(Boolean) : [...options.endpoints];
    if (endpoints.length === 0) throw new TypeError("give at least one broker endpoint");
    this.endpoints = endpoints;
    this.gossipEndpoints = options.gossip ?? [];
    this.concurrency = options.concurrency ?? 4;
    this.prefetch = options.prefetch ?? this.concurrency;
    this.pollTimeout = options.pollTimeout ?? 5;
    this.heartbeatInterval = (options.heartbeatInterval ?? 2.5) * 1000;
    this.liveness = options.liveness === undefined ? LIVENESS : options.liveness * 1000;
    this.workerId = options.workerId ?? `${hostname()}-${process.pid}-${randomBytes(3).toString("hex")}`;
    // Who this worker is, in every POLL: brokers show it in WORKERS (§6.2, §6.5a).
    this.identity = { host: hostname().slice(0, 255) || null, pid: process.pid, concurrency: this.concurrency };
    this.log = options.log ?? logfmt("conduit.worker");
    this.curve = curveOptions({ secret: options.curveSecret, server: options.curveServer });
    /** @type {Map<string, Handler>} */
    this.handlers = new Map();
    /** @type {Map<string, Map<string, (...args: any[]) => unknown>>} tasks by name, per queue */
    this.tasks = new Map();
    this.stopping = false;
    /** @type {Promise<void> | null} */
    this.running = null;
  }

  /**
   * Run `fn` for tasks of `queue`. It returns the result (Uint8Array, string or nothing); it
   * throws to fail the task (retried with backoff), or throws PermanentError to fail it for good.
   * @param {string} queue
   * @param {Handler} fn
   */
  handle(queue, fn) {
    checkQueueName(queue);
    if (this.tasks.has(queue)) throw new TypeError(`queue ${queue} runs tasks by name: give the handler another`);
    this.handlers.set(queue, fn);
    return this;
  }

  /**
   * Run `fn` for calls of the task `name` (docs/PROTOCOL.md §17), on its queue (by default its
   * name, as Python's @task has it). `fn` takes the call's arguments, then its keyword arguments
   * as one object if there are any; it returns the result, sent in the format of the call.
   * `currentTask()` gives the delivery inside it.
   * @param {string} name
   * @param {(...args: any[]) => unknown} fn
   * @param {{queue?: string}} [options]
   */
  task(name, fn, options = {}) {
    const queue = options.queue ?? name;
    checkQueueName(queue);
    let functions = this.tasks.get(queue);
    if (functions === undefined) {
      if (this.handlers.has(queue)) throw new TypeError(`queue ${queue} has a handler: give task ${name} another`);
      functions = new Map();
      this.tasks.set(queue, functions);
      this.handlers.set(queue, dispatcher(queue, functions));
    }
    functions.set(name, fn);
    return this;
  }

  /** Run until stop(): resolves once running tasks finished and every report was acknowledged. */
  run() {
    if (this.handlers.size === 0) throw new Error("register at least one handler before run()");
    this.running ??= new Loop(this).run();
    return this.running;
  }

  /** Stop polling, finish what runs, release what was prefetched, wait for the last ACKs. */
  stop() {
    this.stopping = true;
    this.loop?.kick();
    return this.running ?? Promise.resolve();
  }
}

/** The worker's bookkeeping; everything happens on the event loop, so no locks. */
class Loop {
  /** @param {Worker} worker */
  constructor(worker) {
    this.w = worker;
    worker.loop = this;
    this.log = worker.log;
    this.queues = [...worker.handlers.keys()];
    this.table = new MeshTable(worker.endpoints);
    this.gossip = new Gossip(this.table, this.log, worker.curve);
    for (const endpoint of worker.gossipEndpoints) this.gossip.subscribe(endpoint);
    /** @type {Map<string, Link>} one DEALER per broker used */
    this.links = new Map();
    this.current = worker.endpoints[0]; // where polls, heartbeats and reports go
    this.nextRid = 1;
    /** @type {number | null} */
    this.pollRid = null;
    this.pollAt = this.current;
    this.pollDeadline = 0;
    this.pollHoldUntil = 0;
    this.lastPollEmpty = false;
    /** @type {import("./wire.js").Delivery[]} delivered, not started */
    this.prefetched = [];
    /** @type {Map<string, {task: import("./wire.js").Delivery, abort: AbortController | null, lostBy: Error | null, started: number}>} */
    this.active = new Map();
    /** @type {Set<string>} deliveries a heartbeat told us we no longer hold */
    this.lost = new Set();
    /** @type {Map<number, {command: Report, rows: unknown[][], sent: number, endpoint: string}>} */
    this.unacked = new Map();
    /** @type {Record<Report, unknown[][]>} */
    this.outbox = { COMPLETE: [], FAIL: [], RELEASE: [] };
    this.holdUntil = 0;
    this.nextHeartbeat = 0;
    /** @type {Map<number, unknown[][]>} the last heartbeat's rid and rows, until answered */
    this.heartbeats = new Map();
    this.heartbeatsAt = this.current;
    this.heartbeatMisses = 0;
    /** @type {Set<string>} configured brokers not yet answering a PING: asked every heartbeat interval (§6.6) */
    this.unpinged = new Set(worker.endpoints);
    this.nextDiscovery = 0;
    /** @type {Set<string>} brokers found to speak another protocol version, logged once each */
    this.wrongVersion = new Set();
    this.kicked = false;
    this.stopBy = 0;
    /** @type {() => void} */
    this.finish = () => {};
  }

  /** @returns {Promise<void>} */
  run() {
    return new Promise((resolve, reject) => {
      this.finish = () => {
        clearInterval(this.timer);
        for (const link of this.links.values()) link.close();
        this.gossip.close();
        resolve();
      };
      this.fail = reject;
      this.timer = setInterval(() => this.tick(), TICK);
      this.kick();
    });
  }

  /** Run a bookkeeping pass soon, once however many events asked for one. */
  kick() {
    if (this.kicked) return;
    this.kicked = true;
    setImmediate(() => {
      this.kicked = false;
      this.tick();
    });
  }

  tick() {
    try {
      const now = performance.now();
      if (this.w.stopping) {
        this.stopBy ||= now + STOP_GRACE;
        const unsettled = this.pendingReports() || this.pollRid !== null;
        if (this.active.size === 0 && (!unsettled || now > this.stopBy)) {
          if (unsettled) this.log("warning", "stopped_unacknowledged", { reports: this.unacked.size });
          this.finish();
          return;
        }
      }
      this.stepOut(now);
      this.flush(now);
      // A wait ends once nothing sent to that broker awaits its answer; silence counts only within one.
      for (const [endpoint, link] of this.links) if (!this.awaits(endpoint)) link.idle();
      const why = this.links.get(this.current)?.gone(now);
      if (why) {
        this.log("warning", "broker_gone", { endpoint: this.current, why });
        this.failover();
      } else if (this.pollRid !== null && now > this.pollDeadline) {
        this.log("warning", "poll_lost", { endpoint: this.current });
        this.failover();
      }
    } catch (err) {
      clearInterval(this.timer);
      this.fail?.(err);
    }
  }

  // -- sockets ------------------------------------------------------------------------------

  /** @param {string} endpoint */
  link(endpoint) {
    let link = this.links.get(endpoint);
    if (!link) {
      link = new Link(endpoint, this.w.liveness, () => this.kick(), this.w.curve);
      this.links.set(endpoint, link);
      this.receive(link);
    }
    return link;
  }

  /** @param {Link} link */
  async receive(link) {
    try {
      for await (const frames of link.sock) {
        if (link.closed) return; // replies to a socket given up on are never matched (§11)
        link.heard(performance.now());
        /** @type {import("./wire.js").Message | null} */
        let msg = null;
        try {
          msg = decode(frames);
          if (msg.command === "PONG") this.unpinged.delete(link.endpoint);
          this.onReply(msg);
        } catch (err) {
          if (err instanceof VersionError) {
            this.leaveWrongVersion(link, err);
            return;
          }
          if (!(err instanceof ProtocolError)) throw err; // a bug here: fail run(), not go deaf
          this.log("warning", "bad_reply", { error: err.message });
        }
        if (msg?.command === "ERROR" && msg.body.code === "shutting_down" && this.links.get(this.current) === link) {
          this.failover(); // it is stopping: what it refused, and everything else, goes elsewhere now
        }
        this.kick();
      }
    } catch (err) {
      if (link.closed) return;
      this.log("error", "receive_error", { error: String(err) });
      clearInterval(this.timer);
      this.fail?.(err);
    }
  }

  /**
   * A broker of another release (§12): it refuses everything, so say so once and leave it, as
   * after a failover; what awaited it goes to the current broker.
   * @param {Link} link @param {VersionError} err
   */
  leaveWrongVersion(link, err) {
    if (!this.wrongVersion.has(link.endpoint)) {
      this.wrongVersion.add(link.endpoint);
      this.log("error", "bad_version", { endpoint: link.endpoint, error: err.message });
    }
    this.unpinged.delete(link.endpoint);
    if (this.links.get(this.current) === link) {
      this.failover();
    } else if (this.links.get(link.endpoint) === link) {
      this.links.delete(link.endpoint);
      link.close();
      this.table.forget(link.endpoint);
      for (const [rid, sent] of this.unacked) if (sent.endpoint === link.endpoint) this.requeue(rid);
    }
    this.kick();
  }

  /**
   * Send a request (to the current broker by default) and return its rid at once; `awaited`
   * says its answer will be waited for, so the broker's silence counts from now (§11). A send
   * that finds no connection within the link's wait is reported to sendFailed.
   * @param {string} command
   * @param {Record<string, unknown>} body
   * @param {string} endpoint
   * @param {boolean} awaited
   */
  send(command, body, endpoint = this.current, awaited = true) {
    const rid = this.nextRid++;
    const link = this.link(endpoint);
    if (awaited) link.expect(performance.now());
    link.send(encode(command, { ...body, rid }), (err) => this.sendFailed(rid, link, err));
    return rid;
  }

  /**
   * No connection: a poll moves on to the next broker; an unsent heartbeat counts as
   * unanswered; an unsent report is resent after RESEND_AFTER or at the failover.
   * @param {number} rid @param {Link} link @param {unknown} err
   */
  sendFailed(rid, link, err) {
    this.log("info", "send_failed", { endpoint: link.endpoint, rid, error: String(err) });
    if (rid === this.pollRid && this.links.get(this.current) === link) this.failover();
    this.kick();
  }

  /** Something sent to this broker still awaits its answer, so its silence counts. @param {string} endpoint */
  awaits(endpoint) {
    if (this.pollRid !== null && this.pollAt === endpoint) return true;
    if (this.heartbeats.size > 0 && this.heartbeatsAt === endpoint) return true;
    for (const sent of this.unacked.values()) if (sent.endpoint === endpoint) return true;
    return false;
  }

  // -- the exchange -------------------------------------------------------------------------

  /** Start what can run, give back what will not, poll for more, heartbeat (§9.2-9.4). */
  stepOut(/** @type {number} */ now) {
    const w = this.w;
    if (this.unpinged.size > 0 && now >= this.nextDiscovery) {
      this.nextDiscovery = now + w.heartbeatInterval; // where do they gossip? asked until answered
      for (const endpoint of this.unpinged) this.send("PING", {}, endpoint, false);
    }
    while (this.prefetched.length > 0 && this.active.size < w.concurrency && !w.stopping) {
      this.start(/** @type {import("./wire.js").Delivery} */ (this.prefetched.shift()));
    }
    if (w.stopping && this.prefetched.length > 0) {
      this.outbox.RELEASE.push(...this.prefetched.map((t) => [t.id, t.attempt]));
      this.prefetched = [];
    }
    const room = w.concurrency + w.prefetch - this.active.size - this.prefetched.length;
    if (this.pollRid === null && room > 0 && !w.stopping && now >= this.pollHoldUntil) {
      this.chooseBroker();
      const max = Math.min(room, MAX_BATCH);
      this.pollAt = this.current;
      const poll = { worker: w.workerId, queues: this.queues, max, timeout: w.pollTimeout, ...w.identity };
      this.pollRid = this.send("POLL", poll);
      this.pollDeadline = now + w.pollTimeout * 1000 + 5000; // §11: unanswered timeout + 5 s: gone
    }
    if (now >= this.nextHeartbeat) {
      this.nextHeartbeat = now + w.heartbeatInterval;
      // Heartbeats are the liveness probe (§11): two in a row unanswered and the broker is gone,
      // so the task leases are renewed through another one well before they expire.
      this.heartbeatMisses = this.heartbeats.size > 0 && this.heartbeatsAt === this.current ? this.heartbeatMisses + 1 : 0;
      if (this.heartbeatMisses >= 2) {
        this.log("warning", "heartbeats_unanswered", { endpoint: this.current });
        this.failover();
      }
      this.heartbeats.clear();
      const running = [...this.active.values()].map((a) => a.task).filter((t) => !this.lost.has(key(t)));
      const held = [...running, ...this.prefetched.filter((t) => !this.lost.has(key(t)))].map((t) => [
        t.id,
        t.attempt,
      ]);
      this.heartbeatsAt = this.current;
      for (let i = 0; i < held.length; i += MAX_BATCH) {
        const rows = held.slice(i, i + MAX_BATCH);
        // `running`: how many of those held run now (the rest are prefetched), for WORKERS (§6.5a).
        const body = { worker: w.workerId, running: Math.max(0, Math.min(running.length - i, rows.length)) };
        this.heartbeats.set(this.send("HEARTBEAT", { ...body, ...reportBody("HEARTBEAT", rows) }), rows);
      }
      for (const [rid, sent] of this.unacked) if (now - sent.sent > RESEND_AFTER) this.requeue(rid);
    }
  }

  /** @param {import("./wire.js").Delivery} task */
  start(task) {
    const handler = /** @type {Handler} */ (this.w.handlers.get(task.queue));
    const k = key(task);
    /** @type {{task: import("./wire.js").Delivery, abort: AbortController | null, lostBy: Error | null, started: number}} */
    const entry = { task, abort: null, lostBy: null, started: performance.now() };
    this.active.set(k, entry);
    /** @type {Task} */
    const ctx = Object.freeze({
      id: task.id,
      queue: task.queue,
      attempt: task.attempt,
      payload: Buffer.from(task.payload.buffer, task.payload.byteOffset, task.payload.byteLength),
      priority: task.priority,
      failures: task.failures,
      maxAttempts: task.max_attempts,
      leaseTimeout: task.lease_timeout,
      broker: task.broker,
      get signal() {
        // made on first use: an AbortController per task costs more than a tiny handler
        entry.abort ??= new AbortController();
        if (entry.lostBy && !entry.abort.signal.aborted) entry.abort.abort(entry.lostBy);
        return entry.abort.signal;
      },
    });
    Promise.resolve()
      .then(() => handler(ctx))
      .then(
        (value) => this.finished(task, () => ["COMPLETE", [task.id, task.attempt, resultBytes(value)]]),
        (err) => this.finished(task, () => failure(task, err)),
      );
  }

  /**
   * A handler settled: report it, unless a heartbeat already told us the task is not ours any
   * more; then its result would be refused anyway and MUST be dropped (§9.5).
   * @param {import("./wire.js").Delivery} task
   * @param {() => [Report, unknown[]]} report
   */
  finished(task, report) {
    const k = key(task);
    const started = this.active.get(k)?.started;
    this.active.delete(k);
    if (this.lost.delete(k)) {
      this.log("info", "result_dropped", { task: task.id, attempt: task.attempt });
    } else {
      let command, row;
      try {
        [command, row] = report();
      } catch (err) {
        [command, row] = failure(task, err); // e.g. a handler that returned a number
      }
      // the seconds the run took, as COMPLETE's and FAIL's `elapsed` (§6.3)
      if (started !== undefined) row.push(Math.max(0, performance.now() - started) / 1000);
      this.outbox[command].push(row);
    }
    this.kick();
  }

  /** Send reports, at most MAX_UNACKED messages awaiting an ACK; the rest wait and batch (§9.6). */
  flush(/** @type {number} */ now) {
    for (const command of /** @type {Report[]} */ (["COMPLETE", "FAIL", "RELEASE"])) {
      const rows = this.outbox[command];
      while (rows.length > 0 && this.unacked.size < MAX_UNACKED && now >= this.holdUntil) {
        const batch = rows.splice(0, MAX_BATCH);
        this.unacked.set(this.send(command, reportBody(command, batch)), { command, rows: batch, sent: now, endpoint: this.current });
      }
    }
  }

  /** @param {number} rid */
  requeue(rid) {
    const sent = this.unacked.get(rid);
    if (!sent) return;
    this.unacked.delete(rid);
    this.outbox[sent.command].unshift(...sent.rows);
  }

  pendingReports() {
    return this.unacked.size > 0 || Object.values(this.outbox).some((rows) => rows.length > 0);
  }

  /**
   * Deepest first (§6.8): while polls bring tasks, stay; after an empty one, go where gossip
   * shows the most buffered for our queues, or with none buffered, the fewest waiting polls.
   * With no gossip heard, go round the configured list.
   */
  chooseBroker() {
    if (!this.lastPollEmpty) return;
    this.table.prune(performance.now());
    let ranked = this.table.rank(this.queues, this.current);
    if (this.table.live().length === 0) {
      const i = ranked.indexOf(this.current);
      ranked = [...ranked.slice(i + 1), ...ranked.slice(0, i + 1)];
    }
    this.current = ranked[0];
  }

  /** @param {import("./wire.js").Message} msg */
  onReply(msg) {
    const { command, body } = msg;
    const rid = typeof body.rid === "bigint" ? Number(body.rid) : body.rid;
    if (command === "PONG") {
      this.gossip.learn(body);
      return;
    }
    if (command === "DELIVER") {
      const tasks = deliveries(body);
      if (rid === this.pollRid) {
        this.pollRid = null;
        this.lastPollEmpty = tasks.length === 0;
      }
      // A late answer to a poll given up on (failover) still hands us its tasks: run them, or
      // give them back (stopping, or a queue we have no handler for) rather than let them expire.
      for (const task of tasks) {
        if (this.w.handlers.has(task.queue) && !this.w.stopping) this.prefetched.push(task);
        else this.outbox.RELEASE.push([task.id, task.attempt]);
      }
      return;
    }
    if (rid === this.pollRid && rid !== null) {
      // ERROR to our poll (shutting_down, ...): another broker, or this one anew, after a pause.
      this.pollRid = null;
      this.log("warning", "poll_refused", { code: body.code, error: body.message });
      this.failover();
      return;
    }
    const sent = this.unacked.get(rid);
    if (command === "ERROR") {
      if (sent) {
        // busy or unavailable: nothing was written; put the rows back and pause (§9.6)
        this.requeue(rid);
        this.holdUntil = performance.now() + REFUSED_PAUSE;
        this.log("info", "report_deferred", { code: body.code, error: body.message });
      } else {
        // e.g. a HEARTBEAT refused busy: the next one covers it, and until an ACK comes this
        // one counts as unanswered (two in a row and we move on, §11)
        this.log("warning", "request_refused", { code: body.code, error: body.message });
      }
      return;
    }
    if (command !== "ACK") return;
    const outcomes = Array.isArray(body.outcomes) ? body.outcomes : [];
    const beats = this.heartbeats.get(rid);
    if (beats) {
      this.heartbeats.delete(rid);
      beats.forEach((row, i) => {
        if (outcomes[i] !== "ok") this.lose(row, String(outcomes[i]));
      });
      return;
    }
    if (!sent) return; // a reply to a request given up on
    this.unacked.delete(rid);
    sent.rows.forEach((row, i) => {
      // any outcome but ok is final: never resend it (§6.3); stale means another delivery won
      if (outcomes[i] !== "ok") {
        this.log("warning", "refused", { command: sent.command, task: row[0], attempt: row[1], outcome: outcomes[i] });
      }
    });
  }

  /**
   * A heartbeat said this delivery is not ours (stale, finished, cancelled, unknown): stop its
   * handler if it listens, drop it if not started, and never report it (§9.4).
   * @param {unknown[]} row @param {string} outcome
   */
  lose(row, outcome) {
    const k = `${row[0]}/${row[1]}`;
    const active = this.active.get(k);
    if (!active && !this.prefetched.some((t) => key(t) === k)) return; // reported meanwhile
    this.log("warning", "lease_lost", { task: row[0], attempt: row[1], outcome });
    if (active) {
      this.lost.add(k);
      active.lostBy = new Error(`lease lost: ${outcome}`);
      active.abort?.abort(active.lostBy);
    } else {
      this.prefetched = this.prefetched.filter((t) => key(t) !== k);
    }
  }

  /**
   * The broker is gone, cut off or refusing (§11): drop its socket (nothing queued for it is
   * sent later; its late replies are never matched), move to the next broker, and resend every
   * unacknowledged report there (fenced, so a repeat is harmless).
   */
  failover() {
    this.log("warning", "failover", { endpoint: this.current });
    const link = this.links.get(this.current);
    if (link) {
      this.links.delete(this.current);
      link.close();
    }
    this.pollRid = null;
    this.table.forget(this.current);
    this.lastPollEmpty = true;
    this.chooseBroker(); // away from this broker at once: heartbeats and reports follow
    this.lastPollEmpty = false;
    this.pollHoldUntil = performance.now() + (this.table.rank([]).length > 1 ? 100 : 500);
    this.heartbeats.clear();
    this.heartbeatMisses = 0;
    this.nextHeartbeat = 0; // renew the leases through the new broker now
    for (const rid of [...this.unacked.keys()]) this.requeue(rid);
  }
}

/** @param {{id: unknown, attempt: unknown}} task */
function key(task) {
  return `${task.id}/${task.attempt}`;
}

/**
 * @param {import("./wire.js").Delivery} task
 * @param {unknown} err
 * @returns {[Report, unknown[]]}
 */
function failure(task, err) {
  if (err instanceof PermanentError) return ["FAIL", [task.id, task.attempt, errorText(`PermanentError: ${err.message}`), false]];
  const text = err instanceof Error ? err.stack ?? `${err.name}: ${err.message}` : String(err);
  return ["FAIL", [task.id, task.attempt, errorText(text), true]];
}
