/**
 * React binding: `useNotifications()` and `HeraldProvider`
 * (import from `@herald/web/react`; React >= 18 is a peer dependency).
 */
import {
  createContext,
  createElement,
  useContext,
  useEffect,
  useMemo,
  useRef,
  useState,
  useSyncExternalStore,
  type ReactNode,
} from "react";
import type { HeraldClient } from "./client.js";
import type { HeraldError } from "./errors.js";
import {
  createInbox,
  type Inbox,
  type InboxItem,
  type InboxOptions,
  type InboxResync,
  type InboxSnapshot,
} from "./inbox.js";
import type { ConnectionState } from "./subscribe.js";

/** The client `useNotifications()` uses when it is not given one. */
export const HeraldContext = createContext<HeraldClient | null>(null);

/** Props of `HeraldProvider`. */
export interface HeraldProviderProps {
  /** The client the hooks below it use. */
  client: HeraldClient;
  /** The subtree. */
  children?: ReactNode;
}

/** Makes `client` the default of every `useNotifications()` below it. */
export function HeraldProvider(props: HeraldProviderProps): ReactNode {
  return createElement(HeraldContext.Provider, { value: props.client }, props.children);
}

/**
 * Options of `useNotifications()`: those of `createInbox()`, with the client
 * optional (default: the `HeraldProvider`'s). Changing `client`, the filter
 * (`types`, `categories`, `minSeverity`), `historySize` or the stream timing
 * reopens the stream; other changes do not.
 */
export interface UseNotificationsOptions extends Omit<InboxOptions, "client"> {
  /** The client; default the one from `HeraldProvider`. */
  client?: HeraldClient;
}

/** What `useNotifications()` returns; re-rendered on every change. */
export interface UseNotificationsResult {
  /** The user's notifications, newest first; read ones included (`read: true`). */
  notifications: readonly InboxItem[];
  /** Number of unread notifications (of the filter, when given). */
  unreadCount: number;
  /** Number of notifications neither seen nor read: the bell badge that `markAllSeen` clears. */
  unseenCount: number;
  /** The named unread counts asked for with `counts` (a badge per category, say), by name. */
  counts: Readonly<Record<string, number>>;
  /** True while the stream is live. */
  connected: boolean;
  /** The stream's connection state (`connecting`, `live`, `reconnecting`, `stopped`). */
  status: ConnectionState;
  /** The latest error (stream or action), or undefined. */
  error: HeraldError | undefined;
  /**
   * The latest `resync` (the stream could not be continued, e.g. the server
   * lost its history), or undefined. The hook re-renders when it happens,
   * with the list emptied, and again with the refetched list and count.
   */
  lastResync: InboxResync | undefined;
  /**
   * Marks one or several notifications read. Never rejects: a failure shows
   * up in `error`. Resolves when the server has stored it.
   */
  markRead: (ids: bigint | readonly bigint[]) => Promise<void>;
  /** Marks every listed notification read; never rejects (see `error`). */
  markAllRead: () => Promise<void>;
  /** Marks one or several notifications unread (they stay seen); never rejects. */
  markUnread: (ids: bigint | readonly bigint[]) => Promise<void>;
  /** Marks one or several notifications seen (not read); never rejects. */
  markSeen: (ids: bigint | readonly bigint[]) => Promise<void>;
  /** Marks every listed notification seen — call it when the bell opens; never rejects. */
  markAllSeen: () => Promise<void>;
  /** Archives one or several notifications: they leave the list and the counts; never rejects. */
  archive: (ids: bigint | readonly bigint[]) => Promise<void>;
  /**
   * Brings archived notifications back into the list (after the stream
   * brings the change and the inbox refetches); never rejects.
   */
  unarchive: (ids: bigint | readonly bigint[]) => Promise<void>;
  /**
   * Deletes one or several notifications for good; never rejects. A
   * reserved word as a variable: destructure it renamed,
   * `const { delete: deleteNotifications } = useNotifications()`.
   */
  delete: (ids: bigint | readonly bigint[]) => Promise<void>;
}

/** The `Inbox` actions that take ids. */
type IdAction = "markRead" | "markUnread" | "markSeen" | "archive" | "unarchive" | "delete";

const STARTING: InboxSnapshot = {
  notifications: [],
  unreadCount: 0,
  unseenCount: 0,
  counts: {},
  connected: false,
  status: { kind: "connecting", attempt: 1 },
  error: undefined,
  lastResync: undefined,
};
const noSubscription = (): (() => void) => () => {};
const startingSnapshot = (): InboxSnapshot => STARTING;

/**
 * The signed-in user's live notifications, unread and unseen counts and
 * connection state, with the state-change actions (read, unread, seen,
 * archive, unarchive, delete). Opens one stream per mounted hook and
 * closes it on unmount.
 *
 * Throws `Error` when no client is given and there is no `HeraldProvider`.
 *
 * @example
 * const { notifications, unreadCount, unseenCount, markRead, markAllSeen, archive } =
 *   useNotifications({ types: ["project.*"] });
 */
export function useNotifications(options: UseNotificationsOptions = {}): UseNotificationsResult {
  const contextClient = useContext(HeraldContext);
  const client = options.client ?? contextClient;
  if (!client) {
    throw new Error("useNotifications: pass a client, or render inside <HeraldProvider client={…}>");
  }
  const latest = useRef(options);
  latest.current = options;
  const key = JSON.stringify([
    options.types ?? [],
    options.categories ?? [],
    options.minSeverity ?? null,
    options.historySize ?? null,
    options.heartbeatIntervalMs ?? null,
    options.watchdogMultiplier ?? null,
    options.backoff?.baseMs ?? null,
    options.backoff?.maxMs ?? null,
    options.counts ?? [],
  ]);

  const [inbox, setInbox] = useState<Inbox | null>(null);
  useEffect(() => {
    const { client: _ignored, ...rest } = latest.current;
    const created = createInbox({ ...rest, client });
    setInbox(created);
    return () => {
      created.close();
    };
  }, [client, key]);

  const snapshot = useSyncExternalStore(
    inbox ? inbox.onChange : noSubscription,
    inbox ? inbox.getSnapshot : startingSnapshot,
    inbox ? inbox.getSnapshot : startingSnapshot,
  );

  // Stable functions per inbox; a failure shows up in `error`, never as a rejection.
  const actions = useMemo(() => {
    const byIds =
      (action: IdAction) =>
      async (ids: bigint | readonly bigint[]): Promise<void> => {
        if (!inbox) return;
        await inbox[action](typeof ids === "bigint" ? [ids] : ids).catch(() => undefined);
      };
    const all = (action: "markAllRead" | "markAllSeen") => async (): Promise<void> => {
      if (!inbox) return;
      await inbox[action]().catch(() => undefined);
    };
    return {
      markRead: byIds("markRead"),
      markAllRead: all("markAllRead"),
      markUnread: byIds("markUnread"),
      markSeen: byIds("markSeen"),
      markAllSeen: all("markAllSeen"),
      archive: byIds("archive"),
      unarchive: byIds("unarchive"),
      delete: byIds("delete"),
    };
  }, [inbox]);

  return {
    notifications: snapshot.notifications,
    unreadCount: snapshot.unreadCount,
    unseenCount: snapshot.unseenCount,
    counts: snapshot.counts,
    connected: snapshot.connected,
    status: snapshot.status,
    error: snapshot.error,
    lastResync: snapshot.lastResync,
    ...actions,
  };
}
