/**
 * `createInbox()`: a framework-free, live inbox model on top of
 * `subscribe()` — the notification list, the unread and unseen counts, the
 * connection state — with the state-change actions (read, unread, seen,
 * archive, unarchive, delete). `useNotifications()` (React) is a thin
 * wrapper around it; other frameworks can bind to `onChange`/`getSnapshot`.
 */
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type { HeraldClient, UnreadFilterOptions } from "./client.js";
import { HeraldError, toHeraldError } from "./errors.js";
import { filterFields, isFilterEmpty, matchesFilter, type FilterOptions } from "./filter.js";
import {
  Severity,
  StateAction,
  type GetUnreadCountResponse,
  type ListNotificationsResponse,
  type Notification,
  type NotificationFilter,
  type Resync_Reason,
} from "./gen/herald/v1/herald_pb.js";
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
  /**
   * When it was read; undefined while unread. The server's time when it
   * came from a listing; the client's clock when the inbox learnt of it
   * from the stream (events carry no times).
   */
  readonly readAt: Date | undefined;
  /**
   * Whether the user has seen it: the bell was opened while it was there
   * (`markAllSeen`), or it was read. Seen is not read; unread does not
   * make it unseen again.
   */
  readonly seen: boolean;
  /** When it was first seen (or read); undefined while unseen. Clock as for `readAt`. */
  readonly seenAt: Date | undefined;
  /**
   * When it was archived: always undefined in the inbox (archiving removes
   * it); set on items made by `toInboxItem()` from an archived listing
   * (`client.list({ archived: true })`).
   */
  readonly archivedAt: Date | undefined;
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
  /** The sender's `replace_key` (updates replace this item in place); empty when none. */
  readonly replaceKey: string;
  /** The sender's `group_key`; empty when none. */
  readonly groupKey: string;
  /** With a group key: how many sends it holds (1 until another folds in); 0 without. */
  readonly groupCount: number;
  /** With a group key: its distinct actors, newest first (at most 5), e.g. for "Alice and 3 others". */
  readonly actors: readonly string[];
}

/**
 * A notification message (from `client.list()`, or a stream event) as an
 * `InboxItem`, with the state it carries: current in a listing, unread and
 * unseen in a stream event (events carry no state).
 */
export function toInboxItem(n: Notification): InboxItem {
  const readAt = n.readAt ? timestampDate(n.readAt) : undefined;
  // Reading implies seeing; a server that predates `seen_at` sends `read_at` only.
  const seenAt = n.seenAt ? timestampDate(n.seenAt) : readAt;
  return {
    id: n.id,
    seq: n.seq,
    type: n.type,
    title: n.title,
    body: n.body,
    data: n.data,
    createdAt: n.createdAt ? timestampDate(n.createdAt) : undefined,
    read: n.read,
    readAt,
    seen: n.read || seenAt !== undefined,
    seenAt,
    archivedAt: n.archivedAt ? timestampDate(n.archivedAt) : undefined,
    category: n.category,
    // A server that predates severities sends none: normal.
    severity: n.severity === Severity.UNSPECIFIED ? Severity.NORMAL : n.severity,
    actor: n.actor,
    actionUrl: n.actionUrl,
    actions: n.actions.map((a) => ({ label: a.label, url: a.url })),
    replaceKey: n.replaceKey,
    groupKey: n.groupKey,
    groupCount: n.groupCount,
    actors: [...n.actors],
  };
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
  /** Newest first (by seq). Archived and deleted notifications are not in it. */
  readonly notifications: readonly InboxItem[];
  /**
   * How many notifications are unread: those in `notifications`, plus,
   * after a refetch that found more than 10,000 unread, the server's count
   * of those not listed.
   */
  readonly unreadCount: number;
  /**
   * How many are neither seen nor read (the bell badge of apps that clear
   * it when the bell opens: `markAllSeen`): those in `notifications`, plus,
   * after a refetch that found more than 10,000 unread (without a filter),
   * the server's `unseen` count of those not listed.
   */
  readonly unseenCount: number;
  /** The named unread counts asked for (`InboxOptions.counts`), by name. */
  readonly counts: Readonly<Record<string, number>>;
  /** True while the stream is live (past its backlog). */
  readonly connected: boolean;
  /** The stream's connection state. */
  readonly status: ConnectionState;
  /**
   * The latest problem: the stream's error while reconnecting or stopped,
   * or a failed action (mark read, archive, …, refetch). Cleared when the
   * stream goes live again or the next action succeeds.
   */
  readonly error: HeraldError | undefined;
  /**
   * The latest `resync`, undefined if there was none. On a resync the inbox
   * drops everything it showed (it may no longer exist, e.g. after an
   * in-memory server restarted) and refetches the list and the counts.
   */
  readonly lastResync: InboxResync | undefined;
}

/**
 * Options of `createInbox()`. The filter (`types`, `categories`,
 * `minSeverity`) is the server's: it is sent with every listing, the
 * stream and the count, and the inbox holds only what it matches.
 */
export interface InboxOptions
  extends FilterOptions,
    Pick<SubscribeOptions, "backoff" | "heartbeatIntervalMs" | "watchdogMultiplier" | "random"> {
  /** The client to subscribe and call through. */
  client: HeraldClient;
  /**
   * How many recent notifications (read or not) to load before subscribing,
   * 0 to 500. Default 20. With 0 the list holds the unread notifications
   * only (and those that arrive).
   */
  historySize?: number;
  /**
   * Named unread counts to keep live (a badge per category, say): each
   * `{ name, types, categories, minSeverity }` counts the unread
   * notifications of the list its filter matches (see `matchesFilter`), in
   * `InboxSnapshot.counts` under its name. The list holds every unread
   * notification (up to 10,000), so they are exact below that; the server's
   * snapshot of the same is `client.unreadCount(filters)`.
   */
  counts?: readonly UnreadFilterOptions[];
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
   * (the list and counts are updated then, and on the user's other devices
   * through their streams). Rejects with a `HeraldError` (also shown in
   * `error`). The other actions by ids resolve and reject the same way.
   */
  markRead(ids: readonly bigint[]): Promise<void>;
  /**
   * Marks every notification in the list read: by position (`up_to_seq` =
   * the newest seq shown) without a filter, by ids with one (so
   * notifications the filter leaves out stay unread). Resolves/rejects like
   * `markRead`.
   */
  markAllRead(): Promise<void>;
  /** Marks these notifications unread (they stay seen). */
  markUnread(ids: readonly bigint[]): Promise<void>;
  /** Marks these notifications seen (not read). */
  markSeen(ids: readonly bigint[]): Promise<void>;
  /**
   * Marks every notification in the list seen — call it when the bell
   * opens; `unseenCount` drops to 0. By position or by ids, as
   * `markAllRead`.
   */
  markAllSeen(): Promise<void>;
  /** Archives these notifications: they leave the list and the counts. */
  archive(ids: readonly bigint[]): Promise<void>;
  /**
   * Brings archived notifications back into the inbox. They appear once
   * the stream has brought the change and the refetch it starts has
   * returned (the inbox does not hold archived notifications).
   */
  unarchive(ids: readonly bigint[]): Promise<void>;
  /** Deletes these notifications for good: they leave the list and the counts. */
  delete(ids: readonly bigint[]): Promise<void>;
  /** Closes the stream; the snapshot stays as it was, with status `stopped`. */
  close(): void;
}

/** Default number of recent notifications loaded at start. */
export const DEFAULT_HISTORY_SIZE = 20;
/** Page size used to fetch the unread notifications (at start, and in a refetch). */
const UNREAD_PAGE_SIZE = 500;
/** At most this many pages of unread notifications are fetched (10,000 notifications). */
const UNREAD_MAX_PAGES = 20;
/** Attempts of a refetch, 1 s apart. */
const REFETCH_ATTEMPTS = 3;
/** Largest id list `MarkRead` and `UpdateState` accept. */
const MAX_IDS_PER_CALL = 1000;

/**
 * A state change, from the stream (`read`, `state`) or from an action: the
 * notifications `ids` when given, otherwise those with seq <= `upToSeq`
 * that `filter` matches (all without one).
 */
interface Change {
  action: StateAction;
  ids: readonly bigint[];
  upToSeq: bigint;
  filter: NotificationFilter | FilterOptions | undefined;
}

/** What a load fetched: the newest notifications, the unread ones, and (in a refetch) the counts. */
interface Loaded {
  recent: ListNotificationsResponse | undefined;
  unread: Notification[];
  /** False when the unread ones were cut at `UNREAD_MAX_PAGES`. */
  complete: boolean;
  count: GetUnreadCountResponse | undefined;
}

/**
 * Starts a live inbox: loads the `historySize` most recent notifications
 * and every unread one (with their read and seen state), then subscribes
 * (fresh, so the backlog is exactly the unread ones) and keeps the list and
 * the counts in step with the stream: new notifications, state changes from
 * any device (read, unread, seen, archive, unarchive, delete — by ids, up
 * to a seq, or by filter), reconnects (resumed without loss or duplicates)
 * and `resync` (everything is dropped and refetched).
 *
 * The unread count is exact: the list always holds every unread
 * notification (of the filter, when given). Read ones stay in the list;
 * archived and deleted ones leave it. A change the list cannot apply on its
 * own — unarchive, unread of notifications it does not hold, an action
 * this client does not know — refetches and merges, holding stream events
 * back meanwhile.
 *
 * Throws `RangeError` on an invalid `historySize` or stream option.
 */
export function createInbox(options: InboxOptions): Inbox {
  const { client } = options;
  const historySize = options.historySize ?? DEFAULT_HISTORY_SIZE;
  if (!Number.isInteger(historySize) || historySize < 0 || historySize > 500) {
    throw new RangeError(`historySize must be an integer from 0 to 500, got ${historySize}`);
  }
  const filter = filterFields(options);
  const filtered = !isFilterEmpty(filter);

  const items = new Map<bigint, InboxItem>();
  let status: ConnectionState = { kind: "connecting", attempt: 1 };
  let error: HeraldError | undefined;
  let closed = false;
  let subscription: Subscription | undefined;

  /**
   * Until the first `caught_up`: the stream is delivering the fresh
   * backlog, so a notification event means "unread now".
   */
  let beforeLive = true;
  /** Ids loaded unread before the stream opened, awaiting the first `caught_up`; see `reconcileLoaded`. */
  let loadedUnread: Set<bigint> | undefined;
  /** Ids delivered before the first `caught_up`. */
  const backlog = new Set<bigint>();
  /**
   * Events after this seq reach `onEvent`; those at or below it were
   * folded into the fresh backlog or a resync's refetch instead. Set at
   * the first `caught_up` and at each `resync`.
   */
  let liveFrom: bigint | undefined;

  /** While a refetch runs: stream events held back, applied after it. */
  let held: DeliveredEvent[] | undefined;
  let refetchGeneration = 0;
  let refetching = false;
  /** A refetch was asked for while one ran: run another after it. */
  let refetchAgain = false;
  let lastResync: InboxResync | undefined;
  /**
   * Unread notifications the list does not hold: after a refetch that
   * stopped at `UNREAD_MAX_PAGES`, the server's count minus the unread ones
   * listed. They are older than every listed one. `unlistedUnseen`: those
   * of them unseen (known without a filter only).
   */
  let unlisted = 0;
  let unlistedUnseen = 0;

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

  /** A notification from a listing: its state there is the newest known. */
  const putListed = (n: Notification): void => {
    const item = toInboxItem(n);
    if (matchesFilter(filter, item)) items.set(item.id, item);
  };

  /**
   * A notification from the stream, which carries no state: a new one is
   * unread and unseen; a known one keeps its state, except that the fresh
   * backlog lists exactly the notifications unread now.
   */
  const putDelivered = (n: Notification): void => {
    const known = items.get(n.id);
    if (!known) {
      const item = toInboxItem(n);
      if (matchesFilter(filter, item)) items.set(item.id, item);
    } else if (beforeLive && known.read) {
      items.set(known.id, { ...known, read: false, readAt: undefined });
    }
  };

  const oldestSeq = (): bigint | undefined => {
    let oldest: bigint | undefined;
    for (const item of items.values()) if (oldest === undefined || item.seq < oldest) oldest = item.seq;
    return oldest;
  };

  const newestSeq = (): bigint | undefined => {
    let newest: bigint | undefined;
    for (const item of items.values()) if (newest === undefined || item.seq > newest) newest = item.seq;
    return newest;
  };

  /**
   * Applies a state change to the notifications held, and to the unlisted
   * counts. Each action sets a state (none toggles), so applying a change
   * twice, or again after a refetch that already reflects it, is harmless.
   * `fromStream`: the change came as an event; then one that may concern
   * notifications the list does not hold starts a refetch.
   */
  const applyChange = (change: Change, fromStream: boolean): void => {
    const at = new Date();
    let update: (item: InboxItem) => InboxItem | undefined;
    switch (change.action) {
      case StateAction.READ:
        update = (i) => (i.read ? i : { ...i, read: true, readAt: at, seen: true, seenAt: i.seenAt ?? at });
        break;
      case StateAction.UNREAD:
        update = (i) => (i.read ? { ...i, read: false, readAt: undefined } : i);
        break;
      case StateAction.SEEN:
        update = (i) => (i.seen ? i : { ...i, seen: true, seenAt: at });
        break;
      case StateAction.ARCHIVE:
      case StateAction.DELETE:
        update = () => undefined;
        break;
      default:
        // UNARCHIVE brings back notifications the inbox does not hold; an
        // action this client does not know could have done anything.
        if (fromStream) requestRefetch();
        return;
    }
    const byIds = change.ids.length > 0;
    const unheld = change.ids.filter((id) => !items.has(id)).length;
    const oldest = oldestSeq();
    const set = (item: InboxItem): void => {
      const next = update(item);
      if (next === undefined) items.delete(item.id);
      else if (next !== item) items.set(item.id, next);
    };
    if (byIds) {
      for (const id of change.ids) {
        const item = items.get(id);
        if (item) set(item);
      }
    } else if (change.upToSeq > 0n) {
      for (const item of [...items.values()]) {
        if (item.seq <= change.upToSeq && matchesFilter(change.filter, item)) set(item);
      }
    }

    // The unlisted ones: ids the list does not hold that changed were
    // unlisted ones (or archived ones, or ones the filter leaves out: the
    // counts are an estimate past 10,000 unread); an up-to change without a
    // filter reaching the oldest listed one covers them all.
    if (unlisted > 0 || unlistedUnseen > 0) {
      const coversUnlisted =
        !byIds && isFilterEmpty(change.filter) && oldest !== undefined && change.upToSeq >= oldest;
      switch (change.action) {
        case StateAction.READ:
        case StateAction.ARCHIVE:
        case StateAction.DELETE:
          if (coversUnlisted) unlisted = 0;
          else if (change.action === StateAction.READ) unlisted = Math.max(0, unlisted - unheld);
          break;
        case StateAction.SEEN:
          if (coversUnlisted) unlistedUnseen = 0;
          else unlistedUnseen = Math.max(0, unlistedUnseen - unheld);
          break;
      }
      unlistedUnseen = Math.min(unlistedUnseen, unlisted);
    }

    // Unread of notifications the list does not hold (read ones it never
    // loaded, or left out by position): they are unread now, and the list
    // must hold every unread one.
    if (fromStream && change.action === StateAction.UNREAD && (!byIds || unheld > 0)) requestRefetch();
  };

  const apply = (event: DeliveredEvent): void => {
    switch (event.kind.case) {
      case "notification":
        if (beforeLive) backlog.add(event.kind.value.id);
        putDelivered(event.kind.value);
        break;
      case "updated": {
        // It carries its state after the update: it replaces the one held,
        // or joins the list (a group folding in again, a renotified one);
        // archived, or no longer matching the filter, it leaves.
        const item = toInboxItem(event.kind.value);
        if (item.archivedAt === undefined && matchesFilter(filter, item)) items.set(item.id, item);
        else items.delete(item.id);
        break;
      }
      case "read": {
        const { notificationIds, upToSeq } = event.kind.value;
        applyChange({ action: StateAction.READ, ids: notificationIds, upToSeq, filter: undefined }, true);
        break;
      }
      case "state": {
        const { action, notificationIds, upToSeq, filter: which } = event.kind.value;
        applyChange({ action, ids: notificationIds, upToSeq, filter: which }, true);
        break;
      }
    }
  };

  /**
   * At the first `caught_up` of the fresh stream: the unread notifications
   * were loaded before the stream started, and the fresh backlog is every
   * notification unread at that later moment; so a loaded unread one the
   * backlog did not bring has been read since (or archived or deleted:
   * the inbox cannot tell, and shows it read).
   */
  const reconcileLoaded = (): void => {
    if (loadedUnread) {
      const read = [...loadedUnread].filter((id) => !backlog.has(id));
      if (read.length > 0) applyChange({ action: StateAction.READ, ids: read, upToSeq: 0n, filter: undefined }, false);
    }
    loadedUnread = undefined;
    backlog.clear();
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
      if (beforeLive) {
        reconcileLoaded();
        liveFrom = state.position;
      }
      beforeLive = false;
      error = undefined;
    } else if (state.kind === "reconnecting" || state.kind === "stopped") {
      if (state.error) error = state.error;
    }
    changed();
  };

  /** The unread notifications, all pages up to `UNREAD_MAX_PAGES`; `complete` unless cut there. */
  const fetchUnread = async (): Promise<{ unread: Notification[]; complete: boolean }> => {
    const unread: Notification[] = [];
    let pageToken = "";
    for (let page = 0; page < UNREAD_MAX_PAGES; page++) {
      const response = await client.list({ ...filter, unreadOnly: true, pageSize: UNREAD_PAGE_SIZE, pageToken });
      unread.push(...response.notifications);
      pageToken = response.nextPageToken;
      if (!pageToken) return { unread, complete: true };
    }
    return { unread, complete: false };
  };

  /** Fetches the newest notifications and every unread one, and with `withCount` the counts. */
  const load = async (withCount: boolean): Promise<Loaded> => {
    const [recent, { unread, complete }, count] = await Promise.all([
      historySize > 0 ? client.list({ ...filter, pageSize: historySize }) : undefined,
      fetchUnread(),
      // With a filter, the server's count of it (a named count).
      withCount ? client.unreadCount(filtered ? [{ name: "inbox", ...filter }] : []) : undefined,
    ]);
    return { recent, unread, complete, count };
  };

  /**
   * Merges a load into the list: what it lists replaces what the list
   * held (it is as new or newer); what the list held and it does not list
   * stays. When the unread ones were cut, the counts cover the rest.
   */
  const merge = ({ recent, unread, complete, count }: Loaded): void => {
    for (const n of recent?.notifications ?? []) putListed(n);
    for (const n of unread) putListed(n);
    unlisted = 0;
    unlistedUnseen = 0;
    if (!complete && count) {
      let listedUnread = 0;
      let listedUnseen = 0;
      for (const item of items.values()) {
        if (!item.read) listedUnread += 1;
        if (!item.seen) listedUnseen += 1;
      }
      const countedUnread = filtered ? (count.counts[0]?.unread ?? 0n) : count.unread;
      unlisted = Math.max(0, Number(countedUnread) - listedUnread);
      // The server counts unseen ones of the whole inbox only.
      if (!filtered) unlistedUnseen = Math.min(unlisted, Math.max(0, Number(count.unseen) - listedUnseen));
    }
  };

  const requestRefetch = (): void => {
    if (closed) return;
    if (refetching) refetchAgain = true;
    else void refetch();
  };

  /**
   * Refetches as at start — the recent notifications, every unread one,
   * and the counts — and merges the result. Stream events that arrive
   * meanwhile are held back and applied after it: they are newer than, or
   * already part of, what it returned, and applying one again is harmless.
   * A newer refetch (a resync) supersedes a running one.
   */
  const refetch = async (): Promise<void> => {
    const generation = ++refetchGeneration;
    refetching = true;
    held ??= [];
    let lastError: HeraldError | undefined;
    for (let attempt = 1; attempt <= REFETCH_ATTEMPTS; attempt++) {
      try {
        const loaded = await load(true);
        if (generation !== refetchGeneration || closed) return;
        merge(loaded);
        lastError = undefined;
        break;
      } catch (e) {
        lastError = toHeraldError(e);
        if (attempt < REFETCH_ATTEMPTS) await new Promise((r) => setTimeout(r, 1000));
        if (generation !== refetchGeneration || closed) return;
      }
    }
    if (lastError) error = lastError;
    if (lastResync?.refetching) lastResync = { ...lastResync, refetching: false };
    refetching = false;
    const pending = held ?? [];
    held = undefined;
    for (const event of pending) apply(event);
    if (refetchAgain) {
      refetchAgain = false;
      requestRefetch();
    }
    changed();
  };

  /**
   * The stream could not be continued: what the inbox shows may be of a
   * history the server no longer has (a restarted in-memory server, a
   * restored database) and events were missed. Drop it all (and the events
   * held back, which are of that history), then refetch.
   */
  const onResync = (position: bigint, info: ResyncInfo): void => {
    liveFrom = position;
    items.clear();
    unlisted = 0;
    unlistedUnseen = 0;
    loadedUnread = undefined;
    backlog.clear();
    held = [];
    refetchAgain = false;
    lastResync = { reason: info.reason, epoch: info.epoch, at: new Date(), refetching: true };
    changed();
    void refetch();
  };

  const start = async (): Promise<void> => {
    try {
      // No counts: the fresh backlog brings every unread notification,
      // also those past the pages fetched here.
      const loaded = await load(false);
      if (closed) return;
      merge(loaded);
      loadedUnread = new Set([...items.values()].filter((i) => !i.read).map((i) => i.id));
      changed();
    } catch (e) {
      // The stream below reports the same problem (or works anyway).
      error = toHeraldError(e);
      changed();
    }
    if (closed) return;
    const streamOptions: Parameters<HeraldClient["subscribe"]>[0] = {
      ...filter,
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

  /**
   * Applies the change an action stored, unless the stream has already
   * brought its event (`seq`, the event's position, past `liveFrom` and at
   * or below the stream's): applying it again then could undo a later
   * change from another device. `seq` 0: nothing changed on the server;
   * applying it brings the list in line.
   */
  const settle = (seq: bigint, change: Change): void => {
    const position = subscription?.position;
    const delivered = liveFrom !== undefined && seq > liveFrom && position !== undefined && position >= seq;
    if (!delivered) applyChange(change, false);
  };

  /** Changes `ids` with `call`, in chunks the server accepts, settling each chunk once stored. */
  const changeByIds = (
    action: StateAction,
    ids: readonly bigint[],
    call: (chunk: bigint[]) => Promise<{ seq: bigint }>,
  ): Promise<void> =>
    act(async () => {
      for (let i = 0; i < ids.length; i += MAX_IDS_PER_CALL) {
        const chunk = ids.slice(i, i + MAX_IDS_PER_CALL);
        const { seq } = await call(chunk);
        settle(seq, { action, ids: chunk, upToSeq: 0n, filter: undefined });
      }
    });

  /**
   * Changes every listed notification that `wanted` picks: by position
   * (up to the newest shown) with `upTo` when the inbox has no filter, by
   * ids with `byIds` when it has one.
   */
  const changeAll = (
    action: StateAction,
    wanted: (item: InboxItem) => boolean,
    upTo: (seq: bigint) => Promise<{ seq: bigint }>,
    byIds: (chunk: bigint[]) => Promise<{ seq: bigint }>,
  ): Promise<void> => {
    if (filtered) {
      return changeByIds(action, [...items.values()].filter(wanted).map((n) => n.id), byIds);
    }
    return act(async () => {
      const newest = newestSeq();
      if (newest === undefined) return;
      const { seq } = await upTo(newest);
      settle(seq, { action, ids: [], upToSeq: newest, filter: undefined });
    });
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
        let unreadCount = unlisted;
        let unseenCount = unlistedUnseen;
        const counts: Record<string, number> = {};
        for (const c of options.counts ?? []) counts[c.name] = 0;
        for (const n of notifications) {
          if (!n.read) unreadCount += 1;
          if (!n.seen) unseenCount += 1;
          if (n.read) continue;
          for (const c of options.counts ?? []) {
            if (matchesFilter(c, n)) counts[c.name] = (counts[c.name] ?? 0) + 1;
          }
        }
        snapshot = {
          notifications,
          unreadCount,
          unseenCount,
          counts,
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
      return changeByIds(StateAction.READ, ids, (chunk) => client.markRead(chunk));
    },
    markAllRead() {
      return changeAll(
        StateAction.READ,
        (n) => !n.read,
        (seq) => client.markAllRead(seq),
        (chunk) => client.markRead(chunk),
      );
    },
    markUnread(ids) {
      return changeByIds(StateAction.UNREAD, ids, (chunk) => client.markUnread(chunk));
    },
    markSeen(ids) {
      return changeByIds(StateAction.SEEN, ids, (chunk) => client.markSeen(chunk));
    },
    markAllSeen() {
      return changeAll(
        StateAction.SEEN,
        (n) => !n.seen,
        (seq) => client.markAllSeen(seq),
        (chunk) => client.markSeen(chunk),
      );
    },
    archive(ids) {
      return changeByIds(StateAction.ARCHIVE, ids, (chunk) => client.archive(chunk));
    },
    unarchive(ids) {
      // Settling it asks for nothing: the stream's event starts the refetch.
      return changeByIds(StateAction.UNARCHIVE, ids, (chunk) => client.unarchive(chunk));
    },
    delete(ids) {
      return changeByIds(StateAction.DELETE, ids, (chunk) => client.delete(chunk));
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
