/**
 * Reconnect delays: exponential backoff with "full jitter" (the delay is
 * drawn uniformly between 0 and the exponential ceiling), which spreads the
 * reconnects of many clients after a server restart instead of having them
 * arrive in waves.
 */

/** Backoff settings, in milliseconds. */
export interface BackoffOptions {
  /** Ceiling of the first retry's delay, in ms. Default 500. Must be > 0. */
  baseMs?: number;
  /** Largest ceiling, in ms; the ceiling doubles per attempt up to it. Default 30 000. Must be >= `baseMs`. */
  maxMs?: number;
}

/** `BackoffOptions` with defaults applied. */
export interface ResolvedBackoff {
  /** Ceiling of the first retry's delay, in ms. */
  baseMs: number;
  /** Largest ceiling, in ms. */
  maxMs: number;
}

/** Default first-retry ceiling, in ms. */
export const DEFAULT_BACKOFF_BASE_MS = 500;
/** Default largest ceiling, in ms. */
export const DEFAULT_BACKOFF_MAX_MS = 30_000;

/**
 * Applies defaults and validates. Throws `RangeError` when `baseMs` is not a
 * positive finite number or `maxMs` is smaller than `baseMs`.
 */
export function resolveBackoff(options: BackoffOptions = {}): ResolvedBackoff {
  const baseMs = options.baseMs ?? DEFAULT_BACKOFF_BASE_MS;
  const maxMs = options.maxMs ?? Math.max(DEFAULT_BACKOFF_MAX_MS, baseMs);
  if (!Number.isFinite(baseMs) || baseMs <= 0) {
    throw new RangeError(`backoff.baseMs must be a positive number of milliseconds, got ${baseMs}`);
  }
  if (!Number.isFinite(maxMs) || maxMs < baseMs) {
    throw new RangeError(`backoff.maxMs must be >= baseMs (${baseMs}), got ${maxMs}`);
  }
  return { baseMs, maxMs };
}

/**
 * The exponential ceiling for retry `attempt` (1 for the first retry):
 * `min(maxMs, baseMs * 2^(attempt - 1))`, in ms.
 * Throws `RangeError` when `attempt` is not an integer >= 1.
 */
export function backoffCeiling(attempt: number, backoff: ResolvedBackoff): number {
  if (!Number.isInteger(attempt) || attempt < 1) {
    throw new RangeError(`attempt must be an integer >= 1, got ${attempt}`);
  }
  // 2^(attempt-1) overflows to Infinity for large attempts; min() handles it.
  return Math.min(backoff.maxMs, backoff.baseMs * 2 ** (attempt - 1));
}

/**
 * The delay before retry `attempt` (1 for the first retry), in whole ms:
 * uniformly drawn from `[0, backoffCeiling(attempt)]` ("full jitter").
 *
 * @param random a source of numbers in `[0, 1)`, `Math.random` by default;
 *   injectable for tests.
 */
export function backoffDelay(
  attempt: number,
  backoff: ResolvedBackoff,
  random: () => number = Math.random,
): number {
  const ceiling = backoffCeiling(attempt, backoff);
  const r = random();
  const unit = Number.isFinite(r) ? Math.min(Math.max(r, 0), 1) : 0;
  return Math.floor(unit * ceiling);
}
