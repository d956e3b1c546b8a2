/**
 * The live inbox demo: `useNotifications()` rendered as a small inbox.
 *
 * URL query: `server` (Herald's URL, default http://127.0.0.1:50051),
 * `token` (the user's JWT), optional `types` (comma-separated),
 * `heartbeat` (the heartbeat interval in ms assumed until the server states
 * its own, default 15000), `history` (recent notifications to load,
 * default 20).
 *
 * Stable `data-testid`s for tests: `status` (with `data-status`,
 * `data-error-code` and `data-live-count`: how many times the stream went
 * live), `badge` (unread, `data-count`), `bell` (the button that "opens the
 * bell": marks everything seen), `unseen` (the unseen badge on it,
 * `data-count`), `error`, `resync` (`data-reason`, `data-epoch`,
 * `data-refetching`), `notifications`, `notification` (`data-id`,
 * `data-seq`, `data-read`, `data-seen`, `data-shown-at`: epoch ms when
 * first rendered), `notification-title`, per notification `mark-read` (when
 * unread) or `mark-unread` (when read), `archive` and `delete`, and
 * `mark-all-read`.
 */
import { useRef, useState } from "react";
import { createRoot } from "react-dom/client";
import {
  createHeraldClient,
  Resync_Reason,
  Severity,
  type ConnectionState,
  type InboxItem,
  type InboxResync,
} from "../../src/index.js";
import { HeraldProvider, useNotifications } from "../../src/react.js";

const params = new URLSearchParams(window.location.search);
const server = params.get("server") ?? "http://127.0.0.1:50051";
const token = params.get("token") ?? "";
const types = (params.get("types") ?? "").split(",").filter((t) => t !== "");
const heartbeatIntervalMs = positive(params.get("heartbeat")) ?? 15_000;
const historySize = positive(params.get("history")) ?? 20;

/**
 * A link the page may follow: an http(s) URL or a path on this origin. The
 * server accepts nothing else, but a page should not trust its data to
 * keep `javascript:` out of an `href`.
 */
function safeHref(url: string): string | undefined {
  if (url.startsWith("/") && !url.startsWith("//")) return url;
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? url : undefined;
  } catch {
    return undefined;
  }
}

function positive(value: string | null): number | undefined {
  const n = value === null ? NaN : Number(value);
  return Number.isFinite(n) && n >= 0 ? n : undefined;
}

// A real app would return a cached token here and fetch a new one when
// `forceRefresh` is set; the demo only has the one from the URL.
const client = createHeraldClient({ baseUrl: server, getToken: () => token });

function statusText(status: ConnectionState): string {
  switch (status.kind) {
    case "connecting":
      return status.attempt > 1 ? `connecting (attempt ${status.attempt})…` : "connecting…";
    case "live":
      return "live";
    case "reconnecting":
      return `reconnecting in ${(status.delayMs / 1000).toFixed(1)} s (retry ${status.attempt})`;
    case "stopped":
      return status.error ? `stopped: ${status.error.codeName}` : "stopped";
  }
}

function resyncText(resync: InboxResync): string {
  const why =
    resync.reason === Resync_Reason.EPOCH_CHANGED
      ? "the server lost its history (e.g. it restarted without a database)"
      : resync.reason === Resync_Reason.PRUNED
        ? "what was missed has expired"
        : resync.reason === Resync_Reason.BEYOND_HEAD
          ? "the server does not know this page's position"
          : "the server could not continue the stream";
  return `${resync.refetching ? "Refetching the inbox" : "Inbox refetched"}: ${why} (${resync.at.toLocaleTimeString()}).`;
}

/** How many times `status` has become `live` (each status change is a new object). */
function useLiveCount(status: ConnectionState): number {
  const seen = useRef<{ status: ConnectionState | null; count: number }>({ status: null, count: 0 });
  if (seen.current.status !== status) {
    seen.current = { status, count: seen.current.count + (status.kind === "live" ? 1 : 0) };
  }
  return seen.current.count;
}

/** What a notification's buttons do. */
interface ItemActions {
  markRead: (id: bigint) => void;
  markUnread: (id: bigint) => void;
  archive: (id: bigint) => void;
  remove: (id: bigint) => void;
}

function Item({ item, actions }: { item: InboxItem; actions: ItemActions }) {
  // When this notification first appeared on the page (epoch ms).
  const [shownAt] = useState(() => Date.now());
  return (
    <li
      className="item"
      data-testid="notification"
      data-id={item.id.toString()}
      data-seq={item.seq.toString()}
      data-read={String(item.read)}
      data-seen={String(item.seen)}
      data-shown-at={shownAt}
    >
      <div className="content">
        <div className="title" data-testid="notification-title">
          {safeHref(item.actionUrl) ? <a href={safeHref(item.actionUrl)}>{item.title}</a> : item.title}
        </div>
        {item.body !== "" && <p className="body">{item.body}</p>}
        <div className="meta">
          {item.severity !== Severity.NORMAL && (
            <span className={`severity severity-${Severity[item.severity].toLowerCase()}`} data-testid="severity">
              {Severity[item.severity].toLowerCase()}
            </span>
          )}
          {item.category !== "" && <>{item.category} · </>}
          {item.type} · #{item.seq.toString()}
          {item.groupCount > 1 ? (
            <span data-testid="group">
              {" "}
              · by {item.actors[0]} and {item.groupCount - 1} {item.groupCount === 2 ? "other" : "others"}
            </span>
          ) : (
            item.actor !== "" && <> · by {item.actor}</>
          )}
          {item.createdAt && <> · {item.createdAt.toLocaleTimeString()}</>}
        </div>
        {item.actions.length > 0 && (
          <div className="actions">
            {item.actions.map((a, i) => (
              <a key={i} className="action" data-testid="notification-action" href={safeHref(a.url)}>
                {a.label}
              </a>
            ))}
          </div>
        )}
      </div>
      <div className="buttons">
        {item.read ? (
          <button data-testid="mark-unread" onClick={() => actions.markUnread(item.id)}>
            Mark unread
          </button>
        ) : (
          <button data-testid="mark-read" onClick={() => actions.markRead(item.id)}>
            Mark read
          </button>
        )}
        <button data-testid="archive" onClick={() => actions.archive(item.id)}>
          Archive
        </button>
        <button data-testid="delete" onClick={() => actions.remove(item.id)}>
          Delete
        </button>
      </div>
    </li>
  );
}

function Inbox() {
  const inbox = useNotifications({
    types,
    heartbeatIntervalMs,
    historySize,
    backoff: { baseMs: 250, maxMs: 5000 },
  });
  const { notifications, unreadCount, unseenCount, status, error, lastResync } = inbox;
  const liveCount = useLiveCount(status);
  const actions: ItemActions = {
    markRead: (id) => void inbox.markRead(id),
    markUnread: (id) => void inbox.markUnread(id),
    archive: (id) => void inbox.archive(id),
    remove: (id) => void inbox.delete(id),
  };
  return (
    <main className="inbox">
      <header>
        {/* Opening the bell marks everything seen: its badge counts what arrived since. */}
        <button
          className="bell"
          data-testid="bell"
          aria-label="Notifications"
          title="Open the bell (marks everything seen)"
          onClick={() => void inbox.markAllSeen()}
        >
          {/* An outline bell; not an emoji, which headless browsers may lack a font for. */}
          <svg viewBox="0 0 24 24" width="18" height="18" aria-hidden="true">
            <path
              d="M6 16V11a6 6 0 0 1 12 0v5l2 2H4zM10 20a2 2 0 0 0 4 0"
              fill="none"
              stroke="currentColor"
              strokeWidth="1.8"
              strokeLinejoin="round"
            />
          </svg>
          <span className="unseen" data-testid="unseen" data-count={unseenCount}>
            {unseenCount}
          </span>
        </button>
        <h1>Inbox</h1>
        <span className="badge" data-testid="badge" data-count={unreadCount} title="unread">
          {unreadCount}
        </span>
        <span
          className="status"
          data-testid="status"
          data-status={status.kind}
          data-error-code={error?.codeName ?? ""}
          data-live-count={liveCount}
        >
          {statusText(status)}
        </span>
      </header>
      {token === "" && (
        <p className="hint">
          No <code>token</code> in the URL: run <code>herald token --dev --user alice</code> and add{" "}
          <code>&amp;token=…</code>.
        </p>
      )}
      {error && (
        <div className="error" data-testid="error" data-code={error.codeName}>
          {error.codeName}: {error.rawMessage}
        </div>
      )}
      {lastResync && (
        <div
          className="resync"
          data-testid="resync"
          data-reason={Resync_Reason[lastResync.reason]}
          data-epoch={lastResync.epoch.toString()}
          data-refetching={String(lastResync.refetching)}
        >
          {resyncText(lastResync)}
        </div>
      )}
      <div className="toolbar">
        <button data-testid="mark-all-read" disabled={unreadCount === 0} onClick={() => void inbox.markAllRead()}>
          Mark all read
        </button>
      </div>
      <ul data-testid="notifications">
        {notifications.map((n) => (
          <Item key={n.id.toString()} item={n} actions={actions} />
        ))}
      </ul>
      {notifications.length === 0 && <div className="empty">No notifications yet.</div>}
    </main>
  );
}

const root = document.getElementById("root");
if (!root) throw new Error("#root missing from index.html");
createRoot(root).render(
  <HeraldProvider client={client}>
    <Inbox />
  </HeraldProvider>,
);
