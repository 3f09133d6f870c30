//! Interop with Python's `websockets` library: tests/python/mbws_roundtrip.py builds MBWS
//! frames by hand (struct.pack for the binary binding, string formatting for the text binding)
//! and does a send / receipt / consume round trip against the real broker in both bindings and
//! both subprotocols, checking the negotiated subprotocol, bodies and order.
//!
//! The interpreter is `$MBWS_PYTHON` if set, else `.venv/bin/python` in the repository. If
//! neither is usable (missing, or `import websockets` fails) the test fails and says how to set
//! it up, unless `MBWS_SKIP_PYTHON=1`, which turns that failure into a loud skip notice.
//! scripts/test.sh creates the virtualenv and sets `MBWS_PYTHON`.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Broker;

/// The Python process is killed after this long.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages per round trip (per subprotocol and binding).
const MESSAGES: usize = 200;
const SETUP_HINT: &str = "set it up with `python3 -m venv .venv && .venv/bin/pip install websockets` in the \
     repository (or run scripts/test.sh), or point MBWS_PYTHON at a Python that has `websockets`; \
     set MBWS_SKIP_PYTHON=1 to skip this test";

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn collect(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `command` to completion, killing it (by its own handle) after `timeout`.
fn run_bounded(command: &mut Command, timeout: Duration) -> Result<Finished, String> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {command:?}: {error}"))?;
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|error| error.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{command:?} did not finish within {timeout:?} and was killed\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap(),
                stderr.join().unwrap()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() })
}

/// The Python to use, or why there is none.
fn find_python() -> Result<PathBuf, String> {
    let python = match std::env::var_os("MBWS_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => {
            let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
            if !venv.exists() {
                return Err(format!("MBWS_PYTHON is not set and {} does not exist", venv.display()));
            }
            venv
        }
    };
    let check = run_bounded(
        Command::new(&python).args(["-c", "import websockets; print(websockets.__version__)"]),
        SCRIPT_TIMEOUT,
    )?;
    if !check.status.success() || check.stdout.trim().is_empty() {
        return Err(format!("{} cannot `import websockets`: {}", python.display(), check.stderr.trim()));
    }
    Ok(python)
}

#[test]
fn python_websockets_round_trip_in_both_bindings() {
    let python = match find_python() {
        Ok(python) => python,
        Err(problem) if std::env::var("MBWS_SKIP_PYTHON").as_deref() == Ok("1") => {
            eprintln!("\n!!!!!!!! SKIPPED: Python interop test (MBWS_SKIP_PYTHON=1): {problem} !!!!!!!!\n");
            return;
        }
        Err(problem) => panic!("no Python with `websockets` for the interop test: {problem}; {SETUP_HINT}"),
    };
    let broker = Broker::start(&["--shards", "1"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/mbws_roundtrip.py");
    let finished =
        run_bounded(Command::new(&python).arg(&script).arg(broker.url()).arg(MESSAGES.to_string()), SCRIPT_TIMEOUT)
            .unwrap_or_else(|problem| panic!("{problem}"));
    let report = format!("stdout:\n{}\nstderr:\n{}", finished.stdout, finished.stderr);
    assert!(finished.status.success(), "the Python peer failed ({}):\n{report}", finished.status);
    for run in ["MBWS.huawei.com binary", "MBWS.huawei.com text", "MBLWS.huawei.com binary", "MBLWS.huawei.com text"] {
        let line = format!("{run}: {MESSAGES} sent, {MESSAGES} receipted, {MESSAGES} received in order");
        assert!(finished.stdout.contains(&line), "missing {line:?} in the Python report:\n{report}");
    }
    assert!(finished.stdout.contains(&format!("OK 4 round trips of {MESSAGES} messages")), "{report}");
}
