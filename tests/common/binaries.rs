//! Where a test finds the workspace's binaries. Cargo names a binary to the tests of its own
//! package only (`CARGO_BIN_EXE_<name>`); the tests of the tool crates (crates/mbws-client,
//! crates/mbws-bench) also run the broker, so they find it beside their own executable.
//!
//! The assumption: a test executable is `target/<profile>/deps/<test>-<hash>` and the binaries
//! are `target/<profile>/<name>`. A `cargo test` (or `cargo build`) at the workspace root builds
//! every binary first, because the workspace's default members are all its crates; a
//! `cargo test -p mbws-client` alone does not build the broker, and then the test stops with a
//! message saying so rather than run an old one it cannot know about.

use std::path::PathBuf;

/// The `mbws-broker` binary: Cargo's own path in the broker package's tests, else the one in
/// this test's target directory.
pub fn broker_binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_mbws-broker") {
        Some(path) => PathBuf::from(path),
        None => workspace_binary("mbws-broker"),
    }
}

/// The workspace binary `name` in the target directory of the running test (see the module doc).
pub fn workspace_binary(name: &str) -> PathBuf {
    let test = std::env::current_exe().expect("the test executable's path");
    let profile_dir = test.parent().and_then(|deps| deps.parent()).expect("the test runs from target/<profile>/deps");
    let binary = profile_dir.join(name);
    assert!(
        binary.is_file(),
        "{} is missing: build the whole workspace first (`cargo build` or `cargo test` at the repository root \
         builds every crate's binaries)",
        binary.display()
    );
    binary
}
