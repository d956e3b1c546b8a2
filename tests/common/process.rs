//! The real `herald` binary as a child process: for signals, exit codes
//! and log output. Killed when dropped.

use std::{
    net::SocketAddr,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A `herald serve` child process with JSON logs collected.
pub struct ProcessReplica {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line so far (JSON log objects).
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl ProcessReplica {
    /// Starts `herald serve` on a random port with the test secret, JSON
    /// logs, `database_url` (or the memory store) and `args`; waits until it
    /// logs its address. The environment is cleared but for `PATH` and `env`.
    pub async fn start(database_url: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_nofile(database_url, args, env, None).await
    }

    /// [`ProcessReplica::start`], with the child's open-files limit
    /// (`RLIMIT_NOFILE`) set to `(soft, hard)` before it runs, when given.
    pub async fn start_with_nofile(
        database_url: Option<&str>,
        args: &[&str],
        env: &[(&str, &str)],
        nofile: Option<(u64, u64)>,
    ) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herald"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "HERALD_JWT_SECRET",
                std::str::from_utf8(super::SECRET).unwrap(),
            )
            .env("HERALD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(url) = database_url {
            cmd.env("DATABASE_URL", url);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some((soft, hard)) = nofile {
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: between fork and exec only setrlimit runs, which is
            // async-signal-safe, on a struct copied into the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn herald");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut addr_tx = Some(addr_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = serving_addr(&line)
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(30), addr_rx)
            .await
            .expect("replica logs its address within 30 s")
            .expect("replica did not exit before serving");
        Self { child, addr, logs }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL (`kill -9`): no drain, no goodbye; returns once it is dead.
    pub async fn kill9(&mut self) {
        self.child.start_kill().expect("SIGKILL the replica");
        tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("the replica dies within 10 s of SIGKILL")
            .expect("wait for the replica");
    }

    /// Resident memory now and at its peak (`VmRSS`, `VmHWM` of
    /// /proc/<pid>/status), in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/<pid>/status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/<pid>/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Open file descriptors (entries of /proc/<pid>/fd).
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/<pid>/fd")
            .count()
    }

    /// CPU time used so far (user + system, /proc/<pid>/stat).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("read /proc/<pid>/stat");
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14 and stime 15, in clock ticks.
        let rest = &stat[stat.rfind(')').expect("a command name") + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    /// The soft and hard open-files limits (/proc/<pid>/limits).
    pub fn open_files_limit(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .expect("read /proc/<pid>/limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("a Max open files line");
        let values: Vec<u64> = line
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        (values[0], values[1])
    }

    /// Log lines whose message starts with `prefix`, parsed as JSON.
    pub fn logged(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.json_logs()
            .into_iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(prefix))
            })
            .collect()
    }

    /// The `/metrics` address, if the replica logged one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.logged("serving metrics")
            .first()
            .and_then(|l| l["fields"]["addr"].as_str()?.parse().ok())
    }

    /// Log lines parsed as JSON.
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The `addr` of a "serving …" / "no DATABASE_URL …" start-up log line.
fn serving_addr(line: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    let message = fields.get("message")?.as_str()?;
    if message.starts_with("serving with") || message.starts_with("no DATABASE_URL") {
        fields.get("addr")?.as_str()?.parse().ok()
    } else {
        None
    }
}
