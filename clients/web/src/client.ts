/**
 * The Herald client: a grpc-web transport, the token, and small helpers for
 * the unary calls a frontend makes (mark read, the other state changes —
 * unread, seen, archive, unarchive, delete —, list, unread count).
 */
import { create } from "@bufbuild/protobuf";
import {
  Code,
  createClient,
  type CallOptions,
  type Client,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { authHeaders, type TokenProvider } from "./auth.js";
import { HeraldError, toHeraldError } from "./errors.js";
import { filterFields, type FilterOptions } from "./filter.js";
import {
  GetUnreadCountRequestSchema,
  ListNotificationsRequestSchema,
  MarkReadRequestSchema,
  NotificationFilterSchema,
  NotificationIdsSchema,
  Notifications,
  StateAction,
  UpdateStateRequestSchema,
  type GetUnreadCountResponse,
  type ListNotificationsResponse,
  type MarkReadResponse,
  type UpdateStateRequest,
  type UpdateStateResponse,
} from "./gen/herald/v1/herald_pb.js";
import { subscribe, type SubscribeOptions, type Subscription } from "./subscribe.js";

/**
 * A grpc-web transport (binary format, over `fetch`) to a Herald server,
 * e.g. `createHeraldTransport("https://herald.example.com")`. The server
 * must list the page's origin in `--cors-origins` (`HERALD_CORS_ORIGINS`).
 *
 * @param baseUrl the server URL, without the `/herald.v1.Notifications/…` path.
 * @param options `fetch`: a custom fetch (e.g. to set `credentials`).
 */
export function createHeraldTransport(
  baseUrl: string,
  options: { fetch?: typeof globalThis.fetch } = {},
): Transport {
  return createGrpcWebTransport({
    baseUrl,
    useBinaryFormat: true,
    ...(options.fetch ? { fetch: options.fetch } : {}),
  });
}

/** Options of `createHeraldClient()`: `getToken` and one of `baseUrl` / `transport`. */
export interface HeraldClientOptions {
  /** Server URL for grpc-web, e.g. `https://herald.example.com`. */
  baseUrl?: string;
  /** A ready transport (takes precedence over `baseUrl`); any Connect transport works. */
  transport?: Transport;
  /** Supplies the user's bearer token; called before every call and (re)connect. */
  getToken: TokenProvider;
  /** Timeout of the unary helper calls, in ms. Default 10 000; <= 0 for none. */
  timeoutMs?: number;
}

/** Options of `HeraldClient.list()`: a page, and the filter (`types`, `categories`, `minSeverity`). */
export interface ListOptions extends FilterOptions {
  /** Only unread notifications. Default false. */
  unreadOnly?: boolean;
  /** Page size, 1 to 500; 0 or absent means the server's default (50). */
  pageSize?: number;
  /** The `nextPageToken` of the previous page; absent for the first. */
  pageToken?: string;
  /**
   * List the archived notifications instead of the inbox (which leaves
   * them out). Default false. Deleted notifications are never listed.
   */
  archived?: boolean;
}

/** A named count for `HeraldClient.unreadCount()`: its filter means what `ListOptions`' does. */
export interface UnreadFilterOptions extends FilterOptions {
  /** The count's name in the answer: 1 to 64 bytes, unique in one call. */
  name: string;
}

/**
 * Which notifications a state change (`updateState` and its helpers)
 * covers; give exactly one:
 * - ids (1 to 1,000), as an array or `{ ids }`: ids that are not the
 *   user's, deleted, or already in the wanted state are ignored;
 * - `{ upToSeq }`: every notification with seq <= it (beyond the stream's
 *   head means up to the head), e.g. "archive everything shown";
 * - `{ filter }`: every notification the filter matches, up to the
 *   stream's head when the call commits; at least one part must be set.
 */
export type StateTarget =
  | readonly bigint[]
  | { readonly ids: readonly bigint[] }
  | { readonly upToSeq: bigint }
  | { readonly filter: FilterOptions };

/** Options of `HeraldClient.subscribe()`: `subscribe()`'s, minus what the client supplies. */
export type ClientSubscribeOptions = Omit<SubscribeOptions, "transport" | "getToken">;

/**
 * A Herald client bound to a transport and a token provider. Every helper
 * attaches `authorization: Bearer <token>`; on UNAUTHENTICATED it asks the
 * provider for a fresh token (`forceRefresh: true`) and retries once.
 * Helpers reject with a `HeraldError` (gRPC code and message).
 */
export interface HeraldClient {
  /** The transport calls go through. */
  readonly transport: Transport;
  /** The token provider. */
  readonly getToken: TokenProvider;
  /** The generated Connect client, for calls the helpers do not cover (attach the token yourself). */
  readonly rpc: Client<typeof Notifications>;
  /**
   * Marks notifications read by id (1 to 1,000 ids; ids that are not the
   * user's, or already read, are ignored). Resolves with how many changed
   * (`marked`) and the seq of the `read` event emitted (`seq`, 0 when
   * nothing changed).
   */
  markRead(ids: readonly bigint[]): Promise<MarkReadResponse>;
  /** Marks every notification with seq <= `upToSeq` read ("mark all read"). Same result as `markRead`. */
  markAllRead(upToSeq: bigint): Promise<MarkReadResponse>;
  /**
   * Changes the state of the notifications `target` names (`UpdateState`):
   * `StateAction.READ`, `UNREAD`, `SEEN` (the bell was opened; not read),
   * `ARCHIVE` (out of the inbox listing, counts and fresh backlog; kept),
   * `UNARCHIVE` (back, with the read state it had) or `DELETE` (gone from
   * every listing and count; cannot be undone). Resolves with how many
   * changed (`changed`) and the seq of the event emitted on the user's
   * stream (`seq`, 0 when nothing changed). Rejects with INVALID_ARGUMENT
   * naming the field for no action, an empty or oversized id list, a zero
   * `upToSeq` or an empty filter.
   */
  updateState(action: StateAction, target: StateTarget): Promise<UpdateStateResponse>;
  /** `updateState(StateAction.UNREAD, target)`: read → unread (they stay seen). */
  markUnread(target: StateTarget): Promise<UpdateStateResponse>;
  /** `updateState(StateAction.SEEN, target)`: unseen → seen, e.g. `{ upToSeq }` of the newest shown when the bell opens. Seen is not read. */
  markSeen(target: StateTarget): Promise<UpdateStateResponse>;
  /** `markSeen({ upToSeq })`: every notification with seq <= `upToSeq` seen ("the bell was opened"). */
  markAllSeen(upToSeq: bigint): Promise<UpdateStateResponse>;
  /** `updateState(StateAction.ARCHIVE, target)`: out of the inbox; listed with `list({ archived: true })`. */
  archive(target: StateTarget): Promise<UpdateStateResponse>;
  /** `updateState(StateAction.UNARCHIVE, target)`: back into the inbox, read or unread as before. */
  unarchive(target: StateTarget): Promise<UpdateStateResponse>;
  /** `updateState(StateAction.DELETE, target)`: gone for good, archived or not. */
  delete(target: StateTarget): Promise<UpdateStateResponse>;
  /**
   * One page of the user's notifications, newest first, with
   * `nextPageToken` ("" on the last page): the inbox, or with `archived`
   * the archived ones. Each carries `readAt`, `seenAt` and `archivedAt`.
   */
  list(options?: ListOptions): Promise<ListNotificationsResponse>;
  /**
   * The user's unread count (`unread`: unread notifications in the inbox),
   * unseen count (`unseen`: those of them neither seen nor read — the bell
   * badge of apps that clear it when the bell opens), their stream position
   * when counted (`seq`) and, for each of `filters` (at most 20), a named
   * unread count in `counts`, in order — all from one snapshot, each equal
   * to what `list` with `unreadOnly` and that filter lists.
   */
  unreadCount(filters?: readonly UnreadFilterOptions[]): Promise<GetUnreadCountResponse>;
  /** `subscribe()` with this client's transport and token provider. */
  subscribe(options: ClientSubscribeOptions): Subscription;
}

/** Default timeout of the unary helpers, in ms. */
export const DEFAULT_CALL_TIMEOUT_MS = 10_000;

/**
 * Creates a `HeraldClient`. Throws `TypeError` when neither `baseUrl` nor
 * `transport` is given.
 */
export function createHeraldClient(options: HeraldClientOptions): HeraldClient {
  const transport =
    options.transport ??
    (options.baseUrl !== undefined ? createHeraldTransport(options.baseUrl) : undefined);
  if (!transport) throw new TypeError("createHeraldClient: give baseUrl or transport");
  const getToken = options.getToken;
  const timeoutMs = options.timeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
  const rpc = createClient(Notifications, transport);

  /** Runs `call` with the token; on UNAUTHENTICATED once more with a fresh one. */
  const authorized = async <T>(call: (options: CallOptions) => Promise<T>): Promise<T> => {
    let forceRefresh = false;
    for (;;) {
      let token: string | null | undefined;
      try {
        token = await getToken({ forceRefresh });
      } catch (e) {
        throw new HeraldError(Code.Unknown, `token provider failed: ${e instanceof Error ? e.message : String(e)}`, {
          cause: e,
        });
      }
      try {
        return await call({ headers: authHeaders(token), timeoutMs });
      } catch (e) {
        const error = toHeraldError(e);
        if (error.code === Code.Unauthenticated && !forceRefresh) {
          forceRefresh = true;
          continue;
        }
        throw error;
      }
    }
  };

  const updateState = (action: StateAction, target: StateTarget): Promise<UpdateStateResponse> => {
    const request = create(UpdateStateRequestSchema, { action, target: stateTarget(target) });
    return authorized((o) => rpc.updateState(request, o));
  };

  return {
    transport,
    getToken,
    rpc,
    markRead(ids) {
      const request = create(MarkReadRequestSchema, {
        target: { case: "ids", value: create(NotificationIdsSchema, { ids: [...ids] }) },
      });
      return authorized((o) => rpc.markRead(request, o));
    },
    markAllRead(upToSeq) {
      const request = create(MarkReadRequestSchema, { target: { case: "upToSeq", value: upToSeq } });
      return authorized((o) => rpc.markRead(request, o));
    },
    updateState,
    markUnread: (target) => updateState(StateAction.UNREAD, target),
    markSeen: (target) => updateState(StateAction.SEEN, target),
    markAllSeen: (upToSeq) => updateState(StateAction.SEEN, { upToSeq }),
    archive: (target) => updateState(StateAction.ARCHIVE, target),
    unarchive: (target) => updateState(StateAction.UNARCHIVE, target),
    delete: (target) => updateState(StateAction.DELETE, target),
    list(listOptions = {}) {
      const request = create(ListNotificationsRequestSchema, {
        unreadOnly: listOptions.unreadOnly ?? false,
        pageSize: listOptions.pageSize ?? 0,
        pageToken: listOptions.pageToken ?? "",
        archived: listOptions.archived ?? false,
        ...filterFields(listOptions),
      });
      return authorized((o) => rpc.listNotifications(request, o));
    },
    unreadCount(filters = []) {
      const request = create(GetUnreadCountRequestSchema, {
        filters: filters.map((f) => ({ name: f.name, ...filterFields(f) })),
      });
      return authorized((o) => rpc.getUnreadCount(request, o));
    },
    subscribe(subscribeOptions) {
      return subscribe({ ...subscribeOptions, transport, getToken });
    },
  };
}

/** A `StateTarget` as the request's `target` oneof. */
function stateTarget(target: StateTarget): UpdateStateRequest["target"] {
  if (isIdList(target)) return { case: "ids", value: create(NotificationIdsSchema, { ids: [...target] }) };
  if ("ids" in target) return { case: "ids", value: create(NotificationIdsSchema, { ids: [...target.ids] }) };
  if ("upToSeq" in target) return { case: "upToSeq", value: target.upToSeq };
  return { case: "filter", value: create(NotificationFilterSchema, filterFields(target.filter)) };
}

// `Array.isArray` does not narrow a union with a readonly array type.
function isIdList(target: StateTarget): target is readonly bigint[] {
  return Array.isArray(target);
}
