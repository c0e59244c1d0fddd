// Tasks called by name (docs/PROTOCOL.md §17): a payload is [name, args, kwargs] in msgpack or,
// when its first byte is "[", in JSON; the result is the return value in the payload's format.
// A JavaScript function takes the positional arguments, then the keyword arguments as one
// object when there are any. A payload that is not such a call, or names a task this worker does
// not have, fails for good (PermanentError): running it again would fail the same way.

import { AsyncLocalStorage } from "node:async_hooks";

import { decode as unpack, encode as pack } from "@msgpack/msgpack";

import { PermanentError } from "./errors.js";

const current = new AsyncLocalStorage();

/** The delivery the running task function was called for (id, attempt, signal, ...). */
export function currentTask() {
  const task = current.getStore();
  if (task === undefined) throw new Error("currentTask() is only known inside a task run by a Worker");
  return task;
}

/**
 * @param {Uint8Array} payload
 * @returns {{format: "json" | "msgpack", name: string, args: unknown[], kwargs: Record<string, unknown>}}
 */
export function decodeCall(payload) {
  const first = payload[0];
  let format, call;
  if (first === 0x5b) format = "json";
  else if (first !== undefined && ((first >= 0x90 && first <= 0x9f) || first === 0xdc || first === 0xdd)) format = "msgpack";
  else throw new PermanentError("the payload is not a call by name: neither a msgpack nor a JSON array");
  try {
    call = format === "json" ? JSON.parse(new TextDecoder().decode(payload)) : unpack(payload);
  } catch (err) {
    throw new PermanentError(`the payload is not valid ${format}: ${err instanceof Error ? err.message : err}`);
  }
  const ok =
    Array.isArray(call) && call.length === 3 && typeof call[0] === "string" && Array.isArray(call[1]) &&
    call[2] !== null && typeof call[2] === "object" && !Array.isArray(call[2]);
  if (!ok) throw new PermanentError("the payload is not a call by name: [name, args, kwargs]");
  return { format, name: call[0], args: call[1], kwargs: call[2] };
}

/** @param {"json" | "msgpack"} format @param {unknown} value */
export function encodeValue(format, value) {
  if (format === "msgpack") return pack(value ?? null);
  const text = JSON.stringify(value ?? null);
  if (text === undefined) throw new PermanentError(`json cannot encode ${typeof value}`);
  return new TextEncoder().encode(text);
}

/**
 * The handler for one queue of tasks by name: decodes the call, runs the function, encodes its result.
 * @param {string} queue
 * @param {Map<string, (...args: any[]) => unknown>} functions
 */
export function dispatcher(queue, functions) {
  return async (/** @type {any} */ task) => {
    const { format, name, args, kwargs } = decodeCall(task.payload);
    const fn = functions.get(name);
    if (fn === undefined) {
      throw new PermanentError(`queue ${JSON.stringify(queue)} got no task named ${JSON.stringify(name)}; this worker runs ${[...functions.keys()].sort().join(", ")}`);
    }
    const callArgs = Object.keys(kwargs).length ? [...args, kwargs] : args;
    const value = await current.run(task, () => fn(...callArgs));
    try {
      return encodeValue(format, value);
    } catch (err) {
      if (err instanceof PermanentError) throw err;
      throw new PermanentError(`task ${JSON.stringify(name)} returned a value that ${format} cannot encode: ${err instanceof Error ? err.message : err}`);
    }
  };
}
