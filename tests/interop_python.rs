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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{run_bounded, Broker};

/// The Python process is killed after this long.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages per round trip (per subprotocol and binding).
const MESSAGES: usize = 200;
const SETUP_HINT: &str = "set it up with `python3 -m venv .venv && .venv/bin/pip install websockets` in the \
     repository (or run scripts/test.sh), or point MBWS_PYTHON at a Python that has `websockets`; \
     set MBWS_SKIP_PYTHON=1 to skip this test";

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
