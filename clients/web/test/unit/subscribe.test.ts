import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { Code } from "@connectrpc/connect";
import { backoffCeiling, backoffDelay, resolveBackoff } from "../../src/backoff.js";
import { HeraldError } from "../../src/errors.js";
import { Resync_Reason, StateAction } from "../../src/gen/herald/v1/herald_pb.js";
import {
  subscribe,
  type ConnectionState,
  type DeliveredEvent,
  type ResyncInfo,
  type Subscription,
} from "../../src/subscribe.js";
import { aborted, ev, FakeHerald, script, sleep, until } from "./fake.js";

const open: Subscription[] = [];
afterEach(async () => {
  for (const s of open.splice(0)) s.close();
});

/** Starts a subscription against `server`, recording events and states. */
function start(server: FakeHerald, options: Partial<Parameters<typeof subscribe>[0]> = {}) {
  const events: DeliveredEvent[] = [];
  const states: ConnectionState[] = [];
  const tokens: boolean[] = [];
  const sub = subscribe({
    transport: server.transport,
    getToken: ({ forceRefresh }) => {
      tokens.push(forceRefresh);
      return "t0";
    },
    onEvent: (e) => events.push(e),
    onState: (s) => states.push(s),
    backoff: { baseMs: 20, maxMs: 80 },
    ...options,
  });
  open.push(sub);
  const seqs = () => events.map((e) => Number(e.seq));
  const kinds = () => states.map((s) => s.kind);
  return { sub, events, states, tokens, seqs, kinds };
}

describe("backoff", () => {
  const b = resolveBackoff({ baseMs: 100, maxMs: 1000 });

  it("doubles the ceiling per attempt up to maxMs", () => {
    assert.deepEqual(
      [1, 2, 3, 4, 5, 6, 50, 5000].map((a) => backoffCeiling(a, b)),
      [100, 200, 400, 800, 1000, 1000, 1000, 1000],
    );
  });

  it("draws full-jitter delays within [0, ceiling]", () => {
    assert.equal(backoffDelay(3, b, () => 0), 0);
    assert.equal(backoffDelay(3, b, () => 0.5), 200);
    assert.equal(backoffDelay(3, b, () => 0.999999), 399);
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < 5000; i++) {
      const d = backoffDelay(4, b);
      assert.ok(Number.isInteger(d) && d >= 0 && d <= 800, `delay ${d} out of [0, 800]`);
      lo = Math.min(lo, d);
      hi = Math.max(hi, d);
    }
    // Full jitter spreads over the whole range, not just near the ceiling.
    assert.ok(lo < 80 && hi > 720, `delays not spread: [${lo}, ${hi}]`);
  });

  it("rejects nonsense settings", () => {
    assert.throws(() => resolveBackoff({ baseMs: 0 }), RangeError);
    assert.throws(() => resolveBackoff({ baseMs: 100, maxMs: 50 }), RangeError);
    assert.throws(() => backoffCeiling(0, b), RangeError);
    assert.deepEqual(resolveBackoff(), { baseMs: 500, maxMs: 30_000 });
  });
});

describe("subscribe", () => {
  it("goes live after caught_up and delivers notifications and read events in order", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(1, 1), ev.notification(2, 3), ev.caughtUp(3), ev.read(4, [1])]));
    const t = start(server);
    await until(() => t.events.length === 3, "3 events");
    assert.deepEqual(t.seqs(), [1, 3, 4]);
    assert.deepEqual(t.kinds(), ["connecting", "live"]);
    assert.deepEqual(t.states[1], { kind: "live", position: 3n });
    assert.equal(t.sub.position, 4n);
    assert.equal(server.calls[0]!.afterSeq, undefined, "a fresh stream sends no after_seq");
    assert.equal(server.calls[0]!.authorization, "Bearer t0");
  });

  it("delivers state events in order, with their action, target and filter, and moves the position", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([
        ev.notification(1, 1),
        ev.caughtUp(1),
        ev.state(2, StateAction.ARCHIVE, { ids: [1] }),
        ev.state(3, StateAction.SEEN, { upToSeq: 3, filter: { types: ["build.*"] } }),
      ]),
    );
    const t = start(server);
    await until(() => t.events.length === 3, "3 events");
    assert.deepEqual(t.seqs(), [1, 2, 3]);
    const kinds = t.events.map((e) =>
      e.kind.case === "state" ? [e.kind.value.action, e.kind.value.notificationIds, e.kind.value.upToSeq, e.kind.value.filter?.types] : e.kind.case,
    );
    assert.deepEqual(kinds, ["notification", [StateAction.ARCHIVE, [1n], 0n, undefined], [StateAction.SEEN, [], 3n, ["build.*"]]]);
    assert.equal(t.sub.position, 3n);
  });

  it("reconnects with exponential backoff and full jitter, resuming from the last seq", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 1), ev.caughtUp(1), ev.notification(2, 2)], Code.Unavailable),
      script([], Code.Unavailable),
      script([], Code.Internal),
      script([ev.caughtUp(2), ev.notification(3, 3)]),
    );
    const t = start(server, { backoff: { baseMs: 40, maxMs: 1000 }, random: () => 0.5 });
    await until(() => t.events.length === 3, "3 events");
    assert.deepEqual(
      t.states.filter((s) => s.kind === "reconnecting").map((s) => [s.attempt, s.delayMs, s.error.codeName]),
      [
        [1, 20, "UNAVAILABLE"], // ceiling 40, jitter 0.5
        [2, 40, "UNAVAILABLE"], // ceiling 80
        [3, 80, "INTERNAL"], // ceiling 160: "others" are retried too
      ],
    );
    assert.deepEqual(
      server.calls.map((c) => c.afterSeq),
      [undefined, 2n, 2n, 2n],
    );
    // The waits really happened (timers may fire late, never early).
    const gaps = server.calls.slice(1).map((c, i) => c.at - server.calls[i]!.at);
    [20, 40, 80].forEach((d, i) => assert.ok(gaps[i]! >= d - 2, `gap ${i} was ${gaps[i]} ms, expected >= ${d}`));
    assert.deepEqual(t.seqs(), [1, 2, 3]);
    assert.equal(t.states.at(-1)!.kind, "live");
  });

  it("keeps every reconnect delay within [0, ceiling] and resets the attempt count once live", async () => {
    const server = new FakeHerald();
    for (let i = 0; i < 4; i++) server.scripts.push(script([], Code.Unavailable));
    server.scripts.push(script([ev.caughtUp(0)], Code.Unavailable), script([ev.caughtUp(0)]));
    const t = start(server, { backoff: { baseMs: 10, maxMs: 30 } });
    await until(() => t.states.filter((s) => s.kind === "live").length === 2, "live twice");
    const retries = t.states.filter((s) => s.kind === "reconnecting");
    assert.deepEqual(
      retries.map((s) => s.attempt),
      [1, 2, 3, 4, 1],
    );
    const ceilings = [10, 20, 30, 30, 10];
    retries.forEach((s, i) => assert.ok(s.delayMs >= 0 && s.delayMs <= ceilings[i]!, `delay ${s.delayMs} > ${ceilings[i]}`));
  });

  it("never delivers a seq at or below the last one delivered", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 1), ev.notification(2, 2), ev.caughtUp(2)], Code.Unavailable),
      // A replay overlapping what was delivered, and a duplicate within the stream.
      script([ev.notification(1, 1), ev.notification(2, 2), ev.notification(3, 3), ev.notification(3, 3), ev.caughtUp(3), ev.read(2, [1]), ev.read(4, [2])]),
    );
    const t = start(server, { random: () => 0 });
    await until(() => t.events.length >= 4, "4 events");
    await sleep(20);
    assert.deepEqual(t.seqs(), [1, 2, 3, 4]);
  });

  it("resumes after the caught_up/heartbeat position when a types filter hides events", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 2, { type: "build" }), ev.caughtUp(5), ev.heartbeat(9)], Code.Unavailable),
      script([ev.caughtUp(9), ev.notification(2, 12, { type: "build" })]),
    );
    const t = start(server, { types: ["build"], categories: ["ci"], minSeverity: 3, random: () => 0 });
    await until(() => t.events.length === 2, "2 events");
    assert.deepEqual(server.calls.map((c) => [c.afterSeq, c.types, c.categories, c.minSeverity]), [
      [undefined, ["build"], ["ci"], 3],
      [9n, ["build"], ["ci"], 3],
    ]);
    assert.deepEqual(t.seqs(), [2, 12]);
  });

  it("resumes from a given afterSeq", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.notification(9, 8), ev.notification(10, 9), ev.caughtUp(9)]));
    const t = start(server, { afterSeq: 8n });
    await until(() => t.kinds().includes("live"), "live");
    assert.equal(server.calls[0]!.afterSeq, 8n);
    assert.deepEqual(t.seqs(), [9], "seq 8 is at the resume position: already processed");
  });

  it("aborts a silent stream after heartbeatIntervalMs * watchdogMultiplier and reconnects", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(4)], "hang"), script([ev.caughtUp(4)], "hang"));
    const t = start(server, { heartbeatIntervalMs: 25, watchdogMultiplier: 2, random: () => 0 });
    await server.waitForCalls(2);
    const gap = server.calls[1]!.at - server.calls[0]!.at;
    assert.ok(gap >= 48, `reconnected after ${gap} ms, before the 50 ms watchdog`);
    assert.ok(server.calls[0]!.signal.aborted, "the silent call was aborted");
    const r = t.states.find((s) => s.kind === "reconnecting");
    assert.ok(r && r.kind === "reconnecting");
    assert.equal(r.error.code, Code.DeadlineExceeded);
    assert.match(r.error.message, /watchdog/);
    assert.equal(server.calls[1]!.afterSeq, 4n);
  });

  it("follows a longer heartbeat interval stated in caught_up: no reconnect between heartbeats", async () => {
    const server = new FakeHerald();
    server.scripts.push(async function* (_req, ctx) {
      // The server's interval is 100 ms; the client was told 20 ms (a 40 ms watchdog).
      yield ev.caughtUp(1, { heartbeatMs: 100 });
      for (let i = 0; i < 4 && !ctx.signal.aborted; i++) {
        await sleep(90);
        yield ev.heartbeat(1);
      }
      await aborted(ctx.signal);
    });
    const t = start(server, { heartbeatIntervalMs: 20, watchdogMultiplier: 2 });
    await until(() => t.kinds().includes("live"), "live");
    assert.equal(t.sub.heartbeatIntervalMs, 100);
    await sleep(400);
    assert.equal(server.calls.length, 1, "reconnected although heartbeats came as the server said");
    assert.deepEqual(t.kinds(), ["connecting", "live"]);
  });

  it("follows a shorter stated interval, on this stream and the next attempts", async () => {
    const server = new FakeHerald();
    // Told 10 s; the server says 30 ms, then goes silent: dead after 60 ms.
    server.scripts.push(script([ev.caughtUp(2, { heartbeatMs: 30 })], "hang"), script([], "hang"));
    const t = start(server, { heartbeatIntervalMs: 10_000, watchdogMultiplier: 2, random: () => 0 });
    await server.waitForCalls(3, 3000);
    const gaps = server.calls.slice(1).map((c, i) => c.at - server.calls[i]!.at);
    // The second attempt never got caught_up: the server's interval still applies.
    for (const gap of gaps) assert.ok(gap >= 58 && gap < 1000, `reconnected after ${gap} ms, expected about 60`);
    const r = t.states.find((s) => s.kind === "reconnecting");
    assert.match(r?.kind === "reconnecting" ? r.error.message : "", /no event for 60 ms/);
  });

  it("uses the option's interval while caught_up states none (an older server)", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(1)], "hang"), script([ev.caughtUp(1)], "hang"));
    const t = start(server, { heartbeatIntervalMs: 40, watchdogMultiplier: 2, random: () => 0 });
    await server.waitForCalls(2);
    assert.equal(t.sub.heartbeatIntervalMs, 40);
    const gap = server.calls[1]!.at - server.calls[0]!.at;
    assert.ok(gap >= 78, `reconnected after ${gap} ms, before the 80 ms watchdog`);
  });

  it("keeps a stream that gets heartbeats open", async () => {
    const server = new FakeHerald();
    server.scripts.push(async function* (_req, ctx) {
      yield ev.caughtUp(1);
      // 300 ms of heartbeats every 10 ms, against a 100 ms watchdog.
      for (let i = 0; i < 30 && !ctx.signal.aborted; i++) {
        await sleep(10);
        yield ev.heartbeat(1);
      }
      await sleep(1000);
    });
    const t = start(server, { heartbeatIntervalMs: 50, watchdogMultiplier: 2 });
    await sleep(300);
    assert.equal(server.calls.length, 1);
    assert.deepEqual(t.kinds(), ["connecting", "live"]);
  });

  it("asks for a fresh token once on UNAUTHENTICATED and retries at once", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([], Code.Unauthenticated), script([ev.caughtUp(0)]));
    let n = 0;
    const requests: boolean[] = [];
    const t = start(server, {
      getToken: async ({ forceRefresh }) => {
        requests.push(forceRefresh);
        await sleep(1);
        return `token${n++}`;
      },
    });
    await until(() => t.kinds().includes("live"), "live");
    assert.deepEqual(requests, [false, true]);
    assert.deepEqual(server.calls.map((c) => c.authorization), ["Bearer token0", "Bearer token1"]);
    assert.ok(!t.kinds().includes("reconnecting"), "no backoff before the token retry");
  });

  it("stops with UNAUTHENTICATED when the fresh token is refused too", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([], Code.Unauthenticated), script([], Code.Unauthenticated), script([ev.caughtUp(0)]));
    const t = start(server);
    const final = await t.sub.done;
    assert.equal(final.error?.codeName, "UNAUTHENTICATED");
    assert.deepEqual(t.tokens, [false, true]);
    await sleep(60);
    assert.equal(server.calls.length, 2, "no retries after giving up");
    assert.equal(t.sub.state.kind, "stopped");
  });

  it("allows one token refresh again after the stream was live", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([], Code.Unauthenticated),
      script([ev.caughtUp(0)], Code.Unauthenticated), // token expired later
      script([ev.caughtUp(0)]),
    );
    const t = start(server);
    await server.waitForCalls(3);
    await until(() => t.kinds().filter((k) => k === "live").length === 2, "live twice");
    assert.deepEqual(t.tokens, [false, true, true]);
  });

  it("stops on INVALID_ARGUMENT without retrying", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([], Code.InvalidArgument), script([ev.caughtUp(0)]));
    const t = start(server, { afterSeq: 99n });
    const final = await t.sub.done;
    assert.ok(final.error instanceof HeraldError);
    assert.equal(final.error.code, Code.InvalidArgument);
    await sleep(60);
    assert.equal(server.calls.length, 1);
    assert.deepEqual(t.kinds(), ["connecting", "stopped"]);
  });

  it("reconnects when the server ends the stream without an error", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(3)], "end"), script([ev.caughtUp(3)]));
    const t = start(server, { random: () => 0 });
    await server.waitForCalls(2);
    const r = t.states.find((s) => s.kind === "reconnecting");
    assert.equal(r?.kind === "reconnecting" && r.error.code, Code.Unavailable);
    assert.equal(server.calls[1]!.afterSeq, 3n);
  });

  it("retries with backoff when the token provider fails", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(0)]));
    let calls = 0;
    const t = start(server, {
      getToken: () => {
        if (calls++ === 0) throw new Error("login service down");
        return "t";
      },
      random: () => 0,
    });
    await until(() => t.kinds().includes("live"), "live");
    const r = t.states.find((s) => s.kind === "reconnecting");
    assert.match(r?.kind === "reconnecting" ? r.error.message : "", /login service down/);
  });

  it("reports resync with the position and goes on live", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.resync(40, { reason: Resync_Reason.PRUNED }), ev.caughtUp(40), ev.notification(7, 41)]),
    );
    const resyncs: [bigint, ResyncInfo][] = [];
    const t = start(server, { afterSeq: 3n, onResync: (p, info) => resyncs.push([p, info]) });
    await until(() => t.events.length === 1, "1 event");
    assert.deepEqual(resyncs, [[40n, { epoch: 0n, reason: Resync_Reason.PRUNED }]]);
    assert.deepEqual(t.seqs(), [41]);
  });

  it("resumes with the seq and the epoch of the last event", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script([ev.notification(1, 1, { epoch: 7 }), ev.caughtUp(1, { epoch: 7 }), ev.heartbeat(3, 7)], Code.Unavailable),
      script([ev.caughtUp(3, { epoch: 7 })]),
    );
    const t = start(server, { random: () => 0 });
    await server.waitForCalls(2);
    assert.deepEqual(
      server.calls.map((c) => [c.afterSeq, c.epoch]),
      [
        [undefined, 0n],
        [3n, 7n],
      ],
    );
    assert.equal(t.sub.epoch, 7n);
  });

  it("sends a given epoch with afterSeq, and none without it", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(8, { epoch: 3 })]), script([ev.caughtUp(0, { epoch: 3 })]));
    start(server, { afterSeq: 8n, epoch: 3n });
    await server.waitForCalls(1);
    start(server, { epoch: 3n });
    await server.waitForCalls(2);
    assert.deepEqual(
      server.calls.map((c) => [c.afterSeq, c.epoch]),
      [
        [8n, 3n],
        [undefined, 0n],
      ],
    );
  });

  it("after a resync into a new epoch, delivers its seqs although they are lower, and resumes in it", async () => {
    const server = new FakeHerald();
    server.scripts.push(
      script(
        [ev.notification(1, 1, { epoch: 5 }), ev.notification(2, 2, { epoch: 5 }), ev.notification(3, 3, { epoch: 5 }), ev.caughtUp(3, { epoch: 5 })],
        Code.Unavailable,
      ),
      // The server restarted with an empty in-memory store: a new epoch, whose head is 0.
      script(
        [
          ev.resync(0, { epoch: 9, reason: Resync_Reason.EPOCH_CHANGED }),
          ev.caughtUp(0, { epoch: 9 }),
          ev.notification(10, 1, { epoch: 9 }),
          ev.notification(11, 2, { epoch: 9 }),
        ],
        Code.Unavailable,
      ),
      script([ev.caughtUp(2, { epoch: 9 })]),
    );
    const resyncs: [bigint, ResyncInfo][] = [];
    const t = start(server, { random: () => 0, onResync: (p, info) => resyncs.push([p, info]) });
    await server.waitForCalls(3);
    await until(() => t.states.filter((s) => s.kind === "live").length === 3, "live three times");
    assert.deepEqual(t.seqs(), [1, 2, 3, 1, 2]);
    assert.deepEqual(
      t.events.map((e) => e.epoch),
      [5n, 5n, 5n, 9n, 9n],
    );
    assert.deepEqual(resyncs, [[0n, { epoch: 9n, reason: Resync_Reason.EPOCH_CHANGED }]]);
    assert.deepEqual(
      server.calls.map((c) => [c.afterSeq, c.epoch]),
      [
        [undefined, 0n],
        [3n, 5n],
        [2n, 9n],
      ],
    );
    assert.deepEqual([t.sub.position, t.sub.epoch], [2n, 9n]);
  });

  it("sends no authorization header for an empty token", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(0)]));
    start(server, { getToken: () => "" });
    await server.waitForCalls(1);
    assert.equal(server.calls[0]!.authorization, null);
  });

  it("close() aborts the call, stops without error, and never reconnects", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(0)]));
    const t = start(server);
    await until(() => t.kinds().includes("live"), "live");
    t.sub.close();
    t.sub.close();
    const final = await t.sub.done;
    assert.deepEqual(final, { kind: "stopped" });
    await sleep(30);
    assert.ok(server.calls[0]!.signal.aborted);
    assert.equal(server.calls.length, 1);
    assert.deepEqual(t.kinds(), ["connecting", "live", "stopped"]);
  });

  it("close() during a backoff wait cancels the retry", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([], Code.Unavailable));
    const t = start(server, { backoff: { baseMs: 200, maxMs: 200 }, random: () => 0.9 });
    await until(() => t.kinds().includes("reconnecting"), "reconnecting");
    t.sub.close();
    await sleep(250);
    assert.equal(server.calls.length, 1);
    assert.equal(t.sub.state.kind, "stopped");
  });

  it("keeps streaming when onEvent throws, and reports the exception", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(0), ev.notification(1, 1), ev.notification(2, 2)]));
    const reported: unknown[] = [];
    const g = globalThis as { reportError?: (e: unknown) => void };
    const previous = g.reportError;
    g.reportError = (e) => reported.push(e);
    try {
      const seen: number[] = [];
      const t = start(server, {
        onEvent: (e) => {
          seen.push(Number(e.seq));
          if (e.seq === 1n) throw new Error("app bug");
        },
      });
      await until(() => seen.length === 2, "2 events");
      assert.equal(t.sub.position, 2n);
      assert.equal((reported[0] as Error).message, "app bug");
    } finally {
      g.reportError = previous;
    }
  });

  it("rejects invalid timing options synchronously", () => {
    const server = new FakeHerald();
    const base = { transport: server.transport, getToken: () => "", onEvent: () => {} };
    assert.throws(() => subscribe({ ...base, heartbeatIntervalMs: 0 }), RangeError);
    assert.throws(() => subscribe({ ...base, watchdogMultiplier: 1 }), RangeError);
    assert.throws(() => subscribe({ ...base, backoff: { baseMs: -1 } }), RangeError);
  });
});

describe("subscribe() callbacks", () => {
  it("start only after subscribe() has returned the handle", async () => {
    const server = new FakeHerald();
    server.scripts.push(script([ev.caughtUp(3)]));
    const seen: string[] = [];
    const sub: Subscription = subscribe({
      transport: server.transport,
      getToken: () => "t",
      onEvent: () => {},
      onState: (s) => seen.push(`${s.kind}:${sub.state.kind}`),
    });
    open.push(sub);
    assert.deepEqual(seen, []);
    await until(() => seen.length === 2, "2 states");
    assert.deepEqual(seen, ["connecting:connecting", "live:live"]);
  });
});
