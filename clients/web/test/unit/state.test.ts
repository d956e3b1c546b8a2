// Inbox state beyond read: the client's UpdateState helpers, the filter
// rule, and the inbox's actions and `state` events (unread, seen, archive,
// unarchive, delete; by ids, up to a seq, by filter) with the unseen count.
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { createHeraldClient } from "../../src/client.js";
import { matchesFilter } from "../../src/filter.js";
import { Severity, StateAction, type UpdateStateRequest } from "../../src/gen/herald/v1/herald_pb.js";
import { type InboxOptions } from "../../src/inbox.js";
import { aborted, closeInboxes, ev, FakeHerald, notification, openInbox, script, sleep, until } from "./fake.js";

afterEach(closeInboxes);

/**
 * An inbox on `server`, and views of it: `view()` lists the items as
 * `<id><r|u>[s]` (read or unread, seen), newest first.
 */
function inbox(server: FakeHerald, options: Partial<InboxOptions> = {}) {
  const i = openInbox(server, options);
  const view = () =>
    i
      .getSnapshot()
      .notifications.map((n) => `${n.id}${n.read ? "r" : "u"}${n.seen ? "s" : ""}`)
      .join(" ");
  const counts = () => [i.getSnapshot().unreadCount, i.getSnapshot().unseenCount];
  return { inbox: i, view, counts, snap: () => i.getSnapshot() };
}

/** A promise and the function that resolves it. */
function gate(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/** The ids, up-to or filter of an UpdateState request, for comparing. */
function target(r: UpdateStateRequest): unknown {
  switch (r.target.case) {
    case "ids":
      return { ids: r.target.value.ids };
    case "upToSeq":
      return { upToSeq: r.target.value };
    case "filter":
      return {
        filter: [r.target.value.types, r.target.value.categories, r.target.value.minSeverity],
      };
    default:
      return undefined;
  }
}

describe("createHeraldClient state helpers", () => {
  it("send each action with its target: ids, up-to or filter", async () => {
    const server = new FakeHerald();
    server.onUpdateState = () => ({ changed: 2, seq: 12n });
    const client = createHeraldClient({ transport: server.transport, getToken: () => "abc" });
    const response = await client.markUnread([1n, 2n]);
    assert.deepEqual([response.changed, response.seq], [2, 12n]);
    await client.markSeen({ ids: [3n] });
    await client.markAllSeen(9n);
    await client.archive({ filter: { types: ["build.*"], minSeverity: Severity.HIGH } });
    await client.unarchive({ upToSeq: 4n });
    await client.delete([5n]);
    await client.updateState(StateAction.READ, { filter: { categories: ["ci"] } });

    assert.deepEqual(
      server.updateStates.map((u) => [u.request.action, target(u.request)]),
      [
        [StateAction.UNREAD, { ids: [1n, 2n] }],
        [StateAction.SEEN, { ids: [3n] }],
        [StateAction.SEEN, { upToSeq: 9n }],
        [StateAction.ARCHIVE, { filter: [["build.*"], [], Severity.HIGH] }],
        [StateAction.UNARCHIVE, { upToSeq: 4n }],
        [StateAction.DELETE, { ids: [5n] }],
        [StateAction.READ, { filter: [[], ["ci"], Severity.UNSPECIFIED] }],
      ],
    );
    assert.ok(server.updateStates.every((u) => u.authorization === "Bearer abc"));
  });

  it("list the archived ones on request, and answer the unseen count", async () => {
    const server = new FakeHerald();
    server.onCount = () => ({ unread: 4n, unseen: 3n, seq: 9n });
    const client = createHeraldClient({ transport: server.transport, getToken: () => "abc" });
    await client.list();
    await client.list({ archived: true });
    assert.deepEqual(
      server.lists.map((l) => l.request.archived),
      [false, true],
    );
    const count = await client.unreadCount();
    assert.deepEqual([count.unread, count.unseen], [4n, 3n]);
  });
});

describe("matchesFilter", () => {
  const n = (type: string, category = "", severity = Severity.NORMAL) => ({ type, category, severity });

  it("matches types exactly or by `prefix.*`, as the server does", () => {
    const f = { types: ["chat", "build.*"] };
    assert.ok(matchesFilter(f, n("chat")));
    assert.ok(matchesFilter(f, n("build.passed")));
    assert.ok(matchesFilter(f, n("build.a.b")));
    assert.ok(!matchesFilter(f, n("build")), "a pattern needs the dot");
    assert.ok(!matchesFilter(f, n("buildx.passed")));
    assert.ok(!matchesFilter(f, n("chat.mention")), "an exact entry is no prefix");
  });

  it("matches categories and a minimum severity (unspecified counts as normal)", () => {
    assert.ok(matchesFilter({ categories: ["ci", "billing"] }, n("x", "ci")));
    assert.ok(!matchesFilter({ categories: ["ci"] }, n("x", "")));
    const high = { minSeverity: Severity.HIGH };
    assert.ok(matchesFilter(high, n("x", "", Severity.CRITICAL)));
    assert.ok(matchesFilter(high, n("x", "", Severity.HIGH)));
    assert.ok(!matchesFilter(high, n("x", "", Severity.NORMAL)));
    assert.ok(matchesFilter({ minSeverity: Severity.NORMAL }, n("x", "", Severity.UNSPECIFIED)));
    assert.ok(!matchesFilter({ minSeverity: Severity.HIGH }, n("x", "", Severity.UNSPECIFIED)));
  });

  it("needs every part to match; an empty or absent filter matches everything", () => {
    const f = { types: ["build.*"], categories: ["ci"], minSeverity: Severity.HIGH };
    assert.ok(matchesFilter(f, n("build.failed", "ci", Severity.HIGH)));
    assert.ok(!matchesFilter(f, n("build.failed", "ci", Severity.LOW)));
    assert.ok(!matchesFilter(f, n("build.failed", "other", Severity.HIGH)));
    assert.ok(!matchesFilter(f, n("deploy", "ci", Severity.HIGH)));
    assert.ok(matchesFilter({}, n("anything")));
    assert.ok(matchesFilter(undefined, n("anything")));
    assert.ok(matchesFilter({ types: [], categories: [], minSeverity: Severity.UNSPECIFIED }, n("anything")));
  });
});

describe("createInbox state", () => {
  it("loads the read and seen state of the recent and of every unread notification", async () => {
    const server = new FakeHerald();
    // History (2): 5, and 4 read. The unread listing also brings 2, seen,
    // older than the history.
    server.onList = (r) =>
      r.unreadOnly
        ? { notifications: [notification(5, 5), notification(2, 2, { seen: true })] }
        : { notifications: [notification(5, 5), notification(4, 4, { read: true })] };
    // The fresh backlog: the unread ones, now also 4 (marked unread since).
    server.scripts.push(script([ev.notification(2, 2), ev.notification(4, 4), ev.notification(5, 5), ev.caughtUp(5)]));
    const t = inbox(server, { historySize: 2 });
    await until(() => t.snap().connected, "live");
    await sleep(0);
    assert.equal(t.view(), "5u 4us 2us");
    assert.deepEqual(t.counts(), [3, 1]);
    const seen = t.snap().notifications[2]!;
    assert.equal(seen.seenAt?.getTime(), 1_700_000_002_000);
    assert.equal(seen.readAt, undefined);
    assert.equal(seen.archivedAt, undefined);
    assert.equal(t.snap().notifications[1]!.readAt, undefined, "unread now");
  });

  it("keeps named unread counts live from the list", async () => {
    const server = new FakeHerald();
    server.onList = (r) =>
      r.unreadOnly
        ? { notifications: [notification(2, 2, { category: "ci" }), notification(1, 1, { category: "billing" })] }
        : { notifications: [notification(2, 2, { category: "ci" }), notification(1, 1, { category: "billing" })] };
    server.scripts.push(
      script([
        ev.notification(1, 1, { category: "billing" }),
        ev.notification(2, 2, { category: "ci" }),
        ev.caughtUp(2),
        ev.notification(3, 3, { category: "ci", type: "build.failed", severity: Severity.HIGH }),
        ev.read(4, [2]),
      ]),
    );
    const t = inbox(server, {
      historySize: 5,
      counts: [
        { name: "ci", categories: ["ci"] },
        { name: "urgent", minSeverity: Severity.HIGH },
        { name: "builds", types: ["build.*"] },
      ],
    });
    await until(() => t.snap().notifications.length === 3 && t.snap().notifications[1]!.read, "live");
    assert.deepEqual(t.snap().counts, { ci: 1, urgent: 1, builds: 1 });
    assert.equal(t.snap().unreadCount, 2);
  });

  it("applies updated events in place, with the state they carry", async () => {
    const server = new FakeHerald();
    server.onList = (r) =>
      r.unreadOnly
        ? { notifications: [notification(2, 2)] }
        : { notifications: [notification(2, 2), notification(1, 1, { read: true })] };
    server.scripts.push(
      script([
        ev.notification(2, 2),
        ev.caughtUp(2),
        // 1 replaced, still read; then renotified: unread and unseen.
        ev.updated(3, 1, 1, { title: "shipped", read: true }),
        ev.updated(4, 1, 1, { title: "delivered" }),
        // 2 folds a group in, the newest actor first.
        ev.updated(5, 2, 2, { title: "Dave commented", groupKey: "pr-1", groupCount: 2, actors: ["dave", "carol"] }),
        // 7 was never listed (older than the history): it joins, in seq place.
        ev.updated(6, 7, 0, { title: "old, renotified" }),
      ]),
    );
    const t = inbox(server, { historySize: 2 });
    await until(() => t.snap().notifications.length === 3, "the updates applied");
    assert.equal(t.view(), "2u 1u 7u");
    const [two, one, seven] = t.snap().notifications;
    assert.deepEqual(
      [one!.title, two!.title, two!.groupCount, two!.actors, seven!.title],
      ["delivered", "Dave commented", 2, ["dave", "carol"], "old, renotified"],
    );
    assert.deepEqual(t.counts(), [3, 3]);
  });

  it("markUnread, markSeen, archive and delete change the list and the counts", async () => {
    const server = new FakeHerald();
    server.onList = (r) =>
      r.unreadOnly
        ? { notifications: [notification(4, 4), notification(3, 3), notification(2, 2)] }
        : { notifications: [notification(4, 4), notification(3, 3), notification(2, 2), notification(1, 1, { read: true })] };
    server.scripts.push(script([ev.notification(2, 2), ev.notification(3, 3), ev.notification(4, 4), ev.caughtUp(4)]));
    server.onUpdateState = () => ({ changed: 1, seq: 5n });
    const t = inbox(server, { historySize: 4 });
    await until(() => t.snap().connected, "live");
    assert.equal(t.view(), "4u 3u 2u 1rs");
    assert.deepEqual(t.counts(), [3, 3]);

    await t.inbox.markUnread([1n]);
    assert.equal(t.view(), "4u 3u 2u 1us", "unread, still seen");
    assert.deepEqual(t.counts(), [4, 3]);
    assert.equal(t.snap().notifications[3]!.readAt, undefined);

    await t.inbox.markSeen([2n]);
    assert.equal(t.view(), "4u 3u 2us 1us");
    assert.deepEqual(t.counts(), [4, 2]);

    await t.inbox.archive([4n]);
    assert.equal(t.view(), "3u 2us 1us");
    assert.deepEqual(t.counts(), [3, 1]);

    await t.inbox.delete([3n, 1n]);
    assert.equal(t.view(), "2us");
    assert.deepEqual(t.counts(), [1, 0]);

    assert.deepEqual(
      server.updateStates.map((u) => [u.request.action, target(u.request)]),
      [
        [StateAction.UNREAD, { ids: [1n] }],
        [StateAction.SEEN, { ids: [2n] }],
        [StateAction.ARCHIVE, { ids: [4n] }],
        [StateAction.DELETE, { ids: [3n, 1n] }],
      ],
    );
  });

  it("markAllSeen marks up to the newest seq shown, or by ids under a filter; read stays as it was", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(1, 1), ev.notification(2, 6), ev.caughtUp(9)]));
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    assert.deepEqual(t.counts(), [2, 2]);
    await t.inbox.markAllSeen();
    assert.equal(t.view(), "2us 1us");
    assert.deepEqual(t.counts(), [2, 0]);
    assert.deepEqual(
      server.updateStates.map((u) => [u.request.action, target(u.request)]),
      [[StateAction.SEEN, { upToSeq: 6n }]],
    );

    const filtered = new FakeHerald();
    filtered.scripts.push(
      script([
        ev.notification(1, 1, { category: "ci" }),
        ev.notification(2, 2, { category: "ci" }),
        ev.notification(3, 6, { category: "ci" }),
        ev.caughtUp(9),
      ]),
    );
    const f = inbox(filtered, { categories: ["ci"] });
    await until(() => f.snap().connected, "live");
    await f.inbox.markSeen([2n]);
    await f.inbox.markAllSeen();
    const last = filtered.updateStates[1]!.request;
    assert.equal(last.action, StateAction.SEEN);
    assert.deepEqual(last.target.case === "ids" ? [...last.target.value.ids].sort() : null, [1n, 3n], "only the unseen ones");
    assert.deepEqual(f.counts(), [3, 0]);
  });

  it("applies state events by ids from other devices", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([
        ev.notification(1, 1),
        ev.notification(2, 2),
        ev.notification(3, 3),
        ev.notification(4, 4),
        ev.caughtUp(4),
        ev.read(5, [1, 2]),
        ev.state(6, StateAction.UNREAD, { ids: [2] }),
        ev.state(7, StateAction.SEEN, { ids: [3] }),
        ev.state(8, StateAction.ARCHIVE, { ids: [4] }),
        ev.state(9, StateAction.DELETE, { ids: [1] }),
      ]),
    );
    const t = inbox(server);
    await until(() => t.snap().status.kind === "live" && t.view() === "3us 2us", "the changes", 2000);
    assert.deepEqual(t.counts(), [2, 0]);
    const read = t.snap().notifications[1]!;
    assert.ok(read.seenAt instanceof Date, "seen when it was read, on this client's clock");
    assert.equal(server.lists.length, 1, "no refetch: every change concerned notifications held");
  });

  it("applies state events up to a seq, and by filter up to a seq", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([
        ev.notification(1, 1, { type: "build.passed", category: "ci" }),
        ev.notification(2, 2, { type: "build.failed", category: "ci", severity: Severity.HIGH }),
        ev.notification(3, 3, { type: "chat", severity: Severity.CRITICAL }),
        ev.notification(4, 4, { type: "build.passed" }),
        ev.notification(5, 5, { type: "build" }),
        ev.caughtUp(5),
        // Everything up to 2 seen.
        ev.state(6, StateAction.SEEN, { upToSeq: 2 }),
        // Read, at least HIGH, up to 4: 2 and 3 (a read by filter comes as `state`).
        ev.state(7, StateAction.READ, { upToSeq: 4, filter: { minSeverity: Severity.HIGH } }),
        // Archive `build.*` in ci up to 5: 1 and 2; not 4 (no category), nor 5 (`build`, no dot).
        ev.state(8, StateAction.ARCHIVE, { upToSeq: 5, filter: { types: ["build.*"], categories: ["ci"] } }),
      ]),
    );
    const t = inbox(server);
    await until(() => t.snap().status.kind === "live" && t.snap().notifications.length === 3, "the changes", 2000);
    assert.equal(t.view(), "5u 4u 3rs");
    assert.deepEqual(t.counts(), [2, 2]);
  });

  it("refetches when a change may concern notifications it does not hold: unarchive, unread of others", async () => {
    const server = new FakeHerald();
    let listed = [notification(2, 2, { read: true })];
    server.onList = (r) => ({ notifications: r.unreadOnly ? listed.filter((n) => !n.read) : listed });
    server.onCount = () => ({ unread: BigInt(listed.filter((n) => !n.read).length), seq: 9n });
    const gates = [gate(), gate()];
    server.scripts.push(async function* (_request, ctx) {
      yield ev.caughtUp(3);
      await gates[0]!.promise;
      // 1 (read, older than the history) unarchived elsewhere, unread.
      listed = [notification(2, 2, { read: true }), notification(1, 1)];
      yield ev.state(4, StateAction.UNARCHIVE, { ids: [1] });
      await gates[1]!.promise;
      // Then 3, read, never held (history 1), marked unread.
      listed = [notification(3, 3), notification(2, 2, { read: true }), notification(1, 1)];
      yield ev.state(5, StateAction.UNREAD, { ids: [3] });
      await aborted(ctx.signal);
    });
    const t = inbox(server, { historySize: 1 });
    await until(() => t.snap().connected, "live");
    assert.equal(t.view(), "2rs");
    gates[0]!.resolve();
    await until(() => t.view() === "2rs 1u", "the unarchived one, refetched", 5000);
    gates[1]!.resolve();
    await until(() => t.view() === "3u 2rs 1u", "the one marked unread, refetched", 5000);
    assert.deepEqual(t.counts(), [2, 2]);
    assert.ok(server.counts.length >= 1, "a refetch counts too");
  });

  it("inbox.unarchive sends UNARCHIVE and shows the notification once the stream brings the change", async () => {
    const server = new FakeHerald();
    let listed: ReturnType<typeof notification>[] = [];
    server.onList = (r) => ({ notifications: r.archived ? [] : listed });
    let emit!: () => void;
    const emitted = new Promise<void>((r) => (emit = r));
    server.onUpdateState = () => {
      listed = [notification(7, 7)];
      emit();
      return { changed: 1, seq: 8n };
    };
    server.scripts.push(async function* (_request, ctx) {
      yield ev.caughtUp(7);
      await emitted;
      yield ev.state(8, StateAction.UNARCHIVE, { ids: [7] });
      await aborted(ctx.signal);
    });
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    await t.inbox.unarchive([7n]);
    await until(() => t.view() === "7u", "the unarchived notification", 5000);
    assert.deepEqual(t.counts(), [1, 1]);
    assert.equal(server.updateStates[0]!.request.action, StateAction.UNARCHIVE);
  });

  it("does not apply an action's change again once the stream has gone past it", async () => {
    const server = new FakeHerald();
    server.onList = () => ({ notifications: [notification(1, 1, { read: true })] });
    // Our own unread (seq 2), then another device reads it again (seq 3);
    // both arrive before our call's response.
    server.scripts.push(
      script([ev.caughtUp(1), ev.state(2, StateAction.UNREAD, { ids: [1] }), ev.read(3, [1])]),
    );
    server.onUpdateState = async () => {
      await until(() => t.snap().status.kind === "live" && t.snap().unreadCount === 0 && t.view() === "1rs", "seq 3");
      await sleep(5);
      return { changed: 1, seq: 2n };
    };
    const t = inbox(server, { historySize: 5 });
    await until(() => t.snap().connected, "live");
    await t.inbox.markUnread([1n]);
    assert.equal(t.view(), "1rs", "read, as the newest change left it");
  });

  it("applies an action's change stored before the fresh stream's snapshot, whose event it never gets", async () => {
    const server = new FakeHerald();
    server.onList = () => ({ notifications: [notification(2, 2), notification(1, 1)] });
    // The archive commits at seq 3, before the stream opens: the fresh
    // backlog lacks 2 and the stream goes live at 3, without the event.
    let archived!: () => void;
    const committed = new Promise<void>((r) => (archived = r));
    server.scripts.push(async function* (_request, ctx) {
      await committed;
      yield ev.notification(1, 1);
      yield ev.caughtUp(3);
      await aborted(ctx.signal);
    });
    server.onUpdateState = async () => {
      archived();
      await until(() => t.snap().connected, "live");
      return { changed: 1, seq: 3n };
    };
    const t = inbox(server, { historySize: 5 });
    await until(() => t.view() === "2u 1u", "loaded");
    await t.inbox.archive([2n]);
    assert.equal(t.view(), "1u", "archived, not shown read");
    assert.deepEqual(t.counts(), [1, 1]);
  });

  it("sends the filter with the stream, the listings and a refetch's named count", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.resync(3, { epoch: 2 }), ev.caughtUp(3, { epoch: 2 })]));
    const t = inbox(server, { categories: ["ci"], minSeverity: Severity.HIGH, historySize: 2 });
    await until(() => t.snap().lastResync?.refetching === false, "the refetch");
    const call = server.calls[0]!;
    assert.deepEqual([call.types, call.categories, call.minSeverity], [[], ["ci"], Severity.HIGH]);
    assert.ok(server.lists.length >= 4);
    for (const l of server.lists) assert.deepEqual([l.request.categories, l.request.minSeverity], [["ci"], Severity.HIGH]);
    const filters = server.counts[0]!.request.filters.map((f) => [f.name, f.categories, f.minSeverity]);
    assert.deepEqual(filters, [["inbox", ["ci"], Severity.HIGH]]);
  });

  it("reports a failed action in error and leaves the list as it was", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(1, 1), ev.caughtUp(1)]));
    server.onUpdateState = () => {
      throw new Error("boom");
    };
    const t = inbox(server);
    await until(() => t.snap().connected, "live");
    await assert.rejects(t.inbox.archive([1n]));
    await sleep(0);
    assert.equal(t.view(), "1u");
    assert.ok(t.snap().error !== undefined);
  });
});
