//! The service install (issue 11, item 5) and docs/OPERATIONS.md: scripts/install.sh into a
//! temporary DESTDIR, the installed unit through `systemd-analyze verify`, the installed
//! configuration through the installed broker, and every command of OPERATIONS.md run (but
//! those that need a machine booted with systemd, which are named here).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::temp_dir;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Commands of docs/OPERATIONS.md that need systemd as the init system (not the case in a
/// container or CI): the only ones the doc may have that this test does not run.
const NEEDS_SYSTEMD: &[&str] = &[
    "systemctl enable --now mbws-broker",
    "systemctl status mbws-broker",
    "systemctl restart mbws-broker",
    "journalctl -u mbws-broker -f",
    "systemctl stop mbws-broker",
    "systemctl kill --signal=SIGUSR2 mbws-broker",
    "systemctl kill --signal=SIGHUP mbws-broker",
];

/// Where the test binaries are: `--binaries` for install.sh (no release build in a test).
fn binaries_dir() -> PathBuf {
    let broker = PathBuf::from(env!("CARGO_BIN_EXE_mbws-broker"));
    let dir = broker.parent().unwrap().to_path_buf();
    common::binaries::workspace_binary("mbws"); // Says what to do if the CLI is not built.
    dir
}

fn install(destdir: &Path, extra: &[&str]) -> Output {
    let output = Command::new("bash")
        .arg(Path::new(REPO).join("scripts/install.sh"))
        .args(extra)
        .arg("--destdir")
        .arg(destdir)
        .arg("--binaries")
        .arg(binaries_dir())
        .output()
        .expect("run scripts/install.sh");
    assert!(output.status.success(), "install.sh {extra:?} failed: {output:?}");
    output
}

/// `systemd-analyze verify` of the unit installed under `root`: no output, exit 0.
fn verify_unit(root: &Path) {
    let found = Command::new("sh").args(["-c", "command -v systemd-analyze"]).output().unwrap();
    assert!(
        found.status.success(),
        "systemd-analyze is missing: apt-get install systemd (.ci/run installs it when it is missing)"
    );
    // --root: resolve ExecStart in the install; --recursive-errors=no: the units the service
    // depends on (network-online.target, ...) are not in that root; --man=no: no man pages.
    let output = Command::new("systemd-analyze")
        .args(["verify", "--recursive-errors=no", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/mbws-broker.service")
        .output()
        .unwrap();
    let complaints = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && complaints.trim().is_empty(), "systemd-analyze verify: {output:?}");
}

#[test]
fn install_sh_installs_a_service_that_systemd_analyze_verify_accepts() {
    let root = temp_dir("install");
    install(&root, &["--prefix", "/usr"]);
    for binary in ["usr/bin/mbws-broker", "usr/bin/mbws"] {
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(root.join(binary)).unwrap().permissions());
        assert_eq!(mode & 0o755, 0o755, "{binary} is executable");
    }
    let shipped = std::fs::read_to_string(Path::new(REPO).join("packaging/broker.toml")).unwrap();
    assert_eq!(std::fs::read_to_string(root.join("etc/mbws/broker.toml")).unwrap(), shipped);
    assert!(root.join("usr/share/doc/mbws/OPERATIONS.md").is_file());

    let unit = std::fs::read_to_string(root.join("etc/systemd/system/mbws-broker.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/mbws-broker --config /etc/mbws/broker.toml",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/mbws",
        "StateDirectory=mbws",
        "LimitNOFILE=1048576",
        "Restart=on-failure",
        "RestartPreventExitStatus=2",
    ] {
        assert!(unit.lines().any(|unit_line| unit_line == line), "the unit has {line:?}");
    }
    // The data directory the unit may write is the one the installed configuration names.
    assert!(shipped.lines().any(|line| line == "data-dir = \"/var/lib/mbws\""));
    verify_unit(&root);

    // The installed broker accepts the installed configuration.
    let broker = root.join("usr/bin/mbws-broker");
    let config = root.join("etc/mbws/broker.toml");
    let check = Command::new(&broker).arg("--config").arg(&config).arg("--check-config").output().unwrap();
    assert!(check.status.success(), "{check:?}");

    // Installing again keeps the operator's configuration and puts the shipped one beside it.
    std::fs::write(&config, "max-credit = 10\n").unwrap();
    let again = install(&root, &["--prefix", "/usr"]);
    assert_eq!(std::fs::read_to_string(&config).unwrap(), "max-credit = 10\n");
    assert_eq!(std::fs::read_to_string(root.join("etc/mbws/broker.toml.new")).unwrap(), shipped);
    assert!(String::from_utf8_lossy(&again.stdout).contains("kept"), "{again:?}");
    let _ = std::fs::remove_dir_all(root);
}

/// The commands of docs/OPERATIONS.md's `sh` blocks, one per line, comments dropped.
fn documented_commands() -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(REPO).join("docs/OPERATIONS.md")).unwrap();
    let mut commands = Vec::new();
    let mut in_sh_block = false;
    for line in doc.lines() {
        match line.trim_end() {
            "```sh" => in_sh_block = true,
            "```" => in_sh_block = false,
            command if in_sh_block && !command.trim().is_empty() && !command.starts_with('#') => {
                commands.push(command.split(" #").next().unwrap().trim().to_string())
            }
            _ => {}
        }
    }
    commands
}

/// Every command of docs/OPERATIONS.md runs as documented: install.sh (into a temporary
/// DESTDIR, with the test's binaries), then the broker's commands against what it installed.
#[test]
fn every_command_in_operations_md_runs() {
    let root = temp_dir("operations-md");
    let commands = documented_commands();
    assert!(commands.len() >= 8, "OPERATIONS.md has its commands: {commands:?}");
    let mut ran = 0;
    for command in &commands {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words[0] {
            "scripts/install.sh" => {
                // Its own --destdir (if any) becomes this test's root.
                let mut args: Vec<&str> = Vec::new();
                let mut rest = words[1..].iter();
                while let Some(word) = rest.next() {
                    if *word == "--destdir" {
                        rest.next();
                    } else {
                        args.push(word);
                    }
                }
                install(&root, &args);
            }
            "mbws-broker" => {
                // As installed with the default prefix (the first install above), with /etc and
                // /tmp inside this test's root.
                let broker = root.join("usr/local/bin/mbws-broker");
                assert!(broker.is_file(), "OPERATIONS.md installs before it runs {command}");
                let args: Vec<String> = words[1..]
                    .iter()
                    .map(|word| match word.strip_prefix('/') {
                        Some(path) if path.starts_with("etc/") || path.starts_with("tmp/") => {
                            root.join(path).display().to_string()
                        }
                        _ => word.to_string(),
                    })
                    .collect();
                let output = Command::new(&broker).args(&args).output().unwrap();
                assert!(output.status.success(), "{command}: {output:?}");
                let stdout = String::from_utf8_lossy(&output.stdout);
                if command.contains("--print-config") {
                    assert!(stdout.contains("data-dir = \"/var/lib/mbws\""), "{command}: {stdout}");
                }
                if command.contains("--max-credit 100") {
                    assert!(stdout.lines().any(|line| line == "max-credit = 100"), "{command}: {stdout}");
                }
            }
            // The admin API's examples need a live broker: tests/admin.rs runs every one.
            "curl" => continue,
            // Likewise `mbws top`: tests/top.rs runs it against a live broker.
            "mbws" if words.get(1) == Some(&"top") => continue,
            _ => {
                assert!(
                    NEEDS_SYSTEMD.contains(&command.as_str()),
                    "OPERATIONS.md runs {command:?}, which no test runs"
                );
                continue;
            }
        }
        ran += 1;
    }
    assert!(ran >= 5, "ran {ran} of {commands:?}");
    assert!(!root.join("tmp/mbws-try").exists(), "--check-config wrote a data directory");
    let _ = std::fs::remove_dir_all(root);
}
