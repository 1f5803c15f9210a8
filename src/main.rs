//! `warren`: one binary for the node agent, its CLI and the servers.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

fn main() -> ExitCode {
    let argv = match warren::config::apply(warren::cli::Cli::command(), std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => return fail(&e),
    };
    let args = warren::cli::Cli::parse_from(argv);
    match warren::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if warren::cli::out::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    // One line: the outermost context first, then each cause.
    warren::logline::write_final_error(format_args!("warren: {e:#}"));
    ExitCode::FAILURE
}
