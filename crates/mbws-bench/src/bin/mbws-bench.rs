//! `mbws-bench`: load generator for the MBWS broker and the NATS, MQTT and relay baselines.
//!
//! `mbws-bench <throughput|latency|fanout|connections|durable> --target T --url U [flags]`.
//! Progress goes to stderr, the result table to stdout, and with `--json FILE` the result
//! object to FILE. Exit codes: 0 success, 1 connection/protocol/target error, 2 bad usage.
//! The engine lives in the `mbws_bench` library (this crate's src/lib.rs).

use std::process::ExitCode;

use clap::Parser;

use mbws_bench::cli::{Cli, Plan};
use mbws_bench::{scenarios, BenchError};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(if error.use_stderr() { 2 } else { 0 });
        }
    };
    let plan = match Plan::from_cli(cli) {
        Ok(plan) => plan,
        Err(error) => return fail(&error, None),
    };
    let report = match scenarios::run(&plan) {
        Ok(report) => report,
        Err(error) => return fail(&error, Some(&plan)),
    };
    print!("{}", report.text);
    if let Some(path) = &plan.json {
        if let Err(error) = std::fs::write(path, format!("{}\n", report.json())) {
            eprintln!("mbws-bench: cannot write the JSON result to {}: {error}", path.display());
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}

/// Prints the error, naming the target and URL for anything that happened while running.
fn fail(error: &BenchError, plan: Option<&Plan>) -> ExitCode {
    match (error, plan) {
        (BenchError::Failed(message), Some(plan)) => {
            eprintln!("mbws-bench: {} target at {}: {message}", plan.target.name(), plan.url)
        }
        _ => eprintln!("mbws-bench: {error}"),
    }
    ExitCode::from(error.exit_code())
}
