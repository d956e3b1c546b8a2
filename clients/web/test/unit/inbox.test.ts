import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { createHeraldClient } from "../../src/client.js";
import { HeraldError } from "../../src/errors.js";
import { Resync_Reason, Severity } from "../../src/gen/herald/v1/herald_pb.js";
import { createInbox, type InboxOptions } from "../../src/inbox.js";
import { closeInboxes, ev, FakeHerald, notification, openInbox, script, sleep, until } from "./fake.js";

afterEach(closeInboxes);

function inbox(server: FakeHerald, options: Partial<InboxOptions> = {}) {
  const i = openInbox(server, options);
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

    // Filters reach the server as given.
    await client.list({ types: ["build.*"], categories: ["ci"], minSeverity: Severity.HIGH });
    const filtered = server.lists[1]!.request;
    assert.deepEqual([filtered.types, filtered.categories, filtered.minSeverity], [["build.*"], ["ci"], Severity.HIGH]);
    await client.unreadCount([{ name: "ci", categories: ["ci"] }, { name: "urgent", minSeverity: Severity.CRITICAL }]);
    const counted = server.counts[1]!.request.filters.map((f) => [f.name, f.categories, f.minSeverity]);
    assert.deepEqual(counted, [
      ["ci", ["ci"], Severity.UNSPECIFIED],
      ["urgent", [], Severity.CRITICAL],
    ]);
    assert.equal(server.counts[0]!.request.filters.length, 0, "no filters unless asked");
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
    const history = server.lists.find((l) => !l.request.unreadOnly)!;
    assert.equal(history.request.pageSize, 3);
    assert.ok(history.authorization === "Bearer tok");
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
    assert.deepEqual(
      server.lists.map((l) => l.request.types),
      [["build"], ["build"]],
      "the history and the unread listing are filtered by the server too",
    );
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

  it("on resync drops everything, refetches the list and the count, and holds stream events meanwhile", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      // Epoch 1: three notifications, 1 and 2 read by position (up_to_seq 2).
      script(
        [
          ev.notification(1, 1, { epoch: 1 }),
          ev.notification(2, 2, { epoch: 1 }),
          ev.notification(3, 3, { epoch: 1 }),
          ev.caughtUp(3, { epoch: 1 }),
          ev.read(4, [], 2, 1),
        ],
        Code.Unavailable,
      ),
      // The server lost that history (epoch 2): resync at its head, then a live notification.
      script([
        ev.resync(1, { epoch: 2, reason: Resync_Reason.EPOCH_CHANGED }),
        ev.caughtUp(1, { epoch: 2 }),
        ev.notification(21, 2, { epoch: 2 }),
      ]),
    );
    let releaseList!: () => void;
    const listGate = new Promise<void>((r) => (releaseList = r));
    // What the server has now: 20 (seq 1 of epoch 2), unread.
    server.onList = () => ({ notifications: [notification(20, 1)] });
    server.onCount = () => ({ unread: 1n, seq: 1n });
    const client = createHeraldClient({ transport: server.transport, getToken: () => "tok" });
    const gatedClient = {
      ...client,
      list: async (o?: Parameters<typeof client.list>[0]) => {
        if (server.calls.length >= 2) await listGate; // the start's history load goes through
        return client.list(o);
      },
    };
    const i = openInbox(server, { client: gatedClient, historySize: 5, backoff: { baseMs: 5, maxMs: 5 }, random: () => 0 });
    let renders = 0;
    i.onChange(() => renders++);
    const view = () => i.getSnapshot().notifications.map((n) => `${n.id}${n.read ? "r" : "u"}`).join(" ");
    await until(() => i.getSnapshot().lastResync !== undefined, "the resync");
    await sleep(20);
    // Dropped at once; the live event waits for the refetch.
    assert.equal(view(), "");
    assert.equal(i.getSnapshot().unreadCount, 0);
    assert.equal(i.getSnapshot().lastResync?.refetching, true);
    assert.equal(i.getSnapshot().lastResync?.reason, Resync_Reason.EPOCH_CHANGED);
    assert.equal(i.getSnapshot().lastResync?.epoch, 2n);
    const rendersBefore = renders;
    releaseList();
    await until(() => i.getSnapshot().lastResync?.refetching === false, "the refetch");
    await sleep(0);
    assert.ok(renders > rendersBefore, "listeners told about the refetch");
    // No stale items; 21 (seq 2 of epoch 2) is unread although epoch 1 had read up to seq 2.
    assert.equal(view(), "21u 20u");
    assert.equal(i.getSnapshot().unreadCount, 2);
    assert.equal(i.getSnapshot().error, undefined);
    assert.equal(i.getSnapshot().connected, true);
    // Refetched: the recent notifications (as at start), the unread ones, the count.
    // (The start loaded the recent ones and the unread ones: two lists.)
    const refetch = server.lists.slice(2).map((l) => [l.request.unreadOnly, l.request.pageSize]);
    assert.deepEqual(refetch.sort(), [
      [false, 5],
      [true, 500],
    ]);
    assert.equal(server.counts.length, 1);
    // Actions use the new epoch's positions.
    await i.markAllRead();
    assert.deepEqual(server.markReads[0]!.request.target, { case: "upToSeq", value: 2n });
  });

  it("after a resync with more unread than it refetches, counts the rest from GetUnreadCount", async () => {
    const server = new FakeHerald();
    let releaseSecond!: () => void;
    const second = new Promise<void>((r) => (releaseSecond = r));
    server.scripts.push(
      // Held back during the refetch, applied after it: 1 is not listed, so one of the rest.
      script([ev.resync(20_000, { epoch: 2 }), ev.caughtUp(20_000, { epoch: 2 }), ev.read(20_001, [1], 0, 2)], Code.Unavailable),
      async function* () {
        await second;
        yield ev.caughtUp(20_001, { epoch: 2 });
        // Everything up to 10,500 read: that covers every unlisted one (older than the oldest listed, 10,001).
        yield ev.read(20_002, [], 10_500, 2);
      },
    );
    // 10,000 unread listed (20 pages, each claiming a next one), 10,003 counted;
    // nothing at start (before the stream).
    server.onList = (r) => {
      if (server.calls.length === 0) return {};
      const first = 20_000 - Number(r.pageToken || "0") * 500;
      return {
        notifications: Array.from({ length: 500 }, (_, k) => notification(first - k, first - k)),
        nextPageToken: String(Number(r.pageToken || "0") + 1),
      };
    };
    // All of them unseen.
    server.onCount = () => ({ unread: 10_003n, unseen: 10_003n, seq: 20_000n });
    const t = inbox(server, { random: () => 0 });
    await until(() => t.snap().lastResync?.refetching === false, "the refetch", 5000);
    assert.equal(server.lists.length, 21, "one at start, 20 pages in the refetch");
    assert.equal(t.snap().notifications.length, 10_000);
    assert.equal(t.snap().unreadCount, 10_002);
    // Reading 1 read an unseen one (reading implies seeing): never more
    // unseen than unread are unlisted.
    assert.equal(t.snap().unseenCount, 10_002);
    releaseSecond();
    await until(() => t.snap().unreadCount === 9_500, "up_to_seq 10,500 applied", 5000);
    assert.equal(t.snap().unseenCount, 9_500, "reading implies seeing; no unlisted ones left");
  });

  it("shows a failed refetch in error, and goes on live", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.resync(3, { epoch: 2 }), ev.caughtUp(3, { epoch: 2 }), ev.notification(4, 4, { epoch: 2 })]));
    server.onCount = () => {
      throw new ConnectError("database down", Code.Unavailable);
    };
    const t = inbox(server);
    await until(() => t.snap().lastResync?.refetching === false, "the refetch to give up", 5000);
    assert.equal(server.counts.length, 3, "three attempts");
    assert.equal(t.snap().error?.codeName, "UNAVAILABLE");
    assert.equal(t.view(), "4u");
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
