// conduit-worker: a Conduit worker for Node.js, written from docs/PROTOCOL.md (conduit/2).

export { PermanentError, Worker } from "./worker.js";
export { currentTask, decodeCall, encodeValue } from "./tasks.js";
export { Gossip, MeshTable } from "./mesh.js";
export { logfmt } from "./log.js";
export * as wire from "./wire.js";
