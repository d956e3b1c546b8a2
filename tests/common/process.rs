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
