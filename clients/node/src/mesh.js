// What a worker knows of the broker mesh, from GOSSIP (docs/PROTOCOL.md §6.8), and where to poll.
//
// MeshTable is pure (no sockets, the clock passed in) so its ranking is unit-tested; Gossip is
// the SUB socket that feeds it.

import { Subscriber } from "zeromq";

import { decode } from "./wire.js";

export const STALE_AFTER = 3; // gossip intervals without a message: the broker is gone

/**
 * @typedef {{broker: string, endpoint: string, pub: string, queues: Map<string, [number, number]>,
 *   interval: number, seen: number, stopping: boolean}} BrokerView
 */

export class MeshTable {
  /** @param {string[]} endpoints configured brokers: the fallback while no gossip is heard */
  constructor(endpoints) {
    this.endpoints = [...endpoints];
    /** @type {Map<string, BrokerView>} broker id -> latest view */
    this.brokers = new Map();
  }

  /**
   * Take in one GOSSIP body heard at `now` (ms). Returns the gossip endpoint it advertises, or
   * "" when the body is unreadable (gossip that cannot be read is gossip not heard).
   * @param {Record<string, any>} body
   * @param {number} now
   */
  hear(body, now) {
    if (typeof body.broker !== "string" || typeof body.endpoint !== "string") return "";
    /** @type {Map<string, [number, number]>} */
    const queues = new Map();
    const raw = body.queues && typeof body.queues === "object" ? body.queues : {};
    for (const [queue, depth] of Object.entries(raw)) {
      if (Array.isArray(depth) && depth.length >= 2) queues.set(queue, [Number(depth[0]), Number(depth[1])]);
    }
    const interval = Number(body.interval);
    this.brokers.set(body.broker, {
      broker: body.broker,
      endpoint: body.endpoint,
      pub: typeof body.pub === "string" ? body.pub : "",
      queues,
      interval: interval > 0 ? interval : 1,
      seen: now,
      stopping: body.stopping === true,
    });
    return typeof body.pub === "string" ? body.pub : "";
  }

  /** Drop brokers not heard from for STALE_AFTER of their intervals. @param {number} now ms */
  prune(now) {
    for (const [id, view] of this.brokers) {
      if (now - view.seen > STALE_AFTER * view.interval * 1000) this.brokers.delete(id);
    }
  }

  /** Forget a broker we just failed over from, until it is heard again. @param {string} endpoint */
  forget(endpoint) {
    for (const [id, view] of this.brokers) if (view.endpoint === endpoint) this.brokers.delete(id);
  }

  /** Brokers heard recently that are not stopping. */
  live() {
    return [...this.brokers.values()].filter((v) => !v.stopping);
  }

  /**
   * Endpoints to poll, best first (§6.8): most buffered tasks for `queues`; with nothing
   * buffered, fewest waiting polls (random among equals, so idle workers spread); `avoid` (just
   * polled empty) last among equals. Configured endpoints not heard of follow. With no live
   * gossip at all: the configured list as given.
   * @param {string[]} queues
   * @param {string | null} avoid
   * @param {() => number} random
   */
  rank(queues, avoid = null, random = Math.random) {
    const live = this.live();
    if (live.length === 0) return [...this.endpoints];
    const sum = (/** @type {BrokerView} */ v, /** @type {0 | 1} */ i) =>
      queues.reduce((n, q) => n + (v.queues.get(q)?.[i] ?? 0), 0);
    const keyed = live.map((v) => ({ v, buffered: sum(v, 0), polls: sum(v, 1), tie: random() }));
    keyed.sort(
      (a, b) =>
        b.buffered - a.buffered ||
        Number(a.v.endpoint === avoid) - Number(b.v.endpoint === avoid) ||
        a.polls - b.polls ||
        a.tie - b.tie,
    );
    const ranked = keyed.map((k) => k.v.endpoint);
    return [...ranked, ...this.endpoints.filter((e) => !ranked.includes(e))];
  }
}

/**
 * The gossip endpoints a PONG or GOSSIP body names: the broker's own `pub` and those of the
 * live peers it lists in `peers` (§6.6), so one broker's endpoint finds the whole mesh.
 * @param {Record<string, any>} body
 * @returns {string[]}
 */
export function gossipEndpoints(body) {
  const found = typeof body.pub === "string" && body.pub ? [body.pub] : [];
  for (const peer of Array.isArray(body.peers) ? body.peers : []) {
    if (peer && typeof peer === "object" && typeof peer.pub === "string" && /^(tcp|ipc):\/\/\S+$/.test(peer.pub)) {
      found.push(peer.pub);
    }
  }
  return found;
}

/** A SUB socket on every gossip endpoint we learn of, feeding a MeshTable. */
export class Gossip {
  /**
   * @param {MeshTable} table
   * @param {(level: "debug" | "info" | "warning" | "error", event: string, fields?: Record<string, unknown>) => void} log
   * @param {object} curve CURVE socket options (src/curve.js), or {}
   */
  constructor(table, log, curve = {}) {
    this.table = table;
    this.log = log;
    this.sub = new Subscriber({ linger: 0, ...curve });
    this.sub.subscribe(); // everything: GOSSIP has no topic prefix
    /** @type {Set<string>} */
    this.subscribed = new Set();
    this.closed = false;
    this.done = this.#receive();
  }

  /** @param {string | null | undefined} endpoint a broker's gossip endpoint (PONG `pub`) */
  subscribe(endpoint) {
    if (!endpoint || this.closed || this.subscribed.has(endpoint)) return;
    this.subscribed.add(endpoint);
    try {
      this.sub.connect(endpoint);
    } catch (err) {
      this.log("warning", "gossip_endpoint_refused", { endpoint, error: String(err) }); // never heard of
    }
  }

  /** Subscribe to every gossip endpoint a PONG or GOSSIP body names. @param {Record<string, any>} body */
  learn(body) {
    for (const endpoint of gossipEndpoints(body)) this.subscribe(endpoint);
  }

  async #receive() {
    try {
      for await (const frames of this.sub) {
        let body;
        try {
          body = decode(frames, ["GOSSIP"]).body;
        } catch {
          continue;
        }
        this.table.hear(body, performance.now());
        this.learn(body); // brokers advertise their own pub and their peers'

      }
    } catch (err) {
      if (!this.closed) this.log("warning", "gossip_error", { error: String(err) });
    }
  }

  close() {
    this.closed = true;
    this.sub.close();
  }
}
