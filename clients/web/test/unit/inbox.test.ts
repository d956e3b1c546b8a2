import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createHeraldClient } from "../../src/client.js";
import { HeraldError } from "../../src/errors.js";
import { createInbox, type Inbox, type InboxOptions } from "../../src/inbox.js";
import { ev, FakeHerald, notification, script, sleep, until } from "./fake.js";

const open: Inbox[] = [];
afterEach(() => {
  for (const i of open.splice(0)) i.close();
});

function inbox(server: FakeHerald, options: Partial<InboxOptions> = {}) {
  const client = createHeraldClient({ transport: server.transport, getToken: () => "tok" });
  const i = createInbox({ client, historySize: 0, backoff: { baseMs: 5, maxMs: 10 }, ...options });
  open.push(i);
  const view = () =>
    i.getSnapshot().notifications.map((n) => `${n.id}${n.read ? "r" : "u"}`).join(" ");
  return { inbox: i, view, snap: () => i.getSnapshot() };
}

describe("createHeraldClient helpers", () => {
  it("attach the bearer token and build the requests", async () => {
    const server = new FakeHerald();
    server.onMarkRead = () => ({ marked: 2, seq: 9n });
    server.onCount = () => ({ unread: 3n, seq: 8n });
    server.onList = () => ({ notifications: [notification(1, 1)], nextPageToken: "p2" });
    const client = createHeraldClient({ transport: server.transport, getToken: () => "abc" });
    const marked = await client.markRead([1n, 2n]);
    assert.deepEqual([marked.marked, marked.seq], [2, 9n]);
    await client.markAllRead(7n);
    const page = await client.list({ unreadOnly: true, pageSize: 10, pageToken: "p1" });
    assert.equal(page.nextPageToken, "p2");
    const count = await client.unreadCount();
    assert.deepEqual([count.unread, count.seq], [3n, 8n]);

    assert.deepEqual(server.markReads[0]!.request.target, { case: "ids", value: server.markReads[0]!.request.target.value });
    assert.deepEqual(
      server.markReads[0]!.request.target.case === "ids" && server.markReads[0]!.request.target.value.ids,
      [1n, 2n],
    );
    assert.deepEqual(server.markReads[1]!.request.target, { case: "upToSeq", value: 7n });
    assert.deepEqual(
      [server.lists[0]!.request.unreadOnly, server.lists[0]!.request.pageSize, server.lists[0]!.request.pageToken],
      [true, 10, "p1"],
    );
    const auths = [...server.markReads, ...server.lists, ...server.counts].map((c) => c.authorization);
    assert.deepEqual(auths, ["Bearer abc", "Bearer abc", "Bearer abc", "Bearer abc"]);
  });

  it("retry once with a fresh token on UNAUTHENTICATED, then reject with HeraldError", async () => {
    const server = new FakeHerald();
    server.onCount = (ctx) => {
      if (ctx.requestHeader.get("authorization") !== "Bearer fresh") throw new ConnectError("refused", Code.Unauthenticated);
      return { unread: 1n };
    };
    const asked: boolean[] = [];
    const client = createHeraldClient({
      transport: server.transport,
      getToken: ({ forceRefresh }) => {
        asked.push(forceRefresh);
        return forceRefresh ? "fresh" : "stale";
      },
    });
    assert.equal((await client.unreadCount()).unread, 1n);
    assert.deepEqual(asked, [false, true]);

    const refusing = createHeraldClient({ transport: server.transport, getToken: () => "stale" });
    await assert.rejects(refusing.unreadCount(), (e: unknown) => e instanceof HeraldError && e.codeName === "UNAUTHENTICATED");
    assert.equal(server.counts.length, 4, "one retry only");
  });

  it("requires a baseUrl or a transport", () => {
    assert.throws(() => createHeraldClient({ getToken: () => "" }), TypeError);
  });
});


describe("createInbox", () => {
  it("lists notifications newest first and applies read events by id and by up_to_seq", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([
        ev.notification(1, 1),
        ev.notification(2, 2),
        ev.caughtUp(2),
        ev.notification(3, 3),
        ev.notification(4, 4),
        ev.read(5, [2]),
      ]),
    );
    const t = inbox(server);
    await until(() => t.snap().notifications.length === 4 && t.snap().unreadCount === 3, "4 items, 3 unread");
    assert.equal(t.view(), "4u 3u 2r 1u");
    assert.equal(t.snap().connected, true);
    assert.deepEqual(t.snap().status, { kind: "live", position: 2n });
    const first = t.snap().notifications[0]!;
    assert.equal(first.title, "n4");
    assert.equal(first.createdAt?.getTime(), 1_700_000_004_000);
  });

  it("applies up_to_seq to everything at or below it", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 1), ev.notification(2, 2), ev.notification(3, 4), ev.caughtUp(4), ev.read(5, [], 2)]),
    );
    const t = inbox(server);
    await until(() => t.snap().unreadCount === 1, "1 unread");
    assert.equal(t.view(), "3u 2r 1r");
  });

  it("reconciles the history with the fresh backlog: what the backlog lacks was read meanwhile", async () => {
    const server = new FakeHerald();
    // History (read before the stream): 3 unread, 2 unread, 1 read.
    server.onList = () => ({
      notifications: [notification(3, 3), notification(2, 2), notification(1, 1, { read: true })],
    });
    // Then 2 was read on another device; the fresh backlog is the unread ones: 3 and a new 5.
    server.scripts.push(script([ev.notification(3, 3), ev.notification(5, 5), ev.caughtUp(5)]));
    const t = inbox(server, { historySize: 3 });
    await until(() => t.snap().connected, "live");
    await sleep(0);
    assert.equal(t.view(), "5u 3u 2r 1r");
    assert.equal(t.snap().unreadCount, 2);
    assert.equal(server.lists[0]!.request.pageSize, 3);
    assert.equal(server.lists[0]!.request.unreadOnly, false);
    assert.ok(server.lists[0]!.authorization === "Bearer tok");
  });

  it("keeps a types filter on the history, the stream and the list", async () => {
    const server = new FakeHerald();
    server.onList = () => ({
      notifications: [notification(2, 2, { type: "chat" }), notification(1, 1, { type: "build" })],
    });
    server.scripts.push(script([ev.notification(1, 1, { type: "build" }), ev.caughtUp(2)]));
    const t = inbox(server, { historySize: 5, types: ["build"] });
    await until(() => t.snap().connected, "live");
    await sleep(0);
    assert.equal(t.view(), "1u");
    assert.deepEqual(server.calls[0]!.types, ["build"]);
  });

  it("markRead calls MarkRead with the ids and updates the list and count", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(1, 1), ev.notification(2, 2), ev.caughtUp(2)]));
    server.onMarkRead = () => ({ marked: 1, seq: 3n });
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    await t.inbox.markRead([1n]);
    await sleep(0);
    assert.equal(t.view(), "2u 1r");
    assert.equal(t.snap().unreadCount, 1);
    const target = server.markReads[0]!.request.target;
    assert.deepEqual(target.case === "ids" ? target.value.ids : null, [1n]);
  });

  it("markAllRead marks up to the newest seq shown, or by ids under a types filter", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(1, 1), ev.notification(2, 6), ev.caughtUp(9)]));
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    await t.inbox.markAllRead();
    await sleep(0);
    assert.deepEqual(server.markReads[0]!.request.target, { case: "upToSeq", value: 6n });
    assert.equal(t.snap().unreadCount, 0);

    const filtered = new FakeHerald();
    filtered.scripts.push(script([ev.notification(1, 1, { type: "a" }), ev.notification(2, 6, { type: "a" }), ev.caughtUp(9)]));
    const f = inbox(filtered, { types: ["a"] });
    await until(() => f.snap().connected, "live");
    await f.inbox.markAllRead();
    const target = filtered.markReads[0]!.request.target;
    assert.deepEqual(target.case === "ids" ? [...target.value.ids].sort() : null, [1n, 2n]);
  });

  it("surfaces a failed action in error and rejects", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(1, 1), ev.caughtUp(1)]));
    server.onMarkRead = () => {
      throw new ConnectError("ids: too many", Code.InvalidArgument);
    };
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    await assert.rejects(t.inbox.markRead([1n]), HeraldError);
    await sleep(0);
    assert.equal(t.snap().error?.codeName, "INVALID_ARGUMENT");
    assert.equal(t.snap().error?.rawMessage, "ids: too many");
    assert.equal(t.snap().unreadCount, 1);
  });

  it("resumes after a disconnect without duplicating items", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 1), ev.caughtUp(1), ev.notification(2, 2)], Code.Unavailable),
      script([ev.notification(2, 2), ev.notification(3, 3), ev.caughtUp(3)]),
    );
    const t = inbox(server, { random: () => 0 });
    await until(() => t.snap().notifications.length === 3 && t.snap().connected, "3 items, live");
    assert.equal(t.view(), "3u 2u 1u");
    assert.equal(server.calls[1]!.afterSeq, 2n);
    assert.ok(t.snap().error === undefined, "error cleared once live again");
  });

  it("refetches the unread notifications on resync, holding stream events back meanwhile", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 1), ev.notification(2, 2), ev.caughtUp(2)], Code.Unavailable),
      // Resume position 2 was pruned: resync at 10, then a live notification.
      script([ev.resync(10), ev.caughtUp(10), ev.notification(11, 11)]),
    );
    let releaseList!: () => void;
    const listGate = new Promise<void>((r) => (releaseList = r));
    // While away: 1 was read, 7 arrived (unread).
    server.onList = () => ({ notifications: [notification(7, 7), notification(2, 2)] });
    const client = createHeraldClient({
      transport: server.transport,
      getToken: () => "tok",
    });
    const gatedClient = {
      ...client,
      list: async (o?: Parameters<typeof client.list>[0]) => {
        await listGate;
        return client.list(o);
      },
    };
    const i = createInbox({ client: gatedClient, historySize: 0, backoff: { baseMs: 5, maxMs: 5 }, random: () => 0 });
    open.push(i);
    await server.waitForCalls(2);
    await sleep(20);
    // The live event is held back until the refetch is applied.
    assert.ok(!i.getSnapshot().notifications.some((n) => n.id === 11n));
    releaseList();
    await until(() => i.getSnapshot().notifications.length === 4, "4 items");
    const view = i.getSnapshot().notifications.map((n) => `${n.id}${n.read ? "r" : "u"}`).join(" ");
    assert.equal(view, "11u 7u 2u 1r");
    assert.equal(i.getSnapshot().unreadCount, 3);
    assert.equal(server.lists[0]!.request.unreadOnly, true);
  });

  it("close() stops the stream and reports stopped", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(0)]));
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    t.inbox.close();
    await sleep(0);
    assert.deepEqual(t.snap().status, { kind: "stopped" });
    assert.ok(server.calls[0]!.signal.aborted);
  });

  it("shows UNAUTHENTICATED when the token is refused", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([], Code.Unauthenticated), script([], Code.Unauthenticated));
    const t = inbox(server);
    await until(() => t.snap().status.kind === "stopped", "stopped");
    assert.equal(t.snap().error?.codeName, "UNAUTHENTICATED");
    assert.equal(t.snap().connected, false);
  });

  it("rejects an invalid historySize", () => {
    const server = new FakeHerald();
    const client = createHeraldClient({ transport: server.transport, getToken: () => "" });
    assert.throws(() => createInbox({ client, historySize: 501 }), RangeError);
    assert.throws(() => createInbox({ client, heartbeatIntervalMs: -1 }), RangeError);
  });
});
