//! The configuration file against the real binary (issue 11, item 1): `--config`, flags that
//! override it, errors that name the key, the value and the reason, `--check-config`,
//! `--print-config`, and the example file shipped in packaging/.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{temp_dir, Broker};
use mbws::config::file::ConfigFile;
use mbws::config::{Config, Origins};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/broker.toml");

/// Runs `mbws-broker` with `args` to completion (bounded: one that keeps running is killed).
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mbws-broker"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mbws-broker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("mbws-broker {args:?} did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A configuration file with `content` in a fresh directory (which the caller removes).
fn config_file(label: &str, content: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(label);
    let file = dir.join("broker.toml");
    std::fs::write(&file, content).unwrap();
    (dir, file)
}

/// A bad file stops the start with exit 2 (as a bad flag does), one line naming the file, the
/// key, the value and the reason; the data directory is never created.
#[test]
fn unknown_keys_bad_values_and_conflicts_are_refused_at_start_with_the_key_the_value_and_the_reason() {
    let cases = [
        (
            "unknown key",
            "shards = 1\nmax-mesage-bytes = 65536\n",
            "line 2 (`max-mesage-bytes = 65536`): unknown field `max-mesage-bytes`",
        ),
        ("out of range", "max-credit = 0\n", "max-credit = 0 (in FILE) is out of range: use 1..=1000000"),
        (
            "wrong kind",
            "max-credit = \"many\"\n",
            "line 1 (`max-credit = \"many\"`): invalid type: string \"many\", expected u64",
        ),
        (
            "bad word",
            "log-format = \"xml\"\n",
            "log-format = \"xml\" (in FILE) is not valid: unknown log format \"xml\": use text or json",
        ),
        ("bad listen", "listen = \"nowhere\"\n", "listen = \"nowhere\" (in FILE) is not valid"),
        (
            "conflict",
            "max-message-bytes = 65536\nmax-frame-bytes = 131072\n",
            "max-frame-bytes = 131072 (in FILE) exceeds max-message-bytes = 65536 (in FILE)",
        ),
    ];
    for (case, content, expected) in cases {
        let (dir, file) = config_file("config-bad", content);
        let data_dir = dir.join("data");
        let output = run(&[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]);
        let stderr = text(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{case}: {stderr}");
        let expected = expected.replace("FILE", file.to_str().unwrap());
        assert!(
            stderr.starts_with("mbws-broker: ") && stderr.contains(&expected),
            "{case}: expected {expected:?} in {stderr:?}"
        );
        assert_eq!(stderr.lines().count(), 1, "{case}: one line: {stderr:?}");
        assert!(!data_dir.exists(), "{case}: a refused start created its data directory");
        let _ = std::fs::remove_dir_all(dir);
    }
    let output = run(&["--config", "/nonexistent/broker.toml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("--config /nonexistent/broker.toml: cannot read it"), "{:?}", output);
}

/// The file's values are used, and a flag overrides the file's key (shown in what the broker
/// announces in OPENED); a flag also takes the blame for a conflict it makes.
#[test]
fn the_file_sets_the_broker_and_flags_override_it() {
    let (dir, file) = config_file("config-use", "max-message-bytes = 65536\nmax-credit = 77\n");
    let file_arg = file.to_str().unwrap();
    let broker = Broker::start(&["--shards", "1", "--config", file_arg]);
    let limits = broker.client().opened().limits;
    assert_eq!((limits.max_frame_bytes, limits.max_credit), (65536, 77), "the file's values");
    drop(broker);
    let broker = Broker::start(&["--shards", "1", "--config", file_arg, "--max-credit", "88"]);
    let limits = broker.client().opened().limits;
    assert_eq!((limits.max_frame_bytes, limits.max_credit), (65536, 88), "the flag wins over the file");
    drop(broker);
    let output = run(&["--config", file_arg, "--max-frame-bytes", "131072", "--check-config"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("--max-frame-bytes 131072 exceeds max-message-bytes = 65536 (in {file_arg})")),
        "each setting is named where it came from: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `--check-config` exits 0 or 1 without listening or writing; `--print-config` prints the
/// effective configuration as TOML that reads back as the same configuration.
#[test]
fn check_config_and_print_config_validate_and_print_without_starting() {
    let (dir, file) =
        config_file("config-check", "shards = 3\nlog-format = \"json\"\ndurable-address = [\"orders.*\"]\n");
    let data_dir = dir.join("data");
    let (file_arg, data_arg) = (file.to_str().unwrap(), data_dir.to_str().unwrap());
    let output = run(&["--config", file_arg, "--data-dir", data_arg, "--check-config"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(text(&output.stdout).trim(), "mbws-broker: the configuration is valid");
    let output = run(&["--config", file_arg, "--shards", "0", "--check-config"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(text(&output.stderr).contains("--shards 0 is out of range: use 1..=1024"), "{output:?}");

    let output = run(&["--config", file_arg, "--data-dir", data_arg, "--max-credit", "99", "--print-config"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let printed = text(&output.stdout);
    for line in ["shards = 3", "max-credit = 99", "log-format = \"json\"", "durable-address = [\"orders.*\"]"] {
        assert!(printed.lines().any(|printed_line| printed_line == line), "{line:?} in {printed}");
    }
    assert!(!data_dir.exists(), "checking wrote the data directory");
    // Printed, read back, printed again: the same text (every setting is printed, and exactly).
    let reprinted_file = dir.join("printed.toml");
    std::fs::write(&reprinted_file, &printed).unwrap();
    let again = run(&["--config", reprinted_file.to_str().unwrap(), "--print-config"]);
    assert_eq!(text(&again.stdout), printed);
    let _ = std::fs::remove_dir_all(dir);
}

/// The example shipped (and installed as /etc/mbws/broker.toml) has every key, each with a
/// comment; its values are the defaults but for the service's data directory; it loads.
#[test]
fn the_example_file_has_every_key_commented_and_loads_as_the_defaults() {
    let example = std::fs::read_to_string(EXAMPLE).unwrap();
    let lines: Vec<&str> = example.lines().collect();
    for key in ConfigFile::every_key() {
        let index = lines
            .iter()
            .position(|line| line.starts_with(&format!("{key} = ")) || line.starts_with(&format!("# {key} = ")))
            .unwrap_or_else(|| panic!("{key} is in {EXAMPLE}"));
        let comment = lines[..index].iter().rev().take_while(|line| line.starts_with('#')).count();
        assert!(comment >= 1, "{key} has a comment above it in {EXAMPLE}");
    }
    let file = ConfigFile::parse(&example, Path::new(EXAMPLE)).unwrap();
    let origins = Origins::from_file(EXAMPLE.into(), file.keys());
    let mut config = Config::default();
    file.apply(&mut config, &origins).unwrap();
    config.validate_from(&origins).unwrap();
    let expected = Config { data_dir: "/var/lib/mbws".into(), ..Config::default() };
    assert_eq!(format!("{config:?}"), format!("{expected:?}"), "the example's values are the defaults");
    let output = run(&["--config", EXAMPLE, "--check-config"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}
