// CURVE security (README, Security): this worker's keypair and the brokers' public key, read from
// the key files `conduit keys new` writes (ZeroMQ's certificate format: NAME.key holds
// `public-key = "..."`, NAME.key_secret, mode 0600, both keys; Z85, 40 characters each). Every
// socket the worker makes (a DEALER per broker, the gossip SUB) gets the same options.

import { readFileSync, statSync } from "node:fs";

const FIELD = /^\s*(public|secret)-key\s*=\s*"([^"\n]*)"\s*$/gm;
const Z85 = /^[0-9a-zA-Z.\-:+=^!/*?&<>()[\]{}@%$#]{40}$/;

/** @param {string} path @returns {Record<string, string>} */
function fields(path) {
  let text;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new Error(`cannot read key file ${path}: ${/** @type {NodeJS.ErrnoException} */ (err).code}`);
  }
  /** @type {Record<string, string>} */
  const found = {};
  for (const [, kind, value] of text.matchAll(FIELD)) {
    if (!Z85.test(value)) throw new Error(`key file ${path}: its ${kind} key is not 40 characters of Z85`);
    found[kind] = value;
  }
  if (!found.public) throw new Error(`key file ${path} has no public-key = "..." line (make keys with conduit keys new)`);
  return found;
}

/** The public key of a NAME.key file; a secret one is refused, so it is not handed around. @param {string} path */
export function readPublic(path) {
  const found = fields(path);
  if (found.secret) throw new Error(`${path} holds a secret key: give its public one (NAME.key)`);
  return found.public;
}

/** A NAME.key_secret file, which nobody but its owner may read. @param {string} path */
export function readKeypair(path) {
  let mode;
  try {
    mode = statSync(path).mode & 0o777;
  } catch (err) {
    throw new Error(`cannot read secret key file ${path}: ${/** @type {NodeJS.ErrnoException} */ (err).code}`);
  }
  if (mode & 0o077) throw new Error(`secret key file ${path} is open to others (mode 0${mode.toString(8)}): run chmod 600 ${path}`);
  const found = fields(path);
  if (!found.secret) throw new Error(`${path} has no secret-key = "..." line: give the NAME.key_secret file`);
  return { publicKey: found.public, secretKey: found.secret };
}

/**
 * zeromq.js socket options for CURVE, or {} when it is off: from the files given, else
 * CONDUIT_CURVE_SECRET and CONDUIT_CURVE_SERVER. Bad files throw now, at the worker's start.
 * @param {{secret?: string, server?: string}} files @param {NodeJS.ProcessEnv} env
 * @returns {{curveServerKey?: string, curvePublicKey?: string, curveSecretKey?: string}}
 */
export function curveOptions(files, env = process.env) {
  const secret = files.secret || env.CONDUIT_CURVE_SECRET || "";
  const server = files.server || env.CONDUIT_CURVE_SERVER || "";
  if (!secret && !server) return {};
  if (!secret || !server) {
    throw new Error("CURVE needs both curveSecret (or CONDUIT_CURVE_SECRET) and curveServer (or CONDUIT_CURVE_SERVER)");
  }
  const { publicKey, secretKey } = readKeypair(secret);
  return { curveServerKey: readPublic(server), curvePublicKey: publicKey, curveSecretKey: secretKey };
}
