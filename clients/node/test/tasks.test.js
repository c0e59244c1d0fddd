import assert from "node:assert/strict";
import { test } from "node:test";

import { encode } from "@msgpack/msgpack";

import { PermanentError, decodeCall, encodeValue } from "../src/index.js";

test("a call by name is told msgpack or JSON by its first byte", () => {
  assert.deepEqual(decodeCall(encode(["add", [1, 2], { scale: 3 }])), { format: "msgpack", name: "add", args: [1, 2], kwargs: { scale: 3 } });
  assert.deepEqual(decodeCall(new TextEncoder().encode('["shout",["x"],{}]')), { format: "json", name: "shout", args: ["x"], kwargs: {} });
  assert.throws(() => decodeCall(new TextEncoder().encode("plain text")), PermanentError);
  assert.throws(() => decodeCall(encode(["add", 1, {}])), /\[name, args, kwargs\]/);
});

test("results go back in the call's format", () => {
  assert.deepEqual(encodeValue("msgpack", { a: [1] }), encode({ a: [1] }));
  assert.equal(new TextDecoder().decode(encodeValue("json", undefined)), "null");
});
