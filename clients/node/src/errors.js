/** Raise from a handler to fail the task without retries (FAIL with retry false: dead at once). */
export class PermanentError extends Error {
  /** @param {string} message */
  constructor(message) {
    super(message);
    this.name = "PermanentError";
  }
}
