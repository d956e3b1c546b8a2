//! The browser side, end to end, in a real headless Chromium against real
//! replicas on a fresh PostgreSQL database: the `@herald/web` inbox demo
//! over grpc-web (and one replica with the in-memory store), and the plain
//! `EventSource` page of `clients/sse/` over Server-Sent Events.
//!
//! The scenarios live in `clients/web/test/browser.mjs` and
//! `clients/web/test/sse-browser.mjs` (Node, driving Chromium with
//! playwright-core); each test creates the database, runs its script with
//! the `herald` binary, and fails with its report. They need
//! Node >= 20, `npm ci` in clients/web and Debian's `chromium`:
//! `tests/setup.sh browser` sets that up, and these tests run it themselves
//! when something is missing.
//!
//! `HERALD_UPDATE_SCREENSHOT=1 cargo test --test browser` also rewrites
//! `docs/inbox.png`.

mod common;

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use common::TestDb;

/// What the inbox script gives itself before killing everything.
const INBOX_BUDGET: Duration = Duration::from_secs(170);
/// What the SSE script gives itself (it takes about 20 s).
const SSE_BUDGET: Duration = Duration::from_secs(110);
/// How much longer than its own budget a script may take before it is
/// killed from here (the script bounds itself first).
const GRACE: Duration = Duration::from_secs(10);
/// The tests run one after the other: the unit tests' compile would
/// compete for CPU with the latency measurement.
static SERIAL: Mutex<()> = Mutex::new(());
/// The replicas' HS256 secret (>= 32 bytes), for this test only.
const SECRET: &str = "browser-test-secret-for-herald-0123456789abcdef";

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/web")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// What the Node side needs (and, with `browser`, Chromium), or what is missing.
fn missing_prerequisites(browser: bool) -> Vec<String> {
    let mut missing = Vec::new();
    match Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let major: u32 = version
                .trim_start_matches('v')
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            if major < 20 {
                missing.push(format!("Node >= 20 (found {version})"));
            }
        }
        _ => missing.push("`node` on PATH (Node >= 20)".to_owned()),
    }
    let web = web_dir();
    let modules = web.join("node_modules");
    for package in [
        "playwright-core",
        "esbuild",
        "@connectrpc/connect-node",
        "react-dom",
    ] {
        if !modules.join(package).join("package.json").is_file() {
            missing.push(format!("clients/web/node_modules/{package} (npm ci)"));
        }
    }
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(lock), Some(installed)) = (
        modified(&web.join("package-lock.json")),
        modified(&modules.join(".package-lock.json")),
    ) && lock > installed
    {
        missing
            .push("clients/web/node_modules is older than package-lock.json (npm ci)".to_owned());
    }
    if browser && !chromium().is_file() {
        missing.push(format!(
            "{} (Debian package `chromium`)",
            chromium().display()
        ));
    }
    missing
}

fn assert_prerequisites(browser: bool) {
    // Install what is missing on first use (`tests/setup.sh browser`:
    // Debian's chromium, `npm ci`), once per test binary, so `cargo test`
    // alone works on a fresh machine.
    static SETUP: std::sync::Once = std::sync::Once::new();
    if !missing_prerequisites(browser).is_empty() {
        SETUP.call_once(|| {
            let status = Command::new("bash")
                .args(["tests/setup.sh", "browser"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                eprintln!("tests/setup.sh browser failed: {status:?}");
            }
        });
    }
    let missing = missing_prerequisites(browser);
    assert!(
        missing.is_empty(),
        "the clients/web tests cannot run; missing:\n  - {}\nRun tests/setup.sh browser (as root): it installs Debian's chromium and runs `npm ci` in clients/web.",
        missing.join("\n  - ")
    );
}

/// Forwards a child's output line by line to the test's output, keeping it.
fn forward<R: Read + Send + 'static>(
    stream: R,
    to_stderr: bool,
) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if to_stderr {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            lines.push(line);
        }
        lines
    })
}

/// Kills the script and everything in its process group (the replicas).
fn kill_group(child: &mut Child) {
    #[cfg(unix)]
    {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", child.id())])
            .status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs the browser scenario `script` (a path under clients/web), which
/// bounds itself to `budget`, against `database_url`; with `screenshot`,
/// the script writes its screenshot there. `Err` carries why it failed.
fn run_script(
    script: &str,
    budget: Duration,
    database_url: &str,
    screenshot: Option<PathBuf>,
) -> Result<(), String> {
    let mut command = Command::new("node");
    command
        .arg(script)
        .current_dir(web_dir())
        .env("HERALD_BIN", env!("CARGO_BIN_EXE_herald"))
        .env("DATABASE_URL", database_url)
        .env("HERALD_JWT_SECRET", SECRET)
        .env("CHROMIUM", chromium())
        .env("BROWSER_TEST_TIMEOUT_MS", budget.as_millis().to_string())
        .env_remove("HERALD_SCREENSHOT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = screenshot {
        command.env("HERALD_SCREENSHOT", path);
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its own process group, so a timeout can kill the replicas it started.
        command.process_group(0);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start node: {e}"))?;
    let stdout = forward(child.stdout.take().expect("piped"), false);
    let stderr = forward(child.stderr.take().expect("piped"), true);

    let started = Instant::now();
    let limit = budget + GRACE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > limit => break None,
            Ok(None) => thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                kill_group(&mut child);
                return Err(format!("waiting for node: {e}"));
            }
        }
    };
    let Some(status) = status else {
        kill_group(&mut child);
        return Err(format!(
            "{script} did not finish within {limit:?}; killed it"
        ));
    };
    // Whatever it left behind (nothing, normally) goes too.
    kill_group(&mut child);
    let _ = stdout.join();
    let errors = stderr.join().unwrap_or_default();
    if status.success() {
        Ok(())
    } else {
        let reason = errors
            .iter()
            .find(|l| l.contains("FAILED"))
            .cloned()
            .unwrap_or_else(|| format!("node exited with {status}"));
        Err(reason)
    }
}

/// The inbox page, holding alice's token, on replica A; a second page on
/// replica B; notifications sent over native gRPC through B show up within
/// 1 s; mark read on one page updates the other live; replica A restarts
/// and the page resumes without loss or duplicates; other origins are
/// refused by CORS; a page on an in-memory replica follows the server's
/// heartbeat interval, and when that replica restarts (a new epoch) shows
/// the resync and the refetched inbox, without the lost notifications or an
/// error; a page without a valid token shows UNAUTHENTICATED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_page_in_headless_chromium() {
    assert_prerequisites(true);
    let db = TestDb::create().await;
    let url = db.url.clone();
    let screenshot = std::env::var_os("HERALD_UPDATE_SCREENSHOT")
        .is_some_and(|v| v == "1")
        .then(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/inbox.png"));
    let result = tokio::task::spawn_blocking(move || {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        run_script("test/browser.mjs", INBOX_BUDGET, &url, screenshot)
    })
    .await
    .expect("the browser test thread panicked");
    drop(db);
    if let Err(reason) = result {
        panic!("browser test failed: {reason}");
    }
}

/// `clients/sse/index.html` (only `fetch` and `EventSource`), served from
/// another origin of the same site, streams from replica A while
/// notifications are sent as Connect JSON calls through replica B; replica
/// A stops (SIGTERM) and starts again on the same port, and the page's
/// `EventSource` reconnects by itself with `Last-Event-ID` and the resume
/// cookie, minting no new ticket; the page shows every notification once,
/// in order. Without the cookie the reconnect gets a 401 and the page
/// reopens with a new ticket and `last_event_id`, again without loss or
/// duplicates. No console errors but the expected connection failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_page_resumes_across_a_replica_restart_in_headless_chromium() {
    assert_prerequisites(true);
    let db = TestDb::create().await;
    let url = db.url.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        run_script("test/sse-browser.mjs", SSE_BUDGET, &url, None)
    })
    .await
    .expect("the browser test thread panicked");
    drop(db);
    if let Err(reason) = result {
        panic!("SSE browser test failed: {reason}");
    }
}

/// The `@herald/web` unit tests (`npm test` in clients/web: type check,
/// then reconnect/backoff, de-duplication, resume, watchdog, token refresh
/// and inbox logic against an in-process fake server).
#[test]
fn web_client_unit_tests() {
    assert_prerequisites(false);
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut command = Command::new("npm");
    command
        .args(["test", "--silent"])
        .current_dir(web_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    let mut child = command.spawn().expect("cannot start npm");
    let stdout = forward(child.stdout.take().expect("piped"), false);
    let stderr = forward(child.stderr.take().expect("piped"), true);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for npm") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            kill_group(&mut child);
            panic!("npm test did not finish within 120 s");
        }
        thread::sleep(Duration::from_millis(100));
    };
    let _ = (stdout.join(), stderr.join());
    assert!(
        status.success(),
        "npm test in clients/web failed ({status}); see its output above"
    );
}
