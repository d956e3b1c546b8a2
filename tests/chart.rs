//! The Helm chart's offline checks (`helm/tests/check.py`): strict lint,
//! rendering with default and all-features values, Kubernetes 1.31 schema
//! validation of every manifest, invariants, and refusal of bad values.
//!
//! They need the Python packages in `helm/tests/requirements.txt`, which
//! `tests/setup.sh chart` installs into `helm/tests/.venv` (this test runs
//! it first). Packages that cannot be installed fail this test; they never
//! skip it.

use std::{
    io::Read,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The whole check takes about a second; this only bounds a hang.
const TIME_LIMIT: Duration = Duration::from_secs(300);

/// `check.py`'s exit code when its Python packages are not installed.
const MISSING_PACKAGES: i32 = 3;

#[test]
fn helm_chart_passes_offline_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Installs the pinned Python packages on first use (a quick file
    // comparison once they are there), so `cargo test` alone works.
    let setup = Command::new("bash")
        .args(["tests/setup.sh", "chart"])
        .current_dir(root)
        .status()
        .expect("run tests/setup.sh");
    assert!(
        setup.success(),
        "tests/setup.sh chart failed (it needs python3 and PyPI)"
    );
    let venv_python = root.join("helm/tests/.venv/bin/python");
    let python = if venv_python.exists() {
        venv_python.into_os_string()
    } else {
        "python3".into()
    };

    let mut child = Command::new(&python)
        .arg("helm/tests/check.py")
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; run tests/setup.sh chart to set up the chart checks' Python environment",
                python.to_string_lossy()
            )
        });

    // Drain both pipes while waiting, so a chatty child cannot block.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for check.py") {
            break Some(status);
        }
        if started.elapsed() > TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    print!("{out}");
    eprint!("{err}");

    let Some(status) = status else {
        panic!("helm/tests/check.py did not finish within {TIME_LIMIT:?}; killed");
    };
    if status.code() == Some(MISSING_PACKAGES) {
        panic!(
            "the chart checks' Python packages are missing: run tests/setup.sh chart (it installs \
             helm/tests/requirements.txt into helm/tests/.venv)"
        );
    }
    assert!(
        status.success(),
        "helm/tests/check.py failed ({status}); see the FAIL lines above"
    );
}
