//! `warren`: one binary for the node agent, its CLI and the servers.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = warren::cli::Cli::parse();
    match warren::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if warren::cli::out::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the outermost context first, then each cause.
            warren::logline::write_line(format_args!("warren: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
