/**
 * `createInbox()`: a framework-free, live inbox model on top of
 * `subscribe()` — the notification list, the unread count, the connection
 * state — with mark-read actions. `useNotifications()` (React) is a thin
 * wrapper around it; other frameworks can bind to `onChange`/`getSnapshot`.
 */
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { HeraldClient } from "./client.js";
import { HeraldError, toHeraldError } from "./errors.js";
import { Severity, type Notification, type Resync_Reason } from "./gen/herald/v1/herald_pb.js";
import {
  resolveStreamTiming,
  type ConnectionState,
  type DeliveredEvent,
  type ResyncInfo,
  type SubscribeOptions,
  type Subscription,
} from "./subscribe.js";

/** A notification as the inbox shows it. */
export interface InboxItem {
  /** Server-assigned id, unique across the deployment. */
  readonly id: bigint;
  /** Position in the user's stream; newer notifications have larger seqs. */
  readonly seq: bigint;
  /** Dotted type chosen by the sender, e.g. `project.created`. */
  readonly type: string;
  /** Headline, plain text. */
  readonly title: string;
  /** Body, plain text; may be empty. */
  readonly body: string;
  /** Application data: the JSON text of an object (`{}` when none). */
  readonly data: string;
  /** When the server stored it; undefined if the server sent no time. */
  readonly createdAt: Date | undefined;
  /** Whether the user has marked it read (on any device). */
  readonly read: boolean;
  /** The sender's grouping, e.g. `billing`; empty when none. */
  readonly category: string;
  /** How urgent it is (`Severity.NORMAL` unless the sender said otherwise). */
  readonly severity: Severity;
  /** Who or what caused it (the sender's `actor`, or the sending service). */
  readonly actor: string;
  /** Where opening it leads (an http(s) URL or a path on the app's origin); empty when none. */
  readonly actionUrl: string;
  /** Buttons to show with it, in order: `{ label, url }`. */
  readonly actions: readonly { readonly label: string; readonly url: string }[];
}

/** The inbox's latest `resync`: when the stream could not be continued and the inbox was refetched. */
export interface InboxResync {
  /** Why (see `ResyncInfo.reason`). */
  readonly reason: Resync_Reason;
  /** The stream's epoch from then on. */
  readonly epoch: bigint;
  /** When the inbox received it (client clock). */
  readonly at: Date;
  /** True until the refetch it started has been applied (or has failed; see `error`). */
  readonly refetching: boolean;
}

/**
 * An immutable view of the inbox. A new object after every change, the same
 * object while nothing changed (as `useSyncExternalStore` requires).
 */
export interface InboxSnapshot {
  /** Newest first (by seq). */
  readonly notifications: readonly InboxItem[];
  /**
   * How many notifications are unread: those in `notifications`, plus,
   * after a `resync` that found more than 10,000 unread, the server's count
   * of those not listed.
   */
  readonly unreadCount: number;
  /** True while the stream is live (past its backlog). */
  readonly connected: boolean;
  /** The stream's connection state. */
  readonly status: ConnectionState;
  /**
   * The latest problem: the stream's error while reconnecting or stopped,
   * or a failed action (mark read, refetch). Cleared when the stream goes
   * live again or the next action succeeds.
   */
  readonly error: HeraldError | undefined;
  /**
   * The latest `resync`, undefined if there was none. On a resync the inbox
   * drops everything it showed (it may no longer exist, e.g. after an
   * in-memory server restarted) and refetches the list and the count.
   */
  readonly lastResync: InboxResync | undefined;
}

/** Options of `createInbox()`. */
export interface InboxOptions
  extends Pick<SubscribeOptions, "backoff" | "heartbeatIntervalMs" | "watchdogMultiplier" | "random"> {
  /** The client to subscribe and call through. */
  client: HeraldClient;
  /** Only notifications of these types. Empty or absent: all. */
  types?: readonly string[];
  /**
   * How many recent notifications (read or not) to load before subscribing,
   * 0 to 500. Default 20. With 0 the list starts with the unread
   * notifications only.
   */
  historySize?: number;
}

/** A live inbox, as returned by `createInbox()`. */
export interface Inbox {
  /** The current snapshot. */
  getSnapshot(): InboxSnapshot;
  /**
   * Calls `listener` after changes (coalesced per microtask). Returns the
   * function that removes it.
   */
  onChange(listener: () => void): () => void;
  /**
   * Marks these notifications read. Resolves once the server has stored it
   * (the list and count are updated then, and on the user's other devices
   * through their streams). Rejects with a `HeraldError` (also shown in
   * `error`).
   */
  markRead(ids: readonly bigint[]): Promise<void>;
  /**
   * Marks every notification in the list read: by position (`up_to_seq` =
   * the newest seq shown) without a `types` filter, by ids with one (so
   * notifications of other types stay unread). Resolves/rejects like
   * `markRead`.
   */
  markAllRead(): Promise<void>;
  /** Closes the stream; the snapshot stays as it was, with status `stopped`. */
  close(): void;
}

/** Default number of recent notifications loaded at start. */
export const DEFAULT_HISTORY_SIZE = 20;
/** Page size used to refetch the unread notifications after a `resync`. */
const RESYNC_PAGE_SIZE = 500;
/** At most this many pages are refetched after a `resync` (10,000 notifications). */
const RESYNC_MAX_PAGES = 20;
/** Attempts of a `resync` refetch, 1 s apart. */
const RESYNC_ATTEMPTS = 3;
/** Largest `MarkRead` id list the server accepts. */
const MAX_IDS_PER_CALL = 1000;

/**
 * Starts a live inbox: loads the `historySize` most recent notifications,
 * then subscribes (fresh, so the backlog is exactly the unread ones) and
 * keeps the list and the unread count in step with the stream: new
 * notifications, read changes from any device, reconnects (resumed without
 * loss or duplicates) and `resync` (everything is dropped and refetched: the
 * recent notifications, every unread one, the unread count).
 *
 * The unread count is exact: the list always holds every unread
 * notification (of the `types`, when filtered). Read ones stay in the list.
 *
 * Throws `RangeError` on an invalid `historySize` or stream option.
 */
export function createInbox(options: InboxOptions): Inbox {
  const { client } = options;
  const historySize = options.historySize ?? DEFAULT_HISTORY_SIZE;
  if (!Number.isInteger(historySize) || historySize < 0 || historySize > 500) {
    throw new RangeError(`historySize must be an integer from 0 to 500, got ${historySize}`);
  }
  const types = [...(options.types ?? [])];
  const wanted = (type: string): boolean => types.length === 0 || types.includes(type);

  const items = new Map<bigint, InboxItem>();
  /** Everything with seq <= this is read (the largest `up_to_seq` seen). */
  let readUpTo = 0n;
  let status: ConnectionState = { kind: "connecting", attempt: 1 };
  let error: HeraldError | undefined;
  let closed = false;
  let subscription: Subscription | undefined;

  /** History ids awaiting the first `caught_up`; see `reconcileHistory`. */
  let history: Set<bigint> | undefined;
  /** Ids delivered before the first `caught_up`. */
  const seenBeforeLive = new Set<bigint>();

  /** While a resync refetch runs: stream events held back, applied after it. */
  let held: DeliveredEvent[] | undefined;
  let resyncGeneration = 0;
  let lastResync: InboxResync | undefined;
  /**
   * Unread notifications the list does not hold: after a resync whose
   * refetch stopped at `RESYNC_MAX_PAGES`, the server's count minus the
   * unread ones listed. They are older than every listed one.
   */
  let unlisted = 0;

  let snapshot: InboxSnapshot | undefined;
  const listeners = new Set<() => void>();
  let emitScheduled = false;
  const changed = (): void => {
    snapshot = undefined;
    if (emitScheduled) return;
    emitScheduled = true;
    queueMicrotask(() => {
      emitScheduled = false;
      for (const listener of [...listeners]) listener();
    });
  };

  const put = (n: Notification, read: boolean): void => {
    if (!wanted(n.type)) return;
    const known = items.get(n.id);
    items.set(n.id, {
      id: n.id,
      seq: n.seq,
      type: n.type,
      title: n.title,
      body: n.body,
      data: n.data,
      createdAt: n.createdAt ? timestampDate(n.createdAt) : undefined,
      // Read state only ever goes from unread to read.
      read: read || (known?.read ?? false) || n.seq <= readUpTo,
      category: n.category,
      // A server that predates severities sends none: normal.
      severity: n.severity === Severity.UNSPECIFIED ? Severity.NORMAL : n.severity,
      actor: n.actor,
      actionUrl: n.actionUrl,
      actions: n.actions.map((a) => ({ label: a.label, url: a.url })),
    });
  };

  const markLocally = (ids: Iterable<bigint>, upToSeq: bigint): void => {
    if (upToSeq > readUpTo) readUpTo = upToSeq;
    for (const id of ids) {
      const item = items.get(id);
      if (item && !item.read) items.set(id, { ...item, read: true });
      else if (!item && unlisted > 0) unlisted -= 1; // one of those not listed
    }
    if (upToSeq > 0n) {
      let oldest: bigint | undefined;
      for (const [id, item] of items) {
        if (oldest === undefined || item.seq < oldest) oldest = item.seq;
        if (!item.read && item.seq <= upToSeq) items.set(id, { ...item, read: true });
      }
      // The unlisted ones are older than anything listed.
      if (oldest !== undefined && upToSeq >= oldest) unlisted = 0;
    }
  };

  const apply = (event: DeliveredEvent): void => {
    if (event.kind.case === "notification") {
      const n = event.kind.value;
      if (history) seenBeforeLive.add(n.id);
      put(n, false);
    } else {
      markLocally(event.kind.value.notificationIds, event.kind.value.upToSeq);
    }
  };

  /**
   * At the first `caught_up` of the fresh stream: the history was read
   * before the stream started, and the fresh backlog is every notification
   * unread at that later moment; so a history item the backlog did not
   * bring has been read since.
   */
  const reconcileHistory = (): void => {
    if (!history) return;
    for (const id of history) {
      if (!seenBeforeLive.has(id)) markLocally([id], 0n);
    }
    history = undefined;
    seenBeforeLive.clear();
  };

  const onEvent = (event: DeliveredEvent): void => {
    if (held) {
      held.push(event);
      return;
    }
    apply(event);
    changed();
  };

  const onState = (state: ConnectionState): void => {
    status = state;
    if (state.kind === "live") {
      reconcileHistory();
      error = undefined;
    } else if (state.kind === "reconnecting" || state.kind === "stopped") {
      if (state.error) error = state.error;
    }
    changed();
  };

  /** The unread notifications, all pages up to `RESYNC_MAX_PAGES`; `complete` unless cut there. */
  const fetchUnread = async (): Promise<{ unread: Notification[]; complete: boolean }> => {
    const unread: Notification[] = [];
    let pageToken = "";
    for (let page = 0; page < RESYNC_MAX_PAGES; page++) {
      const response = await client.list({ unreadOnly: true, pageSize: RESYNC_PAGE_SIZE, pageToken });
      unread.push(...response.notifications);
      pageToken = response.nextPageToken;
      if (!pageToken) return { unread, complete: true };
    }
    return { unread, complete: false };
  };

  /**
   * The stream could not be continued: what the inbox shows may be of a
   * history the server no longer has (a restarted in-memory server, a
   * restored database) and events were missed. Drop it all, then refetch
   * as at start: the recent notifications (read or not), every unread one,
   * and the unread count. Stream events that arrive meanwhile are held back
   * and applied after the refetch.
   */
  const onResync = (_position: bigint, info: ResyncInfo): void => {
    const generation = ++resyncGeneration;
    items.clear();
    readUpTo = 0n;
    unlisted = 0;
    history = undefined;
    seenBeforeLive.clear();
    held = [];
    lastResync = { reason: info.reason, epoch: info.epoch, at: new Date(), refetching: true };
    changed();
    void (async () => {
      let lastError: HeraldError | undefined;
      for (let attempt = 1; attempt <= RESYNC_ATTEMPTS; attempt++) {
        try {
          const [recent, { unread, complete }, count] = await Promise.all([
            historySize > 0 ? client.list({ pageSize: historySize }) : undefined,
            fetchUnread(),
            client.unreadCount(),
          ]);
          if (generation !== resyncGeneration || closed) return;
          for (const n of recent?.notifications ?? []) put(n, n.read);
          for (const n of unread) put(n, false);
          // More unread than were fetched: count the rest (the server's
          // count is of every type, so only without a types filter).
          if (!complete && types.length === 0) {
            unlisted = Math.max(0, Number(count.unread) - unread.length);
          }
          lastError = undefined;
          break;
        } catch (e) {
          lastError = toHeraldError(e);
          if (attempt < RESYNC_ATTEMPTS) await new Promise((r) => setTimeout(r, 1000));
          if (generation !== resyncGeneration || closed) return;
        }
      }
      if (lastError) error = lastError;
      if (lastResync) lastResync = { ...lastResync, refetching: false };
      // Events that arrived during the refetch are newer than (or already
      // part of) what it returned; applying them again is harmless.
      const pending = held ?? [];
      held = undefined;
      for (const event of pending) apply(event);
      changed();
    })();
  };

  const start = async (): Promise<void> => {
    if (historySize > 0) {
      try {
        const page = await client.list({ pageSize: historySize });
        history = new Set();
        for (const n of page.notifications) {
          if (!wanted(n.type)) continue;
          put(n, n.read);
          history.add(n.id);
        }
        changed();
      } catch (e) {
        // The stream below reports the same problem (or works anyway).
        error = toHeraldError(e);
        changed();
      }
    }
    if (closed) return;
    const streamOptions: Parameters<HeraldClient["subscribe"]>[0] = {
      types,
      onEvent,
      onState,
      onResync,
    };
    if (options.backoff) streamOptions.backoff = options.backoff;
    if (options.heartbeatIntervalMs !== undefined) streamOptions.heartbeatIntervalMs = options.heartbeatIntervalMs;
    if (options.watchdogMultiplier !== undefined) streamOptions.watchdogMultiplier = options.watchdogMultiplier;
    if (options.random) streamOptions.random = options.random;
    subscription = client.subscribe(streamOptions);
  };

  const act = async (call: () => Promise<void>): Promise<void> => {
    try {
      await call();
      error = undefined;
      changed();
    } catch (e) {
      error = toHeraldError(e);
      changed();
      throw error;
    }
  };

  // Validate the stream options now, as documented, not inside start().
  resolveStreamTiming(options);
  void start();

  return {
    getSnapshot() {
      if (!snapshot) {
        const notifications = [...items.values()].sort((a, b) =>
          a.seq === b.seq ? 0 : a.seq > b.seq ? -1 : 1,
        );
        snapshot = {
          notifications,
          unreadCount: notifications.reduce((count, n) => count + (n.read ? 0 : 1), unlisted),
          connected: status.kind === "live",
          status,
          error,
          lastResync,
        };
      }
      return snapshot;
    },
    onChange(listener) {
      listeners.add(listener);
      return () => {
        listeners.delete(listener);
      };
    },
    markRead(ids) {
      return act(async () => {
        for (let i = 0; i < ids.length; i += MAX_IDS_PER_CALL) {
          const chunk = ids.slice(i, i + MAX_IDS_PER_CALL);
          await client.markRead(chunk);
          markLocally(chunk, 0n);
        }
      });
    },
    markAllRead() {
      return act(async () => {
        if (types.length > 0) {
          const unread = [...items.values()].filter((n) => !n.read).map((n) => n.id);
          for (let i = 0; i < unread.length; i += MAX_IDS_PER_CALL) {
            const chunk = unread.slice(i, i + MAX_IDS_PER_CALL);
            await client.markRead(chunk);
            markLocally(chunk, 0n);
          }
          return;
        }
        let newest = 0n;
        for (const item of items.values()) if (item.seq > newest) newest = item.seq;
        if (newest === 0n) return;
        await client.markAllRead(newest);
        markLocally([], newest);
      });
    },
    close() {
      if (closed) return;
      closed = true;
      subscription?.close();
      if (!subscription) {
        status = { kind: "stopped" };
        changed();
      }
    },
  };
}
