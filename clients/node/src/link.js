// One DEALER to one broker, and whether that broker is still there (docs/PROTOCOL.md §11).
//
// A broker is alive while the worker hears from it. Silence counts only while the worker waits
// for something from it (a DELIVER, an ACK): having heard nothing for one interval, it sends a
// PING, which the broker answers at once from its socket loop, without the database; after two
// intervals of silence the broker is gone, paused or cut off. A connection that ZeroMQ reports
// dropped, or a PING that cannot be sent for want of one, means the same at once: a reply comes
// back only on the connection that carried its request, so whatever was sent on it is lost.

import { Dealer } from "zeromq";

import { MAX_FRAME_BYTES, encode } from "./wire.js";

export const LIVENESS = 1000; // ms of silence before a PING; twice this and the broker is gone
export const CONNECT_WAIT = 1000; // ms a send waits for a connection (IMMEDIATE) before giving up

let nextPingRid = 2n ** 62n; // apart from the worker's own request ids (§6.6)

export class Link {
  /**
   * @param {string} endpoint
   * @param {number} liveness ms
   * @param {() => void} alarm called when the broker may just have become gone (its connection
   *   dropped, or a PING found none), so the owner looks at once rather than at its next tick
   * @param {object} curve CURVE socket options (src/curve.js), or {}
   */
  constructor(endpoint, liveness, alarm, curve = {}) {
    this.endpoint = endpoint;
    this.liveness = liveness;
    this.alarm = alarm;
    // §2: LINGER 0 (closing never flushes stale requests), IMMEDIATE (queue nothing for a broker
    // not connected), the protocol's frame limit; sends wait at most CONNECT_WAIT.
    this.sock = new Dealer({ linger: 0, immediate: true, maxMessageSize: MAX_FRAME_BYTES, sendTimeout: CONNECT_WAIT, ...curve });
    this.sock.events.on("disconnect", () => this.#lost("its connection dropped"));
    this.sock.connect(endpoint);
    /** @type {Promise<void>} zeromq.js allows one send in flight per socket: sends queue here */
    this.chain = Promise.resolve();
    this.closed = false;
    this.waiting = false;
    this.heardAt = performance.now();
    this.pingedAt = -Infinity;
    /** @type {string | null} why the connection is known lost during this wait */
    this.lostBy = null;
  }

  /**
   * Send after the sends before it; `failed` gets the error of a send that found no connection
   * within CONNECT_WAIT (never called once the link is closed).
   * @param {Uint8Array[]} frames @param {(err: unknown) => void} failed
   */
  send(frames, failed) {
    this.chain = this.chain.then(() =>
      this.closed ? undefined : this.sock.send(frames).catch((err) => (this.closed ? undefined : failed(err))),
    );
  }

  /**
   * Something we will wait for is being sent. If nothing was awaited, the wait begins now:
   * silence counts from here, and a drop seen before it lost nothing we wait for.
   * @param {number} now ms
   */
  expect(now) {
    if (this.waiting) return;
    this.waiting = true;
    this.heardAt = now;
    this.lostBy = null;
  }

  /** Nothing is awaited from this broker any more: its silence means nothing. */
  idle() {
    this.waiting = false;
  }

  /** Anything received proves the broker alive: a reply, a PONG, a late answer. @param {number} now */
  heard(now) {
    this.heardAt = now;
  }

  /**
   * While waiting: why the broker is gone, or null. PINGs it when it has been quiet for an
   * interval (at most one PING an interval).
   * @param {number} now ms
   */
  gone(now) {
    if (!this.waiting) return null;
    if (this.lostBy) return this.lostBy;
    const silent = now - this.heardAt;
    if (silent >= 2 * this.liveness) return `silent for ${(silent / 1000).toFixed(1)}s`;
    if (silent >= this.liveness && now - this.pingedAt >= this.liveness) {
      this.pingedAt = now;
      this.#ping();
    }
    return null;
  }

  #ping() {
    const frames = encode("PING", { rid: nextPingRid++ });
    this.chain = this.chain.then(() => {
      if (this.closed) return undefined;
      this.sock.sendTimeout = 0; // with IMMEDIATE, not sendable at once means no connection
      const sent = this.sock.send(frames);
      this.sock.sendTimeout = CONNECT_WAIT;
      return sent.catch(() => this.#lost("no connection for a PING"));
    });
  }

  /** @param {string} why */
  #lost(why) {
    if (this.closed || !this.waiting) return; // a drop before the wait began lost nothing
    this.lostBy ??= why;
    this.alarm();
  }

  close() {
    this.closed = true;
    this.sock.close();
  }
}
