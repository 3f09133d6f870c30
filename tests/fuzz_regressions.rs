//! The fuzz targets' checks (fuzz/src/lib.rs, included here as they are) under plain
//! `cargo test`: every input a fuzzer ever crashed is kept in
//! `tests/fuzz-regressions/<target>/` and replayed, with the seeds the fuzzers start from.
//! A fixed bug stays fixed without nightly or cargo-fuzz (docs/SECURITY.md, "Fuzzing and Miri").

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::path::Path;

/// Runs `target`'s check on every file of `dir` (if it exists); returns how many ran.
fn replay(target: &str, check: fn(&[u8]), dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("reading a regression directory").path();
        let input = std::fs::read(&path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
        eprintln!("{target}: {}", path.display());
        check(&input);
        count += 1;
    }
    count
}

#[test]
fn every_kept_crash_input_passes_its_targets_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    for (target, check) in checks::TARGETS {
        replay(target, *check, &root.join(target));
    }
    // Every directory names a target, so no kept input is silently skipped.
    for entry in std::fs::read_dir(&root).expect("tests/fuzz-regressions exists") {
        let name = entry.expect("reading tests/fuzz-regressions").file_name();
        let name = name.to_string_lossy();
        assert!(
            name == "README.md" || checks::TARGETS.iter().any(|(target, _)| *target == name),
            "tests/fuzz-regressions/{name} is not a fuzz target's name"
        );
    }
}

#[test]
fn every_seed_passes_its_targets_checks_and_is_committed() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, check) in checks::TARGETS {
        let seeds = checks::seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for seed in &seeds {
            check(seed);
        }
        let committed = std::fs::read_dir(corpus.join(target))
            .map(|entries| {
                entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("seed-")).count()
            })
            .unwrap_or(0);
        assert_eq!(
            committed,
            seeds.len(),
            "fuzz/corpus/{target}/seed-* differ from checks::seeds: run \
             `cargo test --test fuzz_regressions write_seeds -- --ignored`"
        );
    }
}

/// Writes the seeds into fuzz/corpus/<target>/seed-<n> (run by hand when the seeds change).
#[test]
#[ignore = "writes files: run when fuzz/src/lib.rs's seeds change"]
fn write_seeds() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, _) in checks::TARGETS {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        for (index, seed) in checks::seeds(target).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{index}")), seed).expect("writing a seed");
        }
    }
}
