/**
 * A scripted, in-process Herald for unit tests: a Connect router transport
 * (no network) whose Subscribe calls are answered by per-call scripts, and
 * whose unary calls are recorded and answered by test-provided functions.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { createHeraldClient } from "../../src/client.js";
import { createInbox, type Inbox, type InboxOptions } from "../../src/inbox.js";
import { durationFromMs, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createRouterTransport, type HandlerContext, type Transport } from "@connectrpc/connect";
import {
  EventSchema,
  GetUnreadCountResponseSchema,
  ListNotificationsResponseSchema,
  MarkReadResponseSchema,
  NotificationFilterSchema,
  NotificationSchema,
  Notifications,
  Resync_Reason,
  Severity,
  StateAction,
  UpdateStateResponseSchema,
  type Event,
  type GetUnreadCountRequest,
  type GetUnreadCountResponse,
  type ListNotificationsRequest,
  type ListNotificationsResponse,
  type MarkReadRequest,
  type MarkReadResponse,
  type Notification,
  type SubscribeRequest,
  type UpdateStateRequest,
  type UpdateStateResponse,
} from "../../src/gen/herald/v1/herald_pb.js";

/** One Subscribe call as the fake server saw it. */
export interface SubscribeCall {
  /** `after_seq`, undefined when absent. */
  afterSeq: bigint | undefined;
  /** `epoch` (0 when not sent). */
  epoch: bigint;
  /** `types`. */
  types: string[];
  /** `categories`. */
  categories: string[];
  /** `min_severity` (0 when not sent). */
  minSeverity: number;
  /** The `authorization` header, or null. */
  authorization: string | null;
  /** Aborted when the client goes away. */
  signal: AbortSignal;
  /** When the call arrived (`performance.now()`, ms). */
  at: number;
}

/** Answers one Subscribe call: yields events, may throw a ConnectError. */
export type StreamScript = (request: SubscribeRequest, ctx: HandlerContext) => AsyncIterable<Event>;

/** The scripted server. */
export class FakeHerald {
  /** Subscribe calls, in order. */
  readonly calls: SubscribeCall[] = [];
  /** Scripts for the next Subscribe calls, in order; without one a call stays silent until aborted. */
  readonly scripts: StreamScript[] = [];
  /** Recorded unary requests with their `authorization` header. */
  readonly markReads: { request: MarkReadRequest; authorization: string | null }[] = [];
  readonly lists: { request: ListNotificationsRequest; authorization: string | null }[] = [];
  readonly counts: { request: GetUnreadCountRequest; authorization: string | null }[] = [];
  readonly updateStates: { request: UpdateStateRequest; authorization: string | null }[] = [];
  /** Unary behaviours; defaults answer empty responses. */
  onMarkRead: (r: MarkReadRequest, ctx: HandlerContext) => MessageInitShape<typeof MarkReadResponseSchema> = () => ({});
  onList: (r: ListNotificationsRequest, ctx: HandlerContext) => MessageInitShape<typeof ListNotificationsResponseSchema> =
    () => ({});
  onCount: (ctx: HandlerContext) => MessageInitShape<typeof GetUnreadCountResponseSchema> = () => ({});
  onUpdateState: (
    r: UpdateStateRequest,
    ctx: HandlerContext,
  ) => MessageInitShape<typeof UpdateStateResponseSchema> | Promise<MessageInitShape<typeof UpdateStateResponseSchema>> =
    () => ({});
  private waiters: (() => void)[] = [];

  /** The transport to give the client. */
  readonly transport: Transport = createRouterTransport(({ service }) => {
    service(Notifications, {
      sendNotification: () => {
        throw new ConnectError("not in the fake", Code.Unimplemented);
      },
      subscribe: (request, ctx) => this.subscribe(request, ctx),
      markRead: (request, ctx): MarkReadResponse => {
        this.markReads.push({ request, authorization: ctx.requestHeader.get("authorization") });
        return create(MarkReadResponseSchema, this.onMarkRead(request, ctx));
      },
      updateState: async (request, ctx): Promise<UpdateStateResponse> => {
        this.updateStates.push({ request, authorization: ctx.requestHeader.get("authorization") });
        return create(UpdateStateResponseSchema, await this.onUpdateState(request, ctx));
      },
      listNotifications: (request, ctx): ListNotificationsResponse => {
        this.lists.push({ request, authorization: ctx.requestHeader.get("authorization") });
        return create(ListNotificationsResponseSchema, this.onList(request, ctx));
      },
      getUnreadCount: (request, ctx): GetUnreadCountResponse => {
        this.counts.push({ request, authorization: ctx.requestHeader.get("authorization") });
        return create(GetUnreadCountResponseSchema, this.onCount(ctx));
      },
    });
  });

  private async *subscribe(request: SubscribeRequest, ctx: HandlerContext): AsyncIterable<Event> {
    this.calls.push({
      afterSeq: request.afterSeq,
      epoch: request.epoch,
      types: [...request.types],
      categories: [...request.categories],
      minSeverity: request.minSeverity,
      authorization: ctx.requestHeader.get("authorization"),
      signal: ctx.signal,
      at: performance.now(),
    });
    for (const w of this.waiters.splice(0)) w();
    const script = this.scripts.shift();
    if (script) {
      yield* script(request, ctx);
      return;
    }
    await aborted(ctx.signal);
  }

  /** Resolves once at least `n` Subscribe calls have arrived; rejects after `timeoutMs`. */
  async waitForCalls(n: number, timeoutMs = 2000): Promise<void> {
    const deadline = performance.now() + timeoutMs;
    while (this.calls.length < n) {
      const left = deadline - performance.now();
      if (left <= 0) throw new Error(`expected ${n} Subscribe calls, got ${this.calls.length}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }
}

/** Resolves when `signal` aborts. */
export function aborted(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve();
    else signal.addEventListener("abort", () => resolve(), { once: true });
  });
}

/** Waits `ms` milliseconds. */
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `predicate` every 2 ms until true; throws after `timeoutMs`. */
export async function until(predicate: () => boolean, what: string, timeoutMs = 2000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (!predicate()) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

/** What a test may set on a notification besides its id and seq. */
export interface NotificationExtra {
  type: string;
  title: string;
  category: string;
  severity: Severity;
  /** Read (with a `read_at`); also seen. */
  read: boolean;
  /** Seen (with a `seen_at`), not necessarily read. */
  seen: boolean;
}

/** A notification message; `read` and `seen` as a listing carries them (with their times). */
export function notification(id: number, seq: number, extra: Partial<NotificationExtra> = {}): Notification {
  const at = timestampFromDate(new Date(1_700_000_000_000 + seq * 1000));
  const read = extra.read ?? false;
  return create(NotificationSchema, {
    id: BigInt(id),
    seq: BigInt(seq),
    recipient: "alice",
    type: extra.type ?? "demo",
    title: extra.title ?? `n${id}`,
    body: "",
    data: "{}",
    createdAt: at,
    read,
    category: extra.category ?? "",
    severity: extra.severity ?? Severity.NORMAL,
    ...(read ? { readAt: at } : {}),
    ...(read || extra.seen ? { seenAt: at } : {}),
  });
}

/**
 * Event constructors. `epoch` is the stream's epoch (default 0, as from a
 * server that predates epochs); `heartbeatMs` is what `caught_up` states as
 * the server's heartbeat interval (default: nothing stated).
 */
export const ev = {
  notification: (
    id: number,
    seq: number,
    extra: Partial<Pick<NotificationExtra, "type" | "title" | "category" | "severity"> & { epoch: number }> = {},
  ): Event =>
    create(EventSchema, {
      seq: BigInt(seq),
      epoch: BigInt(extra.epoch ?? 0),
      kind: { case: "notification", value: notification(id, seq, extra) },
    }),
  /**
   * An `updated` event at `seq` for notification `id` (at `noteSeq`), with
   * its state after the update (`read`, `seen`) and group fields.
   */
  updated: (
    seq: number,
    id: number,
    noteSeq: number,
    extra: Partial<NotificationExtra & { groupKey: string; groupCount: number; actors: string[] }> = {},
  ): Event =>
    create(EventSchema, {
      seq: BigInt(seq),
      kind: {
        case: "updated",
        value: {
          ...notification(id, noteSeq, extra),
          groupKey: extra.groupKey ?? "",
          groupCount: extra.groupCount ?? 0,
          actors: extra.actors ?? [],
        },
      },
    }),
  /** A `state` event: `ids`, or (when empty) everything up to `upToSeq` that `filter` matches. */
  state: (
    seq: number,
    action: StateAction,
    target: { ids?: number[]; upToSeq?: number; filter?: MessageInitShape<typeof NotificationFilterSchema> },
    epoch = 0,
  ): Event =>
    create(EventSchema, {
      seq: BigInt(seq),
      epoch: BigInt(epoch),
      kind: {
        case: "state",
        value: {
          action,
          notificationIds: (target.ids ?? []).map(BigInt),
          upToSeq: BigInt(target.upToSeq ?? 0),
          ...(target.filter ? { filter: target.filter } : {}),
        },
      },
    }),
  read: (seq: number, ids: number[], upToSeq = 0, epoch = 0): Event =>
    create(EventSchema, {
      seq: BigInt(seq),
      epoch: BigInt(epoch),
      kind: { case: "read", value: { notificationIds: ids.map(BigInt), upToSeq: BigInt(upToSeq) } },
    }),
  caughtUp: (seq: number, extra: Partial<{ epoch: number; heartbeatMs: number }> = {}): Event =>
    create(EventSchema, {
      seq: BigInt(seq),
      epoch: BigInt(extra.epoch ?? 0),
      kind: {
        case: "caughtUp",
        value: extra.heartbeatMs === undefined ? {} : { heartbeatInterval: durationFromMs(extra.heartbeatMs) },
      },
    }),
  heartbeat: (seq: number, epoch = 0): Event =>
    create(EventSchema, { seq: BigInt(seq), epoch: BigInt(epoch), kind: { case: "heartbeat", value: {} } }),
  resync: (seq: number, extra: Partial<{ epoch: number; reason: Resync_Reason }> = {}): Event =>
    create(EventSchema, {
      seq: BigInt(seq),
      epoch: BigInt(extra.epoch ?? 0),
      kind: { case: "resync", value: { reason: extra.reason ?? Resync_Reason.UNSPECIFIED } },
    }),
};

/** A script that yields `events`, then fails with `code` (or stays open when `code` is "hang"). */
export function script(events: Event[], end: Code | "hang" | "end" = "hang"): StreamScript {
  return async function* (_request, ctx) {
    for (const e of events) yield e;
    if (end === "hang") await aborted(ctx.signal);
    else if (end !== "end") throw new ConnectError(`scripted ${Code[end]}`, end);
  };
}

const openInboxes: Inbox[] = [];

/**
 * An inbox on `server` with fast backoff and no history by default; closed
 * by `closeInboxes()` (call it in `afterEach`).
 */
export function openInbox(server: FakeHerald, options: Partial<InboxOptions> = {}): Inbox {
  const client = createHeraldClient({ transport: server.transport, getToken: () => "tok" });
  const inbox = createInbox({ client, historySize: 0, backoff: { baseMs: 5, maxMs: 10 }, ...options });
  openInboxes.push(inbox);
  return inbox;
}

/** Closes every inbox `openInbox()` opened. */
export function closeInboxes(): void {
  for (const inbox of openInboxes.splice(0)) inbox.close();
}
