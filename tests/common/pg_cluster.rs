//! A PostgreSQL cluster owned by one test: created with `initdb` in a temp
//! dir, served on a free 127.0.0.1 port, and stopped (fast), killed with
//! SIGKILL and restarted (crash recovery) at the test's command. For the
//! destructive tests only; everything else uses the shared server at
//! `HERALD_TEST_DATABASE_URL` (see `TestDb`), which is never touched.
//!
//! The server binaries are the newest under /usr/lib/postgresql/*/bin (or
//! `HERALD_TEST_PG_BIN`, or `pg_config --bindir`). `initdb` and `postgres`
//! refuse to run as root, so as root they run as the `postgres` OS user
//! through `runuser` (the temp dir is handed to that user); as anyone else,
//! as the current user. Where a cluster cannot be made (no server binaries,
//! no `runuser`, `initdb` fails as a non-root user),
//! [`PgCluster::start_or_skip`] prints why and the test skips — except as
//! root, or with `HERALD_TEST_REQUIRE_PG_CLUSTER=1`, where it fails: CI and
//! this machine must really run them.
//!
//! The server runs with `fsync=on` and `synchronous_commit=on`, so a crash
//! test proves what production would see. Every command is bounded in time;
//! dropping the cluster stops the server and removes the dir.

use std::{
    fs,
    io::Write,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

/// The OS user the server runs as when the tests run as root.
const PG_OS_USER: &str = "postgres";

/// Longest any server command (initdb, start, stop) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A private PostgreSQL server; stopped and deleted when dropped.
pub struct PgCluster {
    server: Server,
}

/// Where a cluster lives and how to run its commands; cheap to copy to a
/// blocking thread.
#[derive(Clone)]
struct Server {
    /// The temp dir holding everything below.
    root: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    /// `Some(user)`: run server commands as `user` via `runuser`.
    run_as: Option<&'static str>,
    /// TCP port on 127.0.0.1.
    port: u16,
}

/// Why a cluster could not be made.
#[derive(Debug)]
pub struct NoCluster {
    pub reason: String,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a missing cluster must fail the test instead of skipping it.
fn required() -> bool {
    is_root()
        || std::env::var("HERALD_TEST_REQUIRE_PG_CLUSTER").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The newest PostgreSQL server binaries: `HERALD_TEST_PG_BIN`, else the
/// highest version under /usr/lib/postgresql, else `pg_config --bindir`.
fn find_bin() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("HERALD_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let version = e.file_name().to_str()?.parse::<u32>().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("initdb").exists().then_some((version, bin))
                })
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|e| {
            format!("no PostgreSQL server binaries (no /usr/lib/postgresql/*/bin, pg_config: {e})")
        })?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if bin.join("initdb").exists() {
        Ok(bin)
    } else {
        Err(format!("no initdb under {}", bin.display()))
    }
}

/// Runs `cmd` to completion within `limit` (killing it on timeout).
fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().map_err(|e| format!("{what}: {e}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what}: no answer within {limit:?}"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}

/// Uid and gid of OS user `name`.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam gets a valid C string; the result, when not null,
    // points to a static record read at once (tests do not call getpw*
    // concurrently with this).
    unsafe {
        let pw = libc::getpwnam(c.as_ptr());
        (!pw.is_null()).then(|| ((*pw).pw_uid, (*pw).pw_gid))
    }
}

/// Pids whose parent is `parent` (from /proc).
fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|(_, ppid)| ppid == parent))
        .collect()
}

/// (state, ppid) of `pid` from /proc/<pid>/stat.
fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ..." — comm may contain spaces or parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Gone, or a zombie nobody reaped yet (it holds nothing any more).
fn is_dead(pid: i32) -> bool {
    proc_stat(pid).is_none_or(|(state, _)| matches!(state, 'Z' | 'X'))
}

impl PgCluster {
    /// Creates and starts a cluster, or says why it cannot.
    pub async fn start() -> Result<Self, NoCluster> {
        tokio::task::spawn_blocking(Self::create_blocking)
            .await
            .map_err(|e| NoCluster {
                reason: format!("cluster set-up panicked: {e}"),
            })?
    }

    /// [`PgCluster::start`] for a test named `test`: `None` (after printing
    /// why) when this environment cannot run a private cluster and skipping
    /// is allowed; panics when it is not (root, or
    /// `HERALD_TEST_REQUIRE_PG_CLUSTER=1`).
    pub async fn start_or_skip(test: &str) -> Option<Self> {
        match Self::start().await {
            Ok(cluster) => Some(cluster),
            Err(NoCluster { reason }) if !required() => {
                eprintln!(
                    "SKIPPED {test}: cannot run a private PostgreSQL cluster: {reason} \
                     (set HERALD_TEST_REQUIRE_PG_CLUSTER=1 to make this an error)"
                );
                None
            }
            Err(NoCluster { reason }) => {
                panic!("{test}: cannot run a private PostgreSQL cluster: {reason}")
            }
        }
    }

    fn create_blocking() -> Result<Self, NoCluster> {
        let fail = |reason: String| NoCluster { reason };
        let bin = find_bin().map_err(fail)?;
        let run_as = if is_root() {
            if Command::new("runuser").arg("--help").output().is_err() {
                return Err(fail(
                    "running as root and `runuser` is not available".into(),
                ));
            }
            Some(PG_OS_USER)
        } else {
            None
        };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let root = std::env::temp_dir().join(format!(
            "herald-pg-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let socket_dir = root.join("sock");
        fs::create_dir_all(&socket_dir)
            .map_err(|e| fail(format!("create {}: {e}", socket_dir.display())))?;
        // From here on, Drop removes the dir whatever happens.
        let mut cluster = Self {
            server: Server {
                data: root.join("data"),
                log: root.join("server.log"),
                root: root.clone(),
                bin,
                run_as,
                port: free_port(),
            },
        };
        for dir in [&root, &socket_dir] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| fail(format!("chmod {}: {e}", dir.display())))?;
            if let Some(user) = run_as {
                let (uid, gid) = user_ids(user)
                    .ok_or_else(|| fail(format!("no OS user `{user}` to run PostgreSQL as")))?;
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .map_err(|e| fail(format!("chown {}: {e}", dir.display())))?;
            }
        }

        let mut initdb = cluster.server.command("initdb");
        initdb.arg("-D").arg(&cluster.server.data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
        ]);
        let out = run_bounded(initdb, COMMAND_TIMEOUT).map_err(fail)?;
        if !out.status.success() {
            return Err(fail(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        // Later settings win over initdb's defaults.
        let settings = format!(
            "\n# herald tests\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             shared_buffers = 16MB\n\
             max_connections = 100\n\
             logging_collector = off\n",
            socket_dir.display()
        );
        fs::OpenOptions::new()
            .append(true)
            .open(cluster.server.data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(settings.as_bytes()))
            .map_err(|e| fail(format!("write postgresql.conf: {e}")))?;

        // A port found free can be taken before the server binds it: retry
        // on another one.
        let mut last_error = String::new();
        for _ in 0..3 {
            match cluster.server.start_blocking() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    last_error = e;
                    cluster.server.port = free_port();
                }
            }
        }
        Err(fail(format!("the server did not start: {last_error}")))
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.server.port
        )
    }

    /// A plain connection, for assertions.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to the private cluster: {e}"));
        tokio::spawn(connection);
        client
    }

    /// Starts the (stopped or crashed) server again, waiting until it
    /// accepts connections (after crash recovery, if it crashed).
    pub async fn restart(&self) {
        let this = self.server.clone();
        tokio::task::spawn_blocking(move || this.start_blocking())
            .await
            .expect("restart task")
            .unwrap_or_else(|e| panic!("restart the private cluster: {e}"));
    }

    /// `pg_ctl stop -m fast`: sessions are terminated, the server shuts
    /// down cleanly. Returns once it is down.
    pub async fn stop_fast(&self) {
        let this = self.server.clone();
        let out = tokio::task::spawn_blocking(move || {
            this.pg_ctl(&["-m", "fast", "-w", "-t", "30", "stop"])
        })
        .await
        .expect("stop task")
        .unwrap_or_else(|e| panic!("stop the private cluster: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL to the postmaster and every process it started (a crash of
    /// the whole server, as on an OOM kill or power loss of the process
    /// tree): nothing is shut down cleanly. Returns once all are dead.
    pub async fn kill9(&self) {
        let this = self.server.clone();
        tokio::task::spawn_blocking(move || this.kill9_blocking())
            .await
            .expect("kill task")
            .unwrap_or_else(|e| panic!("kill the private cluster: {e}"));
    }

    /// The server log so far.
    pub fn log_text(&self) -> String {
        self.server.log_text()
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.server.port
    }
}

impl Server {
    /// A command running server binary `program` as the right OS user, in
    /// the cluster dir (the `postgres` user may not enter the test's cwd).
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut cmd = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        };
        cmd.current_dir(&self.root).env("LC_ALL", "C");
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output, String> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(&self.data).args(args);
        run_bounded(cmd, COMMAND_TIMEOUT)
    }

    fn start_blocking(&self) -> Result<(), String> {
        let options = format!("-p {}", self.port);
        let log = self.log.to_string_lossy().into_owned();
        let out = self.pg_ctl(&["-l", &log, "-o", &options, "-w", "-t", "30", "start"])?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start: {}\n--- server log ---\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                self.log_text()
            ))
        }
    }

    fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    fn kill9_blocking(&self) -> Result<(), String> {
        let pid = self
            .postmaster_pid()
            .ok_or("no postmaster.pid: is the server running?")?;
        let children = children_of(pid);
        // The postmaster first, so it cannot start replacements.
        for p in std::iter::once(pid).chain(children.iter().copied()) {
            // SAFETY: kill(2) with a pid read from the server's own files.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let all = std::iter::once(pid).chain(children).collect::<Vec<_>>();
        while !all.iter().all(|p| is_dead(*p)) {
            if Instant::now() > deadline {
                return Err(format!("processes {all:?} still alive 10 s after SIGKILL"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The lock files (data dir and Unix socket) name a dead postmaster
        // that may linger as a zombie if nobody reaps it (a container's
        // init may not), and a zombie still answers kill(pid, 0): the next
        // start would refuse to run. The data itself is left exactly as the
        // crash left it.
        let _ = fs::remove_file(self.data.join("postmaster.pid"));
        let _ = fs::remove_file(
            self.root
                .join("sock")
                .join(format!(".s.PGSQL.{}.lock", self.port)),
        );
        Ok(())
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let server = &self.server;
        if server.postmaster_pid().is_some() {
            let stopped = server
                .pg_ctl(&["-m", "immediate", "-w", "-t", "10", "stop"])
                .is_ok_and(|o| o.status.success());
            if !stopped {
                let _ = server.kill9_blocking();
            }
        }
        if let Err(e) = fs::remove_dir_all(&server.root) {
            eprintln!("warning: could not remove {}: {e}", server.root.display());
        }
    }
}
