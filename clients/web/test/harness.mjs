// What the browser tests share (test/browser.mjs, test/sse-browser.mjs):
// clean-up of every child process, temporary directory and server on every
// exit path, free ports, and Herald replicas as child processes that
// restart on the same port. Everything listens on 127.0.0.1 only.
import { spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { build } from "esbuild";

export const HOST = "127.0.0.1";

/** Chromium's flags for the tests: headless, no sandbox, nothing fetched in the background. */
export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function fail(message) {
  throw new Error(message);
}

export function check(condition, message) {
  if (!condition) fail(message);
}

/**
 * What a test run must clean up: `children` (processes), `tempDirs`, and
 * `closers` (async functions, run in reverse order). `cleanup()` does it
 * once; a synchronous last resort runs at process exit, and a signal
 * cleans up and exits 1. `name` labels the signal message.
 */
export function createHarness(name) {
  const children = new Set();
  const tempDirs = [];
  const closers = [];
  let cleaned = false;

  function killChildrenNow() {
    for (const child of children) {
      if (child.exitCode === null && child.signalCode === null) {
        try {
          child.kill("SIGKILL");
        } catch {
          // already gone
        }
      }
    }
  }

  async function cleanup() {
    if (cleaned) return;
    cleaned = true;
    for (const close of closers.reverse()) {
      try {
        await Promise.race([close(), sleep(5000)]);
      } catch {
        // already gone
      }
    }
    killChildrenNow();
    for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  }

  process.on("exit", () => {
    // Last resort (synchronous): nothing may outlive the test.
    killChildrenNow();
    for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  });
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
    process.on(signal, () => {
      console.error(`${name}: got ${signal}, cleaning up`);
      void cleanup().finally(() => process.exit(1));
    });
  }
  return { children, tempDirs, closers, cleanup };
}

/**
 * Polls `read()` until `predicate(state)` holds and resolves with that
 * state; fails with the last state read after `timeoutMs`.
 */
export async function waitUntil(read, predicate, what, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const state = await read();
    if (predicate(state)) return state;
    if (Date.now() > deadline) {
      fail(`timed out after ${timeoutMs} ms waiting for ${what}; page state: ${JSON.stringify(state)}`);
    }
    await sleep(10);
  }
}

/**
 * What every browser test run starts from: `HERALD_BIN`, `DATABASE_URL`,
 * `HERALD_JWT_SECRET` (at least 32 bytes) and `CHROMIUM` (default
 * /usr/bin/chromium) from the environment, checked; a temporary directory
 * (`tmp`, cleaned up with `tempDirs`) with a `logs` directory in it.
 * `script` names the script in error messages.
 */
export function prepareRun(tempDirs, script, tmpPrefix) {
  const env = (name) => {
    const value = process.env[name];
    if (!value) fail(`${name} is not set (see the header of ${script})`);
    return value;
  };
  const bin = resolve(env("HERALD_BIN"));
  const databaseUrl = env("DATABASE_URL");
  const secret = env("HERALD_JWT_SECRET");
  check(Buffer.byteLength(secret) >= 32, "HERALD_JWT_SECRET must be at least 32 bytes");
  const chromiumPath = process.env.CHROMIUM ?? "/usr/bin/chromium";
  check(existsSync(chromiumPath), `${chromiumPath} not found: run .ci/run (installs Debian's chromium)`);
  check(existsSync(bin), `herald binary ${bin} not found`);
  const tmp = mkdtempSync(join(tmpdir(), tmpPrefix));
  tempDirs.push(tmp);
  const logDir = join(tmp, "logs");
  mkdirSync(logDir);
  return { bin, databaseUrl, secret, chromiumPath, tmp, logDir };
}

/**
 * test/native-client.ts bundled into `tmp` and imported: `nativeClient`
 * (gRPC), `connectJsonClient` (Connect, JSON) and `mintToken`.
 */
export async function bundleNativeClient(tmp) {
  const outfile = join(tmp, "native-client.mjs");
  await build({
    entryPoints: [join(dirname(fileURLToPath(import.meta.url)), "native-client.ts")],
    outfile,
    bundle: true,
    platform: "node",
    target: "node20",
    format: "esm",
    logLevel: "warning",
  });
  return import(pathToFileURL(outfile).href);
}

/** A free TCP port on 127.0.0.1. */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, HOST, () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

/**
 * A Herald replica as a child process, restartable on the same port. Without
 * `databaseUrl` it keeps everything in memory (and loses it on restart).
 * Its processes join `children` (a harness's), its logs go to `logDir`.
 */
export class Replica {
  constructor(name, { bin, port, databaseUrl, secret, corsOrigin, logDir, heartbeatMs, children }) {
    Object.assign(this, { name, bin, port, databaseUrl, secret, corsOrigin, logDir, heartbeatMs, children });
    this.url = `http://${HOST}:${port}`;
    this.starts = 0;
  }

  start() {
    this.starts += 1;
    const logFile = join(this.logDir, `${this.name}-${this.starts}.log`);
    const out = createWriteStream(logFile);
    const child = spawn(
      this.bin,
      [
        "serve",
        "--listen",
        `${HOST}:${this.port}`,
        "--cors-origins",
        this.corsOrigin,
        "--heartbeat-interval",
        `${this.heartbeatMs}ms`,
      ],
      {
        env: {
          PATH: process.env.PATH ?? "",
          ...(this.databaseUrl ? { DATABASE_URL: this.databaseUrl } : {}),
          HERALD_JWT_SECRET: this.secret,
          RUST_LOG: process.env.RUST_LOG ?? "info",
        },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    child.stdout.pipe(out);
    child.stderr.pipe(out);
    this.children.add(child);
    child.once("exit", () => this.children.delete(child));
    this.child = child;
    this.logFile = logFile;
    return this;
  }

  /** SIGTERM, and wait for the exit (SIGKILL after `graceMs`). Resolves with how it ended. */
  async stop(graceMs = 20_000) {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return "not running";
    const exited = new Promise((r) => child.once("exit", (code, signal) => r(signal ?? `exit ${code}`)));
    child.kill("SIGTERM");
    const result = await Promise.race([exited, sleep(graceMs).then(() => null)]);
    if (result !== null) return result;
    child.kill("SIGKILL");
    await exited;
    return `SIGKILL after ${graceMs} ms`;
  }

  /** Waits until `probe()` (a call to this replica) resolves; fails if the replica exits or `timeoutMs` passes. */
  async waitReady(probe, timeoutMs = 30_000) {
    const deadline = Date.now() + timeoutMs;
    let last;
    while (Date.now() < deadline) {
      if (this.child.exitCode !== null) {
        fail(`replica ${this.name} exited (${this.child.exitCode}):\n${this.logTail()}`);
      }
      try {
        await probe();
        return;
      } catch (e) {
        last = e;
        await sleep(100);
      }
    }
    fail(`replica ${this.name} not ready after ${timeoutMs} ms: ${last}\n${this.logTail()}`);
  }

  logTail(lines = 30) {
    try {
      return readFileSync(this.logFile, "utf8").trim().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }
}

/**
 * Runs `main` within `budgetMs`: on failure or timeout prints `<name>:
 * FAILED: …` (what tests/browser.rs reports) and the replicas' log tails;
 * cleans up, then exits 0 or 1.
 */
export async function runMain({ name, main, budgetMs, cleanup, replicas }) {
  const timer = setTimeout(() => {
    console.error(`${name}: FAILED: no result within ${budgetMs} ms; killing everything`);
    void cleanup().finally(() => process.exit(1));
  }, budgetMs);
  let exitCode = 0;
  try {
    await main();
  } catch (e) {
    exitCode = 1;
    console.error(`${name}: FAILED: ${e instanceof Error ? e.stack ?? e.message : e}`);
    for (const r of replicas) console.error(`--- replica ${r.name} log (tail) ---\n${r.logTail()}`);
  }
  clearTimeout(timer);
  await cleanup();
  process.exit(exitCode);
}
