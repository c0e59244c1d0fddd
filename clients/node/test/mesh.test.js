// Gossip table and deepest-first ranking (docs/PROTOCOL.md §6.8), with the clock passed in.
import assert from "node:assert/strict";
import { test } from "node:test";

import { MeshTable, gossipEndpoints } from "../src/mesh.js";

const gossip = (broker, queues, extra = {}) => ({
  broker, endpoint: `tcp://${broker}`, pub: `tcp://${broker}-pub`, interval: 0.5, seq: 1, stopping: false, queues, ...extra,
});

test("with no gossip the configured endpoints are used in order", () => {
  const table = new MeshTable(["tcp://a", "tcp://b"]);
  assert.deepEqual(table.rank(["q"]), ["tcp://a", "tcp://b"]);
});

test("deepest buffer first, then fewest waiting polls, the broker just tried last", () => {
  const table = new MeshTable(["tcp://configured"]);
  assert.equal(table.hear(gossip("a", { q: [0, 3] }), 0), "tcp://a-pub");
  table.hear(gossip("b", { q: [10, 0], other: [500, 0] }), 0);
  table.hear(gossip("c", { q: [40, 9] }), 0);
  table.hear(gossip("d", {}), 0);
  assert.deepEqual(table.rank(["q"]), ["tcp://c", "tcp://b", "tcp://d", "tcp://a", "tcp://configured"]);
  const other = table.rank(["other"], "tcp://b"); // buffered tasks win even where just tried
  assert.equal(other[0], "tcp://b");
  assert.deepEqual(other.slice(1, 4).sort(), ["tcp://a", "tcp://c", "tcp://d"]);
  // nothing buffered for "idle": fewest polls first, and the one just tried empty goes last
  const idle = new MeshTable([]);
  idle.hear(gossip("x", { idle: [0, 0] }), 0);
  idle.hear(gossip("y", { idle: [0, 0] }), 0);
  for (let i = 0; i < 10; i++) assert.equal(idle.rank(["idle"], "tcp://x")[1], "tcp://x");
});

test("equal brokers are ranked at random, so idle workers spread", () => {
  const table = new MeshTable([]);
  table.hear(gossip("x", {}), 0);
  table.hear(gossip("y", {}), 0);
  const firsts = new Set();
  for (let i = 0; i < 50; i++) firsts.add(table.rank(["q"])[0]);
  assert.deepEqual([...firsts].sort(), ["tcp://x", "tcp://y"]);
});

test("stale, stopping and forgotten brokers are not ranked", () => {
  const table = new MeshTable(["tcp://a"]);
  table.hear(gossip("a", { q: [5, 0] }), 0);
  table.hear(gossip("b", { q: [1, 0] }, { interval: 2 }), 0);
  table.hear(gossip("s", { q: [99, 0] }, { stopping: true }), 0);
  assert.deepEqual(table.rank(["q"]), ["tcp://a", "tcp://b"]);
  table.prune(1600); // more than 3 x 0.5 s: a is gone; b (interval 2 s) is not
  assert.deepEqual(table.rank(["q"]), ["tcp://b", "tcp://a"]);
  table.forget("tcp://b");
  assert.deepEqual(table.rank(["q"]), ["tcp://a"]);
  assert.equal(table.hear({ endpoint: 3 }, 0), ""); // unreadable gossip is not heard
});

test("a PONG or GOSSIP names its own gossip endpoint and its live peers'", () => {
  const body = {
    pub: "tcp://a-pub",
    peers: [
      { broker: "b", endpoint: "tcp://b", pub: "tcp://b-pub" },
      { broker: "c", endpoint: "tcp://c", pub: null },
      { broker: "d", endpoint: "tcp://d", pub: "not an endpoint" },
      "garbage",
    ],
  };
  assert.deepEqual(gossipEndpoints(body), ["tcp://a-pub", "tcp://b-pub"]);
  assert.deepEqual(gossipEndpoints({ pub: null }), []); // a conduit/2 broker before peers
});
