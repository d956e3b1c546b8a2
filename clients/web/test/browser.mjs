// End-to-end browser test of the inbox demo over grpc-web, in a real
// headless Chromium, against two real Herald replicas on one PostgreSQL,
// and one with the in-memory store (restarted: a new epoch).
//
// Driven by tests/browser.rs (`cargo test --test browser`); can be run by
// hand from clients/web:
//   HERALD_BIN=../../target/debug/herald \
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/<an empty database> \
//   HERALD_JWT_SECRET=<at least 32 bytes> node test/browser.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), HERALD_SCREENSHOT (write
// the inbox screenshot there), BROWSER_TEST_TIMEOUT_MS (default 170000).
// Everything listens on 127.0.0.1 only. Every child process is killed and
// every temporary directory removed on exit, whatever happens.
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync } from "node:fs";
import { request as httpRequest } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { buildDemo } from "../scripts/build-demo.mjs";
import { startStaticServer } from "../scripts/serve.mjs";
import { CHROMIUM_ARGS, Replica, bundleNativeClient, check, createHarness, freePort, prepareRun, runMain, sleep, waitUntil } from "./harness.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const BUDGET_MS = Number(process.env.BROWSER_TEST_TIMEOUT_MS ?? 170_000);
const LATENCY_LIMIT_MS = 1000;
const HEARTBEAT_MS = 2000;
/** The in-memory replica's heartbeat interval; its page is told a shorter one. */
const MEMORY_HEARTBEAT_MS = 3000;

// ---------------------------------------------------------------------------
// Clean-up: children, browser, servers, temp dirs — on every exit path.

const { children, tempDirs, closers, cleanup } = createHarness("browser test");
const replicas = [];

function log(message) {
  console.log(`[browser] ${message}`);
}

/** Waits until `replica` answers a gRPC call (with `token`). */
const waitReady = (replica, native, token) =>
  replica.waitReady(() =>
    native.getUnreadCount({}, { headers: { authorization: `Bearer ${token}` }, timeoutMs: 2000 }),
  );

/** A raw HTTP request to a replica (for CORS checks). Resolves with `{ status, headers }`. */
function rawRequest(url, { method, headers, body }) {
  return new Promise((resolveReq, reject) => {
    const req = httpRequest(url, { method, headers }, (res) => {
      res.resume();
      res.on("end", () => resolveReq({ status: res.statusCode, headers: res.headers }));
    });
    req.on("error", reject);
    req.setTimeout(5000, () => req.destroy(new Error("timeout")));
    req.end(body);
  });
}

// Page helpers ---------------------------------------------------------------

const q = {
  status: '[data-testid="status"]',
  badge: '[data-testid="badge"]',
  unseen: '[data-testid="unseen"]',
  error: '[data-testid="error"]',
  resync: '[data-testid="resync"]',
  item: '[data-testid="notification"]',
};

async function pageState(page) {
  return page.evaluate((sel) => {
    const status = document.querySelector(sel.status);
    const badge = document.querySelector(sel.badge);
    const unseen = document.querySelector(sel.unseen);
    const error = document.querySelector(sel.error);
    const resync = document.querySelector(sel.resync);
    return {
      status: status?.getAttribute("data-status") ?? null,
      statusText: status?.textContent ?? null,
      errorCode: status?.getAttribute("data-error-code") ?? "",
      liveCount: Number(status?.getAttribute("data-live-count") ?? 0),
      error: error?.textContent ?? null,
      resync: resync
        ? {
            reason: resync.getAttribute("data-reason"),
            epoch: resync.getAttribute("data-epoch"),
            refetching: resync.getAttribute("data-refetching") === "true",
            text: resync.textContent ?? "",
          }
        : null,
      badge: badge ? Number(badge.getAttribute("data-count")) : null,
      unseen: unseen ? Number(unseen.getAttribute("data-count")) : null,
      items: [...document.querySelectorAll(sel.item)].map((li) => ({
        id: li.getAttribute("data-id"),
        seq: Number(li.getAttribute("data-seq")),
        read: li.getAttribute("data-read") === "true",
        seen: li.getAttribute("data-seen") === "true",
        shownAt: Number(li.getAttribute("data-shown-at")),
        title: li.querySelector('[data-testid="notification-title"]')?.textContent ?? "",
        severity: li.querySelector('[data-testid="severity"]')?.textContent ?? "",
        group: li.querySelector('[data-testid="group"]')?.textContent?.trim() ?? "",
        actions: [...li.querySelectorAll('[data-testid="notification-action"]')].map((a) => [
          a.textContent,
          a.getAttribute("href"),
        ]),
      })),
    };
  }, q);
}

/** Polls the page until `predicate(state)` holds; fails with the last state after `timeoutMs`. */
const waitFor = (page, predicate, what, timeoutMs = 10_000) =>
  waitUntil(() => pageState(page), predicate, what, timeoutMs);

function assertOrderedOnce(state, label) {
  const seqs = state.items.map((i) => i.seq);
  const ids = state.items.map((i) => i.id);
  check(new Set(ids).size === ids.length, `${label}: duplicate notifications shown: ${seqs}`);
  for (let i = 1; i < seqs.length; i++) {
    check(seqs[i - 1] > seqs[i], `${label}: not newest first: ${seqs}`);
  }
}

// ---------------------------------------------------------------------------

async function main() {
  const { bin, databaseUrl, secret, chromiumPath, tmp, logDir } = prepareRun(tempDirs, "test/browser.mjs", "herald-browser-");


  // Build what the test needs: the demo bundle, and a native gRPC client.
  await buildDemo();
  const { nativeClient, mintToken } = await bundleNativeClient(tmp);

  // The page, served from an allowed origin and from a refused one.
  const page = await startStaticServer({ port: 0 });
  const other = await startStaticServer({ port: 0 });
  for (const s of [page, other]) {
    closers.push(
      () =>
        new Promise((r) => {
          s.server.close(r);
          s.server.closeAllConnections();
        }),
    );
  }
  log(`page origin ${page.url} (allowed), ${other.url} (not allowed)`);

  const [portA, portB] = [await freePort(), await freePort()];
  const common = { bin, databaseUrl, secret, corsOrigin: page.url, logDir, heartbeatMs: HEARTBEAT_MS, children };
  const A = new Replica("A", { ...common, port: portA }).start();
  const B = new Replica("B", { ...common, port: portB }).start();
  replicas.push(A, B);
  const nativeA = nativeClient(A.url);
  const nativeB = nativeClient(B.url);

  // Alice's token as `herald token` prints it; the sender's minted here.
  const alice = execFileSync(bin, ["token", "--user", "alice"], {
    env: { PATH: process.env.PATH ?? "", HERALD_JWT_SECRET: secret },
    encoding: "utf8",
  }).trim();
  const sender = mintToken(secret, "browser-test", "notifications:send");
  const auth = (token) => ({ headers: { authorization: `Bearer ${token}` }, timeoutMs: 5000 });
  await waitReady(A, nativeA, alice);
  await waitReady(B, nativeB, alice);
  log(`replicas A ${A.url} and B ${B.url} ready`);

  /** Sends one notification to alice through `client`; resolves with its seq. */
  const send = async (client, title, body = "", type = "demo", extra = {}) => {
    const response = await client.sendNotification(
      { recipients: ["alice"], type, title, body, data: "{}", ...extra },
      auth(sender),
    );
    return Number(response.deliveries[0].seq);
  };

  const userDataDir = mkdtempSync(join(tmpdir(), "herald-chromium-"));
  tempDirs.push(userDataDir);
  const browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    viewport: { width: 720, height: 640 },
    args: CHROMIUM_ARGS,
  });
  closers.push(() => browser.close());
  const consoleErrors = [];
  const open = async (origin, params) => {
    const p = await browser.newPage();
    p.on("pageerror", (e) => consoleErrors.push(`${origin}: ${e.message}`));
    const query = new URLSearchParams({ heartbeat: String(HEARTBEAT_MS), ...params });
    await p.goto(`${origin}/?${query}`);
    return p;
  };

  // 1. The page (alice, replica A) goes live; a notification sent through
  //    replica B over native gRPC shows up within 1 s.
  const page1 = await open(page.url, { server: A.url, token: alice });
  await waitFor(page1, (s) => s.status === "live", "page 1 live");
  log("page 1 (alice, replica A) is live");

  const latencies = [];
  // The first carries every presentation field: the page shows its
  // severity and its action buttons.
  const rich = {
    category: "builds",
    severity: 3, // herald.v1.Severity.HIGH
    actionUrl: "/builds/41",
    actions: [
      { label: "Open build", url: "/builds/41" },
      { label: "Logs", url: "https://ci.example.com/41/logs" },
    ],
  };
  const messages = [
    ["build.passed", "Build #41 passed", "main · 212 tests · 3 min 12 s", rich],
    ["chat.mention", "You were mentioned in #release", "bob: @alice can you sign off the 1.4 notes?"],
    ["deploy.finished", "Deploy to staging finished", "herald 1.4.0-rc.2 is live on staging"],
    ["review.comment", "New comment on PR #1024", "carol: looks good, one nit on the retry loop"],
    ["report.ready", "Weekly report is ready", "Open rate up 12 % week over week"],
  ];
  const titles = messages.map(([, title]) => title);
  for (const [type, title, body, extra] of messages) {
    const sentAt = Date.now();
    const seq = await send(nativeB, title, body, type, extra);
    const state = await waitFor(page1, (s) => s.items.some((i) => i.seq === seq), `seq ${seq} on page 1`, 5000);
    const item = state.items.find((i) => i.seq === seq);
    check(item.title === title, `seq ${seq} shows "${item.title}", expected "${title}"`);
    const actions = JSON.stringify(item.actions);
    const wantActions = JSON.stringify((extra?.actions ?? []).map((a) => [a.label, a.url]));
    check(actions === wantActions, `seq ${seq} shows actions ${actions}, expected ${wantActions}`);
    check(item.severity === (extra ? "high" : ""), `seq ${seq} shows severity "${item.severity}"`);
    latencies.push(item.shownAt - sentAt);
  }
  const sorted = [...latencies].sort((a, b) => a - b);
  log(
    `send (native gRPC, replica B) -> display (grpc-web, replica A) latency, ms: ` +
      `${latencies.join(", ")} (min ${sorted[0]}, median ${sorted[Math.floor(sorted.length / 2)]}, max ${sorted.at(-1)})`,
  );
  for (const ms of latencies) check(ms < LATENCY_LIMIT_MS, `a notification took ${ms} ms to show (limit ${LATENCY_LIMIT_MS} ms)`);
  let s1 = await waitFor(page1, (s) => s.badge === titles.length, `badge ${titles.length}`);
  assertOrderedOnce(s1, "page 1");

  // 2. A second page for alice on replica B; marking read on page 1 updates
  //    both badges, page 2's live through its own stream.
  const page2 = await open(page.url, { server: B.url, token: alice });
  await waitFor(page2, (s) => s.status === "live" && s.badge === titles.length, "page 2 live with the same unread count");
  log("page 2 (alice, replica B) is live");
  const target = s1.items[2];
  await page1.click(`${q.item}[data-seq="${target.seq}"] [data-testid="mark-read"]`);
  const clickedAt = Date.now();
  s1 = await waitFor(page1, (s) => s.badge === titles.length - 1, "page 1 badge after mark read", 5000);
  check(s1.items.find((i) => i.seq === target.seq).read, "page 1: the item is not shown read");
  const s2 = await waitFor(
    page2,
    (s) => s.badge === titles.length - 1 && s.items.find((i) => i.seq === target.seq)?.read,
    "page 2 to show the read state live",
    5000,
  );
  log(`mark read on page 1 reached page 2 (replica B) in ${Date.now() - clickedAt} ms`);
  assertOrderedOnce(s2, "page 2");

  // Screenshot: a few notifications, one read.
  const screenshot = process.env.HERALD_SCREENSHOT ?? join(tmp, "inbox.png");
  mkdirSync(dirname(resolve(screenshot)), { recursive: true });
  await page1.locator("main.inbox").screenshot({ path: screenshot });
  log(`screenshot: ${process.env.HERALD_SCREENSHOT ? screenshot : "(temporary)"}`);

  // 3. Inbox state set on page 1 reaches page 2 (replica B) live: the read
  //    one marked unread again (still seen), the newest archived, the next
  //    deleted; then the bell opened on page 1 clears both unseen badges.
  //    Counts: 5 unread, 4 unseen (the read one was seen) → unread again: 5
  //    unread → archive and delete two unseen ones: 3 unread, 2 unseen.
  const [archived, deleted] = [s1.items[0], s1.items[1]];
  check(![archived.seq, deleted.seq].includes(target.seq), "page 1: the read item is among the newest two");
  const gone = (s, item) => !s.items.some((i) => i.seq === item.seq);
  await page1.click(`${q.item}[data-seq="${target.seq}"] [data-testid="mark-unread"]`);
  await waitFor(page1, (s) => s.badge === titles.length && !s.items.find((i) => i.seq === target.seq)?.read, "page 1: unread again", 5000);
  await page1.click(`${q.item}[data-seq="${archived.seq}"] [data-testid="archive"]`);
  await waitFor(page1, (s) => gone(s, archived) && s.badge === titles.length - 1, "page 1: archived", 5000);
  await page1.click(`${q.item}[data-seq="${deleted.seq}"] [data-testid="delete"]`);
  const stateClickedAt = Date.now();
  s1 = await waitFor(page1, (s) => gone(s, deleted) && s.badge === titles.length - 2, "page 1: deleted", 5000);
  check(s1.unseen === titles.length - 3, `page 1 unseen badge ${s1.unseen}, expected ${titles.length - 3}`);
  const reflected = (s) => {
    const t = s.items.find((i) => i.seq === target.seq);
    return gone(s, archived) && gone(s, deleted) && t && !t.read && t.seen && s.badge === titles.length - 2;
  };
  let s2b = await waitFor(page2, reflected, "page 2 to show unread, archive and delete live", 5000);
  check(s2b.unseen === titles.length - 3, `page 2 unseen badge ${s2b.unseen}, expected ${titles.length - 3}`);
  assertOrderedOnce(s2b, "page 2 after the state changes");
  log(`unread, archive and delete on page 1 reached page 2 (replica B) in ${Date.now() - stateClickedAt} ms after the last click`);
  await page1.click('[data-testid="bell"]');
  s1 = await waitFor(page1, (s) => s.unseen === 0 && s.items.every((i) => i.seen), "page 1: everything seen after the bell", 5000);
  check(s1.badge === titles.length - 2, `page 1: opening the bell changed the unread badge to ${s1.badge}`);
  s2b = await waitFor(page2, (s) => s.unseen === 0 && s.badge === titles.length - 2, "page 2: unseen badge cleared live", 5000);
  // The archived one is kept and listed as archived; the deleted one is gone.
  const inArchive = await nativeB.listNotifications({ archived: true }, auth(alice));
  const archivedSeqs = inArchive.notifications.map((n) => Number(n.seq));
  check(archivedSeqs.includes(archived.seq) && !archivedSeqs.includes(deleted.seq), `archived listing: seqs ${archivedSeqs}`);
  log(`bell opened on page 1: unseen 0 on both pages; archived listing holds seq ${archived.seq}`);

  // 3b. Updates in place and grouping, sent through B: a progress
  //     notification replaced three times (the last renotifies) and two
  //     comments folding into one group show as one item each, updated
  //     live on both pages, in their first place.
  const progressSeq = await send(nativeB, "Export 10 %", "", "export.progress", { replaceKey: "export-7" });
  for (const [pct, renotify] of [[60, false], [100, true]]) {
    await send(nativeB, `Export ${pct} %`, "", "export.progress", { replaceKey: "export-7", renotify });
  }
  const window = { seconds: 3600n, nanos: 0 };
  const groupSeq = await send(nativeB, "carol commented", "", "review.comment", { groupKey: "pr-1024", groupWindow: window, actor: "carol" });
  await send(nativeB, "dave commented", "", "review.comment", { groupKey: "pr-1024", groupWindow: window, actor: "dave" });
  for (const [p, name] of [[page1, "page 1"], [page2, "page 2"]]) {
    const s = await waitFor(
      p,
      (s) =>
        s.items.find((i) => i.seq === progressSeq)?.title === "Export 100 %" &&
        s.items.find((i) => i.seq === groupSeq)?.group === "· by dave and 1 other",
      `${name}: the progress at 100 % and the group of two, in place`,
      5000,
    );
    check(s.items.filter((i) => i.title.startsWith("Export")).length === 1, `${name}: one progress item`);
    check(s.items.filter((i) => i.title.endsWith("commented")).length === 1, `${name}: one group item`);
    assertOrderedOnce(s, `${name} after updates in place`);
  }
  log("a replaced progress notification and a group of two show as one item each on both pages");
  s1 = await pageState(page1);

  // 4. Replica A stops (SIGTERM) and starts again on the same port; what is
  //    sent through B meanwhile shows up on page 1 after it reconnects,
  //    once each, in order.
  const before = s1.items.length;
  const unreadBefore = s1.badge;
  const stopped = await A.stop();
  log(`replica A stopped (${stopped})`);
  await waitFor(page1, (s) => s.status !== "live", "page 1 to notice replica A is gone", 10_000);
  const missed = [];
  for (const title of ["While A was down: 1", "While A was down: 2", "While A was down: 3"]) {
    missed.push(await send(nativeB, title));
  }
  await waitFor(page2, (s) => missed.every((seq) => s.items.some((i) => i.seq === seq)), "page 2 (on B) to get them live");
  await sleep(500);
  s1 = await pageState(page1);
  check(!missed.some((seq) => s1.items.some((i) => i.seq === seq)), "page 1 showed events while its replica was down?");
  A.start();
  await waitReady(A, nativeA, alice);
  log("replica A restarted on the same port");
  s1 = await waitFor(
    page1,
    (s) => s.status === "live" && missed.every((seq) => s.items.some((i) => i.seq === seq)),
    "page 1 to reconnect and show what it missed",
    30_000,
  );
  assertOrderedOnce(s1, "page 1 after reconnect");
  check(s1.items.length === before + missed.length, `page 1 shows ${s1.items.length} items, expected ${before + missed.length}`);
  check(s1.badge === unreadBefore + missed.length, `page 1 badge ${s1.badge}, expected ${unreadBefore + missed.length}`);
  // Nothing is re-delivered later either.
  await sleep(HEARTBEAT_MS + 500);
  s1 = await pageState(page1);
  assertOrderedOnce(s1, "page 1 after a heartbeat");
  check(s1.items.length === before + missed.length, "page 1 item count changed after reconnect");
  log(`page 1 reconnected and showed seqs ${missed.join(", ")} once each, in order`);

  // 5. Origins not on the allow-list are refused.
  const preflight = (origin) =>
    rawRequest(`${A.url}/herald.v1.Notifications/Subscribe`, {
      method: "OPTIONS",
      headers: {
        origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web,x-user-agent",
      },
    });
  const allowed = await preflight(page.url);
  check(allowed.headers["access-control-allow-origin"] === page.url, `preflight from the allowed origin: ${JSON.stringify(allowed.headers)}`);
  const allowHeaders = String(allowed.headers["access-control-allow-headers"] ?? "").toLowerCase();
  for (const h of ["authorization", "content-type", "x-grpc-web", "x-user-agent"]) {
    check(allowHeaders.includes(h), `preflight does not allow request header ${h}: ${allowHeaders}`);
  }
  const refused = await preflight(other.url);
  check(
    refused.headers["access-control-allow-origin"] === undefined,
    `preflight from ${other.url} got access-control-allow-origin: ${refused.headers["access-control-allow-origin"]}`,
  );
  const page3 = await open(other.url, { server: A.url, token: alice });
  const s3 = await waitFor(page3, (s) => s.status === "reconnecting" && s.error !== null, "the refused origin's page to fail", 10_000);
  await sleep(1500);
  const s3b = await pageState(page3);
  check(s3b.status !== "live" && s3b.items.length === 0, `the page from ${other.url} got through: ${JSON.stringify(s3b)}`);
  log(`page from ${other.url} refused by CORS: preflight has no allow-origin; page shows "${s3.error}"`);
  // And a browser fetch from the allowed page sees the exposed gRPC trailers-as-headers.
  const exposed = await page1.evaluate(async (server) => {
    const r = await fetch(`${server}/herald.v1.Notifications/GetUnreadCount`, {
      method: "POST",
      headers: { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" },
      body: new Uint8Array([0, 0, 0, 0, 0]),
    });
    await r.arrayBuffer();
    return { status: r.status, grpcStatus: r.headers.get("grpc-status"), grpcMessage: r.headers.get("grpc-message") };
  }, A.url);
  check(exposed.grpcStatus === "16", `an unauthenticated grpc-web call from the page: ${JSON.stringify(exposed)}`);
  log(`unauthenticated grpc-web fetch from the allowed page: grpc-status ${exposed.grpcStatus} (${exposed.grpcMessage}) readable`);

  // 6. A replica with the in-memory store. Its page assumes a 1 s heartbeat
  //    (a 2 s watchdog), the server states 3 s in caught_up: the page
  //    follows the server and stays connected between heartbeats. Then the
  //    replica restarts, losing everything: the page's resume position is
  //    of the old epoch, the server answers with resync, and the page shows
  //    that and the refetched inbox — none of the old notifications, no
  //    error — and goes on live in the new epoch, whose seqs start over.
  const M = new Replica("M", { ...common, databaseUrl: undefined, port: await freePort(), heartbeatMs: MEMORY_HEARTBEAT_MS });
  replicas.push(M);
  M.start();
  const nativeM = nativeClient(M.url);
  await waitReady(M, nativeM, alice);
  const page4 = await open(page.url, { server: M.url, token: alice, heartbeat: "1000" });
  await waitFor(page4, (s) => s.status === "live", "page 4 (in-memory replica) live");
  const before4 = ["Before the restart: 1", "Before the restart: 2"];
  for (const title of before4) await send(nativeM, title);
  let s4 = await waitFor(page4, (s) => s.badge === 2 && s.items.length === 2, "page 4 to show 2 notifications", 5000);
  const lives = s4.liveCount;
  const quietMs = 2 * MEMORY_HEARTBEAT_MS + 1000;
  await sleep(quietMs);
  s4 = await pageState(page4);
  check(
    s4.status === "live" && s4.liveCount === lives,
    `page 4 reconnected during ${quietMs} ms of ${MEMORY_HEARTBEAT_MS} ms heartbeats (its watchdog did not follow the server): ${JSON.stringify(s4)}`,
  );
  log(`page 4 stayed connected for ${quietMs} ms: its watchdog follows the server's ${MEMORY_HEARTBEAT_MS} ms heartbeat, not the 1000 ms it was given`);

  log(`replica M (in memory) stopped (${await M.stop()})`);
  await waitFor(page4, (s) => s.status !== "live", "page 4 to notice replica M is gone", 10_000);
  M.start();
  await waitReady(M, nativeM, alice);
  log("replica M restarted on the same port, with an empty store");
  // Sent while the page may or may not have reconnected yet: it arrives
  // live, or with the refetch; either way it is shown once.
  const whileAway = "After the restart: 1";
  await send(nativeM, whileAway);
  s4 = await waitFor(
    page4,
    (s) => s.status === "live" && s.resync !== null && !s.resync.refetching,
    "page 4 to resync and refetch",
    30_000,
  );
  check(s4.resync.reason === "EPOCH_CHANGED", `page 4 resync reason: ${JSON.stringify(s4.resync)}`);
  log(`page 4 shows "${s4.resync.text}" (epoch ${s4.resync.epoch})`);
  const after = "After the restart: 2";
  const afterSeq = await send(nativeM, after);
  s4 = await waitFor(
    page4,
    (s) => [whileAway, after].every((title) => s.items.some((i) => i.title === title)),
    "page 4 to show the new epoch's notifications",
    5000,
  );
  await sleep(300);
  s4 = await pageState(page4);
  const titles4 = s4.items.map((i) => i.title);
  check(!titles4.some((t) => before4.includes(t)), `page 4 still shows notifications the restarted replica lost: ${titles4}`);
  check(titles4.length === 2, `page 4 shows ${JSON.stringify(titles4)}, expected the two sent after the restart`);
  check(s4.badge === 2, `page 4 badge ${s4.badge}, expected 2`);
  check(s4.error === null && s4.errorCode === "", `page 4 shows an error: ${s4.error ?? s4.errorCode}`);
  check(afterSeq <= 2, `the restarted replica's seqs did not start over (seq ${afterSeq})`);
  assertOrderedOnce(s4, "page 4 after the resync");
  log(`page 4 after the restart: ${JSON.stringify(titles4)} (seqs ${s4.items.map((i) => i.seq)}), badge ${s4.badge}, no error`);

  // 7. No token, or a garbage one: UNAUTHENTICATED in the page's state.
  for (const [label, params] of [
    ["no token", { server: A.url }],
    ["garbage token", { server: A.url, token: "not.a.jwt" }],
  ]) {
    const p = await open(page.url, params);
    const s = await waitFor(p, (st) => st.status === "stopped", `the ${label} page to stop`, 10_000);
    check(s.errorCode === "UNAUTHENTICATED", `${label}: state ${JSON.stringify(s)}`);
    check((s.error ?? "").startsWith("UNAUTHENTICATED"), `${label}: error text ${s.error}`);
    log(`${label}: page shows "${s.statusText}" / "${s.error}"`);
  }

  check(consoleErrors.length === 0, `uncaught errors in pages: ${consoleErrors.join("; ")}`);
  log("all browser checks passed");
}

await runMain({ name: "browser test", main, budgetMs: BUDGET_MS, cleanup, replicas });
