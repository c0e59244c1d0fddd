// One logfmt line per event on stderr, in the same shape as Conduit's Python logs.

const LEVELS = { debug: 10, info: 20, warning: 30, error: 40 };

/** @param {unknown} value */
function quote(value) {
  const text = String(value);
  if (text === "" || /[ ="\n]/.test(text)) {
    return `"${text.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n")}"`;
  }
  return text;
}

/**
 * A logger writing to stderr at `level` and above.
 * @param {string} name
 * @param {keyof typeof LEVELS} level
 * @returns {(level: keyof typeof LEVELS, event: string, fields?: Record<string, unknown>) => void}
 */
export function logfmt(name, level = "info") {
  const threshold = LEVELS[level] ?? LEVELS.info;
  return (lvl, event, fields = {}) => {
    if ((LEVELS[lvl] ?? 0) < threshold) return;
    const all = { ts: new Date().toISOString(), level: lvl, logger: name, event, ...fields };
    process.stderr.write(`${Object.entries(all).map(([k, v]) => `${k}=${quote(v)}`).join(" ")}\n`);
  };
}
