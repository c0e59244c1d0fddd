// The conformance handlers (tests/conformance/handlers.py has the same ones in Python), run as
// a process: `node test/conformance-worker.js`. Configured by the environment:
//   CONDUIT_TEST_ENDPOINT   broker endpoints, space separated
//   CONDUIT_TEST_LEDGER     file to append "id attempt pid start" to at the start of every run
//                           (start: wall-clock seconds, as the Python handlers write it)
//   CONDUIT_TEST_CONCURRENCY, CONDUIT_TEST_PREFETCH, CONDUIT_TEST_POLL_TIMEOUT, CONDUIT_TEST_HEARTBEAT
import { appendFileSync, existsSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";

import { PermanentError, Worker, logfmt } from "../src/index.js";

const env = process.env;
const worker = new Worker({
  log: env.CONDUIT_TEST_DEBUG ? logfmt("conduit.worker", "debug") : undefined,
  endpoints: env.CONDUIT_TEST_ENDPOINT ?? "tcp://127.0.0.1:5555",
  concurrency: Number(env.CONDUIT_TEST_CONCURRENCY ?? 2),
  prefetch: env.CONDUIT_TEST_PREFETCH === undefined ? undefined : Number(env.CONDUIT_TEST_PREFETCH),
  pollTimeout: Number(env.CONDUIT_TEST_POLL_TIMEOUT ?? 1),
  heartbeatInterval: Number(env.CONDUIT_TEST_HEARTBEAT ?? 0.5),
});

/** Record a run before working, so a test counts runs even of a process killed mid-task. */
function record(task) {
  if (!env.CONDUIT_TEST_LEDGER) return;
  const start = ((performance.timeOrigin + performance.now()) / 1000).toFixed(6);
  appendFileSync(env.CONDUIT_TEST_LEDGER, `${task.id} ${task.attempt} ${process.pid} ${start}\n`);
}

worker
  .handle("echo", (task) => {
    record(task);
    return task.payload; // the payload back, byte for byte
  })
  .handle("whoami", (task) => {
    record(task);
    return `node ${task.broker} ${task.attempt}`;
  })
  .handle("flaky", (task) => {
    record(task);
    if (task.failures === 0) throw new Error("flaky: first try fails");
    return `ok after ${task.failures} failure(s)`;
  })
  .handle("doomed", (task) => {
    record(task);
    throw new PermanentError("doomed: cannot be done");
  })
  .handle("sleepy", async (task) => {
    record(task);
    await sleep(Number(task.payload.toString()) * 1000);
    return `slept ${task.attempt}`;
  })
  .handle("gated", async (task) => {
    record(task); // runs until the file its payload names exists: the test ends it
    const deadline = performance.now() + 60_000;
    while (!existsSync(task.payload.toString()) && performance.now() < deadline) await sleep(50);
    return `opened ${task.attempt}`;
  })
  .handle("noop", () => null);

process.once("SIGTERM", () => worker.stop());
process.once("SIGINT", () => worker.stop());
await worker.run();
