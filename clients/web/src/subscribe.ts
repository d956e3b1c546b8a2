/**
 * `subscribe()`: a Herald event stream that survives disconnects.
 *
 * It implements the client side of the stream contract (see the proto):
 * remember the last position (seq and epoch), reconnect with backoff and
 * `after_seq` + `epoch`, drop what was already delivered, treat a stream
 * silent for longer than the server's heartbeat interval allows as dead,
 * refetch on `resync`.
 */
import { create } from "@bufbuild/protobuf";
import { Code, createClient, type Transport } from "@connectrpc/connect";
import { authHeaders, type TokenProvider } from "./auth.js";
import {
  backoffDelay,
  resolveBackoff,
  type BackoffOptions,
  type ResolvedBackoff,
} from "./backoff.js";
import { classifyError, HeraldError, toHeraldError } from "./errors.js";
import {
  Notifications,
  Severity,
  SubscribeRequestSchema,
  type Event,
  type Resync_Reason,
} from "./gen/herald/v1/herald_pb.js";

/**
 * The server's default heartbeat interval (`--heartbeat-interval`), in ms:
 * what the watchdog assumes until the server states its own interval.
 */
export const DEFAULT_HEARTBEAT_INTERVAL_MS = 15_000;
/** Default watchdog multiplier: a stream silent for 2 heartbeat intervals is dead. */
export const DEFAULT_WATCHDOG_MULTIPLIER = 2;

/**
 * An event handed to `onEvent` (`kind.case`):
 * - `"notification"`: a new notification;
 * - `"updated"`: a notification updated in place (the sender's
 *   `replace_key` or `group_key`): the same `id` and `seq` as the one it
 *   replaces, its new content, and its state after the update (`read`,
 *   `readAt`, `seenAt`, `archivedAt`; a `renotify` makes it unread and
 *   unseen again). Replace the one shown;
 * - `"read"`: notifications were marked read (`ReadStateChanged`: by ids,
 *   or every one with seq <= `upToSeq`);
 * - `"state"`: any other state change (`StateChanged`: `action` — unread,
 *   seen, archive, unarchive, delete, or read by filter — applied to
 *   `notificationIds` when given, otherwise to every notification with seq
 *   <= `upToSeq` that `filter` matches, all of them without a filter).
 *   `matchesFilter()` evaluates the filter.
 *
 * `seq` is its position in the user's stream; every delivered event has a
 * larger `seq` than the one before. Switch on `kind.case`: a `state` event
 * is not a read change unless its `action` is `StateAction.READ`.
 */
export type DeliveredEvent = Event & {
  kind: Extract<Event["kind"], { case: "notification" | "updated" | "read" | "state" }>;
};

/**
 * Where the stream stands. Reported to `onState` on every change:
 * - `connecting`: a call is being opened; `attempt` counts attempts since
 *   the stream was last live (1 for the first);
 * - `live`: the backlog has been delivered (the server sent `caught_up`);
 *   `position` is the seq reached;
 * - `reconnecting`: the last attempt failed with `error`; the next starts
 *   in `delayMs` milliseconds; `attempt` is the retry number (1, 2, …) that
 *   the backoff was computed for;
 * - `stopped`: no more attempts. `error` is absent after `close()`, and set
 *   when the stream gave up: INVALID_ARGUMENT, or UNAUTHENTICATED even
 *   with a freshly requested token.
 */
export type ConnectionState =
  | { kind: "connecting"; attempt: number }
  | { kind: "live"; position: bigint }
  | { kind: "reconnecting"; attempt: number; delayMs: number; error: HeraldError }
  | { kind: "stopped"; error?: HeraldError };

/**
 * What `onResync` is told besides the new position: the epoch the stream
 * continues in, and why the old position could not be continued.
 */
export interface ResyncInfo {
  /** The stream's epoch from now on (`Event.epoch`; 0 from a server without epochs). */
  epoch: bigint;
  /**
   * Why: `Resync_Reason.EPOCH_CHANGED` (the server's history was replaced,
   * e.g. an in-memory server restarted), `PRUNED` (retention deleted the
   * events), `BEYOND_HEAD` (the position was never issued in this epoch),
   * or `UNSPECIFIED` (a server that predates reasons).
   */
  reason: Resync_Reason;
}

/** Options of `subscribe()`. Only `transport`, `getToken` and `onEvent` are required. */
export interface SubscribeOptions {
  /**
   * How to reach the server: `createHeraldTransport(url)` (grpc-web) in
   * browsers, any Connect transport elsewhere, a fake in tests.
   */
  transport: Transport;
  /** Asked for a token before every (re)connect; see `TokenProvider`. */
  getToken: TokenProvider;
  /**
   * Only notifications of these types are delivered: exact, or `prefix.*`
   * patterns. Empty or absent: all.
   */
  types?: readonly string[];
  /** Only notifications of these categories. Empty or absent: all. */
  categories?: readonly string[];
  /** Only notifications at least this severe. Absent: all. */
  minSeverity?: Severity;
  /**
   * Resume position: the `seq` of the last event this client processed (the
   * `position` of an earlier subscription). Absent: a fresh stream, whose
   * backlog is the user's unread notifications.
   */
  afterSeq?: bigint;
  /**
   * The epoch of `afterSeq` (the `epoch` of an earlier subscription), sent
   * with it so that the server can tell a position of another history
   * (answered with `resync`). Absent or 0: taken to be the server's current
   * epoch. Ignored without `afterSeq`.
   */
  epoch?: bigint;
  /**
   * Called once per notification, updated, read or state event, in seq order, never twice
   * for the same seq, never for a seq at or below the resume position.
   * An exception thrown here is reported (`reportError`) and the stream
   * goes on.
   */
  onEvent: (event: DeliveredEvent) => void;
  /**
   * Called when the server could not continue from the resume position
   * (another epoch, e.g. an in-memory server restarted; events pruned; a
   * position beyond the stream's end): what was delivered before may no
   * longer exist and events were missed, so drop what you cached and
   * refetch (`ListNotifications`, `GetUnreadCount`). The stream goes on
   * live from `position` in `info.epoch`; seqs of a new epoch start over,
   * so they may be lower than those delivered before.
   */
  onResync?: (position: bigint, info: ResyncInfo) => void;
  /** Called on every connection state change. */
  onState?: (state: ConnectionState) => void;
  /** Reconnect backoff (full jitter), in ms. Defaults: base 500, max 30 000. */
  backoff?: BackoffOptions;
  /**
   * The heartbeat interval assumed until the server states its own (in
   * `caught_up`, which servers with epochs send), in ms. Default 15 000.
   * From the first `caught_up` that carries one, the server's interval is
   * used, also for later reconnects.
   */
  heartbeatIntervalMs?: number;
  /**
   * A stream (or a connection attempt) that receives nothing for
   * heartbeat interval × `watchdogMultiplier` ms is aborted and reopened.
   * Default 2; must be > 1.
   */
  watchdogMultiplier?: number;
  /** Uniform random numbers in `[0, 1)` for the jitter. Default `Math.random`. */
  random?: () => number;
}

/** Stream timing with defaults applied, in ms. */
export interface StreamTiming {
  /** Reconnect backoff. */
  backoff: ResolvedBackoff;
  /** The heartbeat interval assumed until the server states its own. */
  heartbeatIntervalMs: number;
  /** The watchdog allows this many heartbeat intervals of silence. */
  watchdogMultiplier: number;
  /** Silence after which a stream is aborted and reopened (until the server states its interval). */
  watchdogMs: number;
}

/**
 * Applies the defaults of `backoff`, `heartbeatIntervalMs` and
 * `watchdogMultiplier`, and validates them: throws `RangeError` for a
 * non-positive interval, a multiplier <= 1, or bad backoff settings.
 */
export function resolveStreamTiming(
  options: Pick<SubscribeOptions, "backoff" | "heartbeatIntervalMs" | "watchdogMultiplier">,
): StreamTiming {
  const backoff = resolveBackoff(options.backoff);
  const heartbeatIntervalMs = options.heartbeatIntervalMs ?? DEFAULT_HEARTBEAT_INTERVAL_MS;
  const multiplier = options.watchdogMultiplier ?? DEFAULT_WATCHDOG_MULTIPLIER;
  if (!Number.isFinite(heartbeatIntervalMs) || heartbeatIntervalMs <= 0) {
    throw new RangeError(`heartbeatIntervalMs must be a positive number of milliseconds, got ${heartbeatIntervalMs}`);
  }
  if (!Number.isFinite(multiplier) || multiplier <= 1) {
    throw new RangeError(`watchdogMultiplier must be > 1, got ${multiplier}`);
  }
  return {
    backoff,
    heartbeatIntervalMs,
    watchdogMultiplier: multiplier,
    watchdogMs: heartbeatIntervalMs * multiplier,
  };
}

/** A running subscription, as returned by `subscribe()`. */
export interface Subscription {
  /** Stops the stream for good (idempotent). State becomes `stopped` without error. */
  close(): void;
  /**
   * The resume position: the seq of the last event received (including
   * `caught_up` and `heartbeat` positions, which matter with a `types`
   * filter). `undefined` until the first event of a fresh stream.
   * Persist it with `epoch` to resume later (`afterSeq`, `epoch`).
   */
  readonly position: bigint | undefined;
  /**
   * The epoch `position` counts in (`Event.epoch` of the last event).
   * `undefined` until the first event, and with a server without epochs.
   */
  readonly epoch: bigint | undefined;
  /**
   * The heartbeat interval the watchdog follows, in ms: the server's (from
   * `caught_up`) once stated, the option or default before.
   */
  readonly heartbeatIntervalMs: number;
  /** The current connection state. */
  readonly state: ConnectionState;
  /** Resolves with the final `stopped` state once the stream has stopped. */
  readonly done: Promise<Extract<ConnectionState, { kind: "stopped" }>>;
}

/**
 * Opens the token user's event stream and keeps it open until `close()`.
 *
 * - Reconnects after any failure with exponential backoff and full jitter,
 *   resuming with `after_seq` and `epoch` = the last position seen, so
 *   nothing is missed; a position the server cannot continue gets
 *   `onResync`, and the stream goes on from the server's new position.
 * - Never delivers an event whose seq is at or below the last one delivered
 *   (in the same epoch).
 * - Aborts and reopens a stream silent for longer than the heartbeat
 *   interval × `watchdogMultiplier`, where the interval is the one the
 *   server states in `caught_up` (before that, `heartbeatIntervalMs`).
 * - Asks `getToken` for a token on every (re)connect. On UNAUTHENTICATED it
 *   asks once more with `forceRefresh: true` and retries at once; if that
 *   is refused too, it stops with the error.
 * - Stops on INVALID_ARGUMENT (e.g. a resume position beyond the stream's
 *   end, after the server's data was reset): retrying cannot help.
 *
 * Throws `RangeError` synchronously on invalid options; every later failure
 * is reported through `onState`.
 */
export function subscribe(options: SubscribeOptions): Subscription {
  const timing = resolveStreamTiming(options);
  const { backoff } = timing;
  /** The server's interval once `caught_up` has stated it, the option's before. */
  let heartbeatIntervalMs = timing.heartbeatIntervalMs;
  let watchdogMs = timing.watchdogMs;
  const random = options.random ?? Math.random;
  const types = [...(options.types ?? [])];
  const categories = [...(options.categories ?? [])];
  const minSeverity = options.minSeverity ?? Severity.UNSPECIFIED;
  const client = createClient(Notifications, options.transport);

  let position: bigint | undefined = options.afterSeq;
  let epoch: bigint | undefined =
    options.afterSeq !== undefined && options.epoch !== undefined && options.epoch !== 0n
      ? options.epoch
      : undefined;
  let state: ConnectionState = { kind: "connecting", attempt: 1 };
  let closed = false;
  /** Aborts the current call, or the current backoff sleep. */
  let current: AbortController | undefined;
  let resolveDone!: (s: Extract<ConnectionState, { kind: "stopped" }>) => void;
  const done = new Promise<Extract<ConnectionState, { kind: "stopped" }>>((r) => {
    resolveDone = r;
  });

  const setState = (next: ConnectionState): void => {
    state = next;
    if (options.onState) guard(() => options.onState?.(next));
    if (next.kind === "stopped") resolveDone(next);
  };

  /** Moves the position forward to a control event's seq, and takes its epoch. */
  const advance = (event: Event): void => {
    if (position === undefined || event.seq > position) position = event.seq;
    if (event.epoch !== 0n) epoch = event.epoch;
  };

  /** Follows the interval the server states in `caught_up`, if it does. */
  const followHeartbeat = (event: Event): void => {
    if (event.kind.case !== "caughtUp") return;
    const interval = event.kind.value.heartbeatInterval;
    if (!interval) return; // a server that predates it
    const ms = Number(interval.seconds) * 1000 + Math.floor(interval.nanos / 1_000_000);
    if (!Number.isFinite(ms) || ms <= 0) return;
    heartbeatIntervalMs = ms;
    watchdogMs = ms * timing.watchdogMultiplier;
  };

  const run = async (): Promise<void> => {
    let failures = 0; // consecutive failed attempts since the stream was last live
    let refreshedAfterAuthError = false;
    let forceRefresh = false;
    let delayMs = 0;
    let lastError: HeraldError | undefined;

    while (!closed) {
      if (lastError) {
        setState({ kind: "reconnecting", attempt: failures, delayMs, error: lastError });
        if (!(await sleep(delayMs))) return;
      }
      setState({ kind: "connecting", attempt: failures + 1 });

      const controller = new AbortController();
      current = controller;
      let silent = false;
      let watchdog: ReturnType<typeof setTimeout> | undefined;
      const arm = (): void => {
        if (watchdog !== undefined) clearTimeout(watchdog);
        watchdog = setTimeout(() => {
          silent = true;
          controller.abort();
        }, watchdogMs);
      };

      let error: HeraldError;
      try {
        arm();
        let token: string | null | undefined;
        try {
          token = await options.getToken({ forceRefresh });
        } catch (e) {
          throw new HeraldError(Code.Unknown, `token provider failed: ${describe(e)}`, { cause: e });
        }
        forceRefresh = false;
        if (closed) return;
        const request = create(SubscribeRequestSchema, { types, categories, minSeverity });
        if (position !== undefined) {
          request.afterSeq = position;
          if (epoch !== undefined) request.epoch = epoch;
        }
        const stream = client.subscribe(request, {
          signal: controller.signal,
          headers: authHeaders(token),
          timeoutMs: 0,
        });
        for await (const event of stream) {
          arm();
          if (closed) return;
          switch (event.kind.case) {
            case "notification":
            case "updated":
            case "read":
            case "state":
              if (position !== undefined && event.seq <= position) break; // already delivered
              position = event.seq;
              if (event.epoch !== 0n) epoch = event.epoch;
              guard(() => options.onEvent(event as DeliveredEvent));
              break;
            case "caughtUp":
              advance(event);
              followHeartbeat(event);
              arm(); // with the server's interval from now on
              failures = 0;
              refreshedAfterAuthError = false;
              setState({ kind: "live", position: position ?? event.seq });
              break;
            case "heartbeat":
              advance(event);
              break;
            case "resync": {
              // The server's position replaces ours, even when lower: the
              // old one is of a history the server no longer continues.
              position = event.seq;
              if (event.epoch !== 0n) epoch = event.epoch;
              const info: ResyncInfo = { epoch: event.epoch, reason: event.kind.value.reason };
              if (options.onResync) guard(() => options.onResync?.(event.seq, info));
              break;
            }
            default:
              // A kind this client does not know: ignored, and not counted
              // as a position, so an upgraded client can still replay it.
              break;
          }
        }
        throw new HeraldError(Code.Unavailable, "the server ended the stream");
      } catch (e) {
        if (closed) return;
        error = silent
          ? new HeraldError(Code.DeadlineExceeded, `no event for ${watchdogMs} ms (heartbeat watchdog)`)
          : toHeraldError(e);
      } finally {
        if (watchdog !== undefined) clearTimeout(watchdog);
        controller.abort();
      }

      failures += 1;
      lastError = error;
      switch (classifyError(error)) {
        case "stop":
          setState({ kind: "stopped", error });
          return;
        case "refresh-token":
          if (refreshedAfterAuthError) {
            setState({ kind: "stopped", error });
            return;
          }
          refreshedAfterAuthError = true;
          forceRefresh = true;
          delayMs = 0;
          lastError = undefined; // retry at once, as a plain "connecting"
          break;
        case "retry":
          delayMs = backoffDelay(failures, backoff, random);
          break;
      }
    }
  };

  /** Waits `ms`; false when closed meanwhile. */
  const sleep = (ms: number): Promise<boolean> =>
    new Promise((resolve) => {
      const controller = new AbortController();
      current = controller;
      const timer = setTimeout(() => resolve(!closed), ms);
      controller.signal.addEventListener("abort", () => {
        clearTimeout(timer);
        resolve(false);
      });
    });

  // Start on a microtask, so that callbacks never run before subscribe()
  // has returned the handle.
  Promise.resolve()
    .then(run)
    .catch((e: unknown) => {
      // Not expected: every failure inside run() is handled. Stop visibly.
      if (!closed) {
        closed = true;
        setState({ kind: "stopped", error: toHeraldError(e) });
      }
    });

  return {
    close(): void {
      if (closed) return;
      closed = true;
      current?.abort();
      setState({ kind: "stopped" });
    },
    get position() {
      return position;
    },
    get epoch() {
      return epoch;
    },
    get heartbeatIntervalMs() {
      return heartbeatIntervalMs;
    },
    get state() {
      return state;
    },
    done,
  };
}

/** Runs an application callback; its exception must not break the stream. */
function guard(callback: () => void): void {
  try {
    callback();
  } catch (e) {
    const report = (globalThis as { reportError?: (e: unknown) => void }).reportError;
    if (typeof report === "function") report(e);
    else
      queueMicrotask(() => {
        throw e;
      });
  }
}

function describe(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}
