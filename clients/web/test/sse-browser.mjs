// End-to-end test of the plain Server-Sent Events page (clients/sse/index.html:
// fetch + EventSource, no client code of ours) in a real headless Chromium,
// against two real Herald replicas on one PostgreSQL.
//
// The page, served from another port of 127.0.0.1 (cross-origin, same
// site), opens its stream on replica A; notifications are sent as Connect
// JSON calls (Connect-ES's own client) through replica B. Replica A stops (SIGTERM) and starts again
// on the same port: the page's EventSource reconnects by itself, with
// Last-Event-ID and the resume cookie (no new ticket), and shows every
// notification once, in order.
//
// Driven by tests/browser.rs (`cargo test --test browser sse_page`); can be
// run by hand from clients/web:
//   HERALD_BIN=../../target/debug/herald \
//   DATABASE_URL=postgres://postgres@127.0.0.1:5432/<a database> \
//   HERALD_JWT_SECRET=<at least 32 bytes> node test/sse-browser.mjs
//
// Optional: CHROMIUM (default /usr/bin/chromium), BROWSER_TEST_TIMEOUT_MS
// (default 120000). Everything listens on 127.0.0.1 only. Every child
// process is killed and every temporary directory removed on exit, whatever
// happens.
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startStaticServer } from "../scripts/serve.mjs";
import { CHROMIUM_ARGS, Replica, bundleNativeClient, check, createHarness, freePort, prepareRun, runMain, sleep, waitUntil } from "./harness.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const pageRoot = join(root, "..", "sse");
const BUDGET_MS = Number(process.env.BROWSER_TEST_TIMEOUT_MS ?? 120_000);
const HEARTBEAT_MS = 2000;

// ---------------------------------------------------------------------------
// Clean-up: children, browser, servers, temp dirs — on every exit path.

const { children, tempDirs, closers, cleanup } = createHarness("sse browser test");
const replicas = [];

function log(message) {
  console.log(`[sse-browser] ${message}`);
}

// ---------------------------------------------------------------------------
// Calls, the page.

/** Waits until `replica` answers a Connect call (`client`, with `token`). */
const waitReady = (replica, client, token) =>
  replica.waitReady(() => client.getUnreadCount({}, { headers: { authorization: `Bearer ${token}` }, timeoutMs: 2000 }));

/** The page's own state (`window.heraldSse`) and its visible list. */
function pageState(page) {
  return page.evaluate(() => ({
    ...window.heraldSse,
    shown: [...document.querySelectorAll("#inbox > li")].map((li) => ({
      seq: Number(li.dataset.seq),
      text: li.firstChild?.textContent ?? "",
    })),
  }));
}

/** Polls the page until `predicate(state)` holds; fails with the last state after `timeoutMs`. */
const waitFor = (page, predicate, what, timeoutMs = 10_000) =>
  waitUntil(() => pageState(page), predicate, what, timeoutMs);

/** The page shows exactly `titles`, once each, in seq order, in its state and its list. */
function assertShows(state, titles, label) {
  const expected = JSON.stringify(titles);
  check(JSON.stringify(state.titles) === expected, `${label}: page state titles ${JSON.stringify(state.titles)}, expected ${expected}`);
  const listed = state.shown.map((li) => li.text);
  check(JSON.stringify(listed) === expected, `${label}: the list shows ${JSON.stringify(listed)}, expected ${expected}`);
  const seqs = state.shown.map((li) => li.seq);
  for (let i = 1; i < seqs.length; i++) check(seqs[i - 1] < seqs[i], `${label}: seqs not in order: ${seqs}`);
}

// ---------------------------------------------------------------------------

async function main() {
  const { bin, databaseUrl, secret, chromiumPath, tmp, logDir } = prepareRun(tempDirs, "test/sse-browser.mjs", "herald-sse-browser-");
  check(existsSync(join(pageRoot, "index.html")), `${pageRoot}/index.html not found`);


  // The page, as-is, from its own origin (another port: cross-origin, same site).
  const site = await startStaticServer({ root: pageRoot, port: 0 });
  closers.push(
    () =>
      new Promise((r) => {
        site.server.close(r);
        site.server.closeAllConnections();
      }),
  );

  const [portA, portB] = [await freePort(), await freePort()];
  const common = { bin, databaseUrl, secret, corsOrigin: site.url, logDir, heartbeatMs: HEARTBEAT_MS, children };
  const A = new Replica("A", { ...common, port: portA }).start();
  const B = new Replica("B", { ...common, port: portB }).start();
  replicas.push(A, B);
  // A user of this run only, so a database used before does not matter.
  const user = `alice-${Date.now().toString(36)}`;
  // Senders speak the Connect protocol with JSON (Connect-ES's own client),
  // as a service without gRPC would.
  const { connectJsonClient, mintToken } = await bundleNativeClient(tmp);
  const [connectA, connectB] = [connectJsonClient(A.url), connectJsonClient(B.url)];
  const alice = mintToken(secret, user);
  const sender = mintToken(secret, "sse-browser-test", "notifications:send");
  await waitReady(A, connectA, alice);
  await waitReady(B, connectB, alice);
  log(`page origin ${site.url}; replicas A ${A.url} and B ${B.url} ready`);

  /** Sends one notification to the user through B as a Connect JSON call; resolves with its seq. */
  const send = async (title) => {
    const answer = await connectB.sendNotification(
      { recipients: [user], type: "demo", title },
      { headers: { authorization: `Bearer ${sender}` }, timeoutMs: 5000 },
    );
    return Number(answer.deliveries[0].seq);
  };
  const titles = Array.from({ length: 15 }, (_, i) => `n${i}`);

  const userDataDir = mkdtempSync(join(tmpdir(), "herald-chromium-"));
  tempDirs.push(userDataDir);
  const browser = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    args: CHROMIUM_ARGS,
  });
  closers.push(() => browser.close());

  const page = await browser.newPage();
  // Console errors: only Chromium's own reports of the connections refused
  // while replica A is down are expected.
  const consoleErrors = [];
  const networkErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(`uncaught: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() !== "error") return;
    const text = m.text();
    const stream = (m.location().url ?? "").includes("/v1/events");
    if (/net::ERR_(CONNECTION_REFUSED|CONNECTION_RESET|EMPTY_RESPONSE|INCOMPLETE_CHUNKED_ENCODING)/.test(text)) {
      networkErrors.push(text);
    } else if (stream && text.includes("status of 401")) {
      // Step 5: the reconnect without a cookie is refused, on purpose.
      networkErrors.push(text);
    } else {
      consoleErrors.push(`${text} (${m.location().url})`);
    }
  });
  // Every request of the stream, with what it carried and how it was answered.
  const streams = [];
  const refused = [];
  page.on("requestfailed", (request) => {
    if (new URL(request.url()).pathname === "/v1/events") refused.push(request.failure()?.errorText ?? "failed");
  });
  page.on("response", async (response) => {
    const url = new URL(response.url());
    if (url.pathname !== "/v1/events" || response.request().method() !== "GET") return;
    const [request, headers] = await Promise.all([response.request().allHeaders(), response.allHeaders()]);
    streams.push({
      at: Date.now(),
      ticket: url.searchParams.get("ticket"),
      lastEventIdParam: url.searchParams.get("last_event_id"),
      lastEventId: request["last-event-id"] ?? null,
      sentCookie: /(^|;\s*)herald_resume=/.test(request.cookie ?? ""),
      status: response.status(),
      setCookie: headers["set-cookie"] ?? "",
    });
  });

  const query = new URLSearchParams({ server: A.url, token: alice });
  await page.goto(`${site.url}/?${query}`);
  await waitFor(page, (s) => s?.state === "live", "the page to go live");
  log(`the page (${user}, replica A) is live`);

  // 1. Five notifications through B show up on the page (on A).
  for (const title of titles.slice(0, 5)) await send(title);
  let s = await waitFor(page, (st) => st.titles.length === 5, "n0..n4 on the page", 5000);
  assertShows(s, titles.slice(0, 5), "before the restart");
  check(s.ticketsMinted === 1 && s.opens === 1, `before the restart: ${JSON.stringify(s)}`);
  const first = streams[0];
  check(first?.status === 200 && first.setCookie.includes("herald_resume="), `the first stream response: ${JSON.stringify(first)}`);
  check(/HttpOnly/i.test(first.setCookie) && /SameSite=Strict/i.test(first.setCookie), `resume cookie attributes: ${first.setCookie}`);
  const jar = await browser.cookies(`${A.url}/v1/events`);
  check(
    jar.some((c) => c.name === "herald_resume" && c.httpOnly && c.path === "/v1/events"),
    `Chromium did not keep the resume cookie: ${JSON.stringify(jar)}`,
  );
  log(`n0..n4 shown; the stream set ${first.setCookie.split(";")[0].slice(0, 24)}… and Chromium kept it`);

  // 2. Replica A stops; five more are sent through B meanwhile; A starts
  //    again on the same port.
  const idBeforeStop = s.lastEventId;
  log(`replica A stopped (${await A.stop()}); the page's last event id: ${idBeforeStop}`);
  s = await waitFor(page, (st) => st.state !== "live", "the page to notice replica A is gone", 10_000);
  log(`the page is ${s.state} (the server said "${s.lastError}")`);
  for (const title of titles.slice(5, 10)) await send(title);
  // Down until EventSource has tried at least once and been refused (its
  // retry hint is at most 5 s): that attempt must not cost it the cookie.
  const deadline = Date.now() + 8000;
  while (refused.length === 0 && Date.now() < deadline) await sleep(50);
  check(refused.length > 0, "EventSource did not try to reconnect within 8 s while replica A was down");
  s = await pageState(page);
  check(s.titles.length === 5, `the page showed events while its replica was down: ${JSON.stringify(s.titles)}`);
  check(s.state === "reconnecting", `the page is "${s.state}" while replica A is down, expected "reconnecting"`);
  log(`EventSource's reconnect was refused (${refused[0]}); the page is ${s.state}`);
  A.start();
  await waitReady(A, connectA, alice);
  log("replica A restarted on the same port");

  // 3. EventSource reconnects by itself (the resume cookie, Last-Event-ID):
  //    the missed five show up, and no new ticket was minted.
  s = await waitFor(page, (st) => st.state === "live" && st.titles.length >= 10, "the page to reconnect and show n5..n9", 30_000);
  assertShows(s, titles.slice(0, 10), "after the reconnect");
  check(s.ticketsMinted === 1, `the page minted ${s.ticketsMinted} tickets: EventSource's own reconnect was refused (${JSON.stringify(streams)})`);
  check(s.opens >= 2, `the page opened ${s.opens} times`);
  const resumed = streams.filter((r) => r.status === 200 && r.lastEventId !== null);
  check(resumed.length >= 1, `no reconnect with Last-Event-ID was answered 200: ${JSON.stringify(streams)}`);
  const reconnect = resumed[0];
  check(reconnect.lastEventId === idBeforeStop, `the reconnect sent Last-Event-ID ${reconnect.lastEventId}, expected ${idBeforeStop}`);
  check(reconnect.ticket === first.ticket, "the reconnect used another URL than the first open");
  check(reconnect.sentCookie, `the reconnect did not carry the resume cookie: ${JSON.stringify(reconnect)}`);
  check(reconnect.setCookie.includes("herald_resume="), "the reconnect's response did not rotate the resume cookie");
  log(
    `the page reconnected by itself (${s.opens} opens, ${s.ticketsMinted} ticket, ` +
      `Last-Event-ID ${reconnect.lastEventId}, cookie sent and rotated) and shows n0..n9`,
  );

  // 4. Five more, live; nothing is shown twice, then or a heartbeat later.
  for (const title of titles.slice(10)) await send(title);
  s = await waitFor(page, (st) => st.titles.length >= 15, "n10..n14 on the page", 5000);
  await sleep(HEARTBEAT_MS + 500);
  s = await pageState(page);
  assertShows(s, titles, "at the end");
  check(s.ticketsMinted === 1, `the page minted ${s.ticketsMinted} tickets`);
  log(`the page shows n0..n14 once each, in order (last event id ${s.lastEventId})`);

  // 5. Without the cookie (say it expired) EventSource's reconnect gets a
  //    401 and stops (CLOSED); the page mints a new ticket and reopens
  //    with last_event_id, and still shows each notification once.
  await browser.clearCookies();
  const idBeforeSecondStop = s.lastEventId;
  log(`cookies cleared; replica A stopped again (${await A.stop()})`);
  const more = ["n15", "n16", "n17"];
  for (const title of more) await send(title);
  A.start();
  await waitReady(A, connectA, alice);
  s = await waitFor(
    page,
    (st) => st.state === "live" && st.ticketsMinted === 2 && st.titles.length >= titles.length + more.length,
    "the page to reopen with a new ticket and show n15..n17",
    30_000,
  );
  await sleep(500);
  s = await pageState(page);
  assertShows(s, [...titles, ...more], "after reopening with a new ticket");
  const refusedReconnect = streams.find((r) => r.status === 401);
  check(refusedReconnect && !refusedReconnect.sentCookie, `no cookie-less reconnect was refused: ${JSON.stringify(streams)}`);
  const reopened = streams.at(-1);
  check(
    reopened.status === 200 && reopened.ticket !== first.ticket && reopened.lastEventIdParam === idBeforeSecondStop,
    `the reopen: ${JSON.stringify(reopened)}`,
  );
  check(s.ticketsMinted === 2, `the page minted ${s.ticketsMinted} tickets, expected 2`);
  log(
    `without the cookie the reconnect got 401; the page minted a second ticket and reopened ` +
      `with last_event_id=${idBeforeSecondStop}: n0..n17 once each, in order`,
  );

  check(consoleErrors.length === 0, `console errors in the page: ${consoleErrors.join("; ")}`);
  log(`console: ${networkErrors.length} expected errors (connections refused while replica A was down, the 401), nothing else`);
  log("all SSE browser checks passed");
}

await runMain({ name: "sse browser test", main, budgetMs: BUDGET_MS, cleanup, replicas });
