// A Node.js worker for the mixed demo: `node examples/worker.js [broker endpoint ...]`.
// Answers queue "greet" (payload: a name, UTF-8) with JSON saying who greeted.
import { Worker } from "../src/index.js";

const endpoints = process.argv.slice(2);
const worker = new Worker({ endpoints: endpoints.length ? endpoints : ["tcp://127.0.0.1:5555"], concurrency: 8 });

worker.handle("greet", async (task) => {
  // task.attempt grows with every delivery: a handler can run twice, so keep it idempotent
  return JSON.stringify({ by: "node", pid: process.pid, greeting: `hello ${task.payload.toString()}`, attempt: task.attempt });
});

process.once("SIGTERM", () => worker.stop());
process.once("SIGINT", () => worker.stop());
await worker.run();
