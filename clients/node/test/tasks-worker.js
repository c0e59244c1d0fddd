// A Node worker running tasks by name, for tests/test_node_tasks.py: `node test/tasks-worker.js`.
// CONDUIT_TEST_ENDPOINT names the broker. Same names as the Python tasks of that test.
import { Worker, currentTask } from "../src/index.js";

const worker = new Worker({ endpoints: process.env.CONDUIT_TEST_ENDPOINT ?? "tcp://127.0.0.1:5555", pollTimeout: 1, heartbeatInterval: 0.5 });

worker
  .task("scale", (values, options) => ({
    by: "node",
    scaled: values.map((v) => v * (options?.factor ?? 1)),
    attempt: currentTask().attempt,
  }))
  .task("greet", (name) => `hello ${name}`, { queue: "words" })
  .task("nothing", () => undefined)
  .task("refuse", (why) => {
    throw new RangeError(`refused: ${why}`);
  });

process.once("SIGTERM", () => worker.stop());
process.once("SIGINT", () => worker.stop());
await worker.run();
