/**
 * `@herald/web`: a typed grpc-web client for Herald.
 *
 * - `createHeraldClient()` — transport, token, and the unary helpers
 *   (`markRead`, `markAllRead`, `updateState` and its helpers `markUnread`,
 *   `markSeen`, `markAllSeen`, `archive`, `unarchive`, `delete`; `list`,
 *   `unreadCount`);
 * - `matchesFilter()` — the server's filter rule, for `state` events by filter;
 * - `subscribe()` — a resumable, de-duplicated event stream with backoff,
 *   heartbeat watchdog and token refresh;
 * - `createInbox()` — a framework-free live inbox model;
 * - `@herald/web/react` — the `useNotifications()` hook.
 *
 * The generated protobuf types are re-exported as they are.
 */
export { authHeaders, type TokenProvider, type TokenRequest } from "./auth.js";
export {
  backoffCeiling,
  backoffDelay,
  resolveBackoff,
  DEFAULT_BACKOFF_BASE_MS,
  DEFAULT_BACKOFF_MAX_MS,
  type BackoffOptions,
  type ResolvedBackoff,
} from "./backoff.js";
export {
  createHeraldClient,
  createHeraldTransport,
  DEFAULT_CALL_TIMEOUT_MS,
  type ClientSubscribeOptions,
  type HeraldClient,
  type HeraldClientOptions,
  type ListOptions,
  type StateTarget,
  type UnreadFilterOptions,
} from "./client.js";
export { classifyError, codeName, HeraldError, toHeraldError, type ErrorAction } from "./errors.js";
export { matchesFilter, type FilterOptions, type FilterSubject } from "./filter.js";
export {
  createInbox,
  toInboxItem,
  DEFAULT_HISTORY_SIZE,
  type Inbox,
  type InboxItem,
  type InboxOptions,
  type InboxResync,
  type InboxSnapshot,
} from "./inbox.js";
export {
  subscribe,
  resolveStreamTiming,
  DEFAULT_HEARTBEAT_INTERVAL_MS,
  DEFAULT_WATCHDOG_MULTIPLIER,
  type ConnectionState,
  type DeliveredEvent,
  type ResyncInfo,
  type StreamTiming,
  type SubscribeOptions,
  type Subscription,
} from "./subscribe.js";
export * from "./gen/herald/v1/herald_pb.js";
/** gRPC status codes (`Code.Unauthenticated`, …), as in `HeraldError.code`. */
export { Code } from "@connectrpc/connect";
