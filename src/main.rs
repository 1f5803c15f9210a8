//! `warren`: one binary for the node agent, its CLI and the servers.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use warren::cli::out;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    // Before the command line is parsed, an error is JSON if it asked for JSON.
    let json = argv.iter().skip(1).any(|a| a == "--json");
    let argv = match warren::config::apply(warren::cli::Cli::command(), argv) {
        Ok(argv) => argv,
        Err(e) => return fail(&e, json),
    };
    let args = match warren::cli::Cli::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => return usage_error(e, json),
    };
    match warren::cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if out::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) if out::is_reported_as_json(&e) => ExitCode::FAILURE,
        Err(e) => fail(&e, false),
    }
}

fn fail(e: &anyhow::Error, json: bool) -> ExitCode {
    if json {
        let _ = out::write(&format!("{}\n", out::error_json(&format!("{e:#}"))));
        return ExitCode::FAILURE;
    }
    // One line: the outermost context first, then each cause.
    warren::logline::write_final_error(format_args!("warren: {e:#}"));
    ExitCode::FAILURE
}

/// A command line clap refused. With `--json` among the arguments the
/// script asked for JSON: it gets `{"error": ...}` on stdout, clap's exit code.
fn usage_error(e: clap::Error, json: bool) -> ExitCode {
    use clap::error::ErrorKind;
    let help = matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion);
    if help || !json {
        e.exit();
    }
    // Its first paragraph says what is wrong; usage and help follow.
    let text = e.render().to_string();
    let what: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let line = out::error_json(what.join(" ").trim_start_matches("error: "));
    let _ = out::write(&format!("{line}\n"));
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}
