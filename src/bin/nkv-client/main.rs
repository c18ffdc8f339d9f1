//! `nkv-client`: the command-line client.
//!
//! Exit status: 0 success, 1 not found (or `wait` timed out), 2 any other error, 3 a
//! compare-and-set conflict (`--if-rev`), 130 when interrupted (Ctrl-C) while following events.
//! A session exits with the worst status of its commands.
//!
//! - `cli`: the clap definitions, shared by one-shot commands and session lines;
//! - `commands`: one request, one response, printed;
//! - `follow`: `subscribe`, `wait`, `watch` (built on a subscription);
//! - `transfer`: `dump` and `restore`;
//! - `session`: the interactive and piped modes;
//! - `signals`: what Ctrl-C does;
//! - `man` (shared with nkv-server): the man page.

mod cli;
mod commands;
mod follow;
#[path = "../common/man.rs"]
mod man;
mod session;
mod signals;
mod transfer;

use std::fmt;
use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use nkv::{Client, ErrorCode};

/// How a command ended, worst last: a session exits with the worst of its commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    NotFound,
    /// A compare-and-set found the key at another revision.
    Conflict,
    Failed,
}

impl Outcome {
    fn exit_code(self) -> ExitCode {
        ExitCode::from(match self {
            Outcome::Ok => 0,
            Outcome::NotFound => 1,
            Outcome::Failed => 2,
            Outcome::Conflict => 3,
        })
    }
}

/// Why a command failed.
#[derive(Debug)]
pub enum Failure {
    /// The server said no, or could not be reached.
    Nkv(nkv::Error),
    /// Writing our own output failed.
    Output(io::Error),
    /// The command cannot run as given.
    Usage(String),
    /// `--if-rev` found the key at another revision (`current`, 0: absent); nothing changed.
    Conflict {
        key: String,
        expected: u64,
        current: u64,
    },
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Nkv(e) => e.fmt(f),
            Failure::Output(e) => write!(f, "cannot write the output: {e}"),
            Failure::Usage(message) => f.write_str(message),
            Failure::Conflict {
                key,
                expected,
                current: 0,
            } => write!(
                f,
                "conflict: {key} does not exist (current revision 0), not at revision {expected}; nothing changed"
            ),
            Failure::Conflict {
                key,
                expected,
                current,
            } => write!(
                f,
                "conflict: {key} is at revision {current}, not {expected}; nothing changed"
            ),
        }
    }
}

impl From<nkv::Error> for Failure {
    fn from(e: nkv::Error) -> Failure {
        Failure::Nkv(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Output(e)
    }
}

/// What every command may consult: the global flags, and whether it runs in a session.
pub struct Context<'a> {
    pub cli: &'a Cli,
    /// Running as a line of a session (standard input is the command stream).
    pub in_session: bool,
    /// A session at a terminal: Ctrl-C returns to the prompt instead of exiting.
    pub at_prompt: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(cli::put_value_as_typed(std::env::args_os().collect()));
    match &cli.command {
        None => session::run(&cli).exit_code(),
        Some(command) => {
            let context = Context {
                cli: &cli,
                in_session: false,
                at_prompt: false,
            };
            let mut client = Client::lazy(&cli.socket, cli.timeouts());
            run(&mut client, command, &context).exit_code()
        }
    }
}

/// Runs one command and reports its failure on stderr.
pub fn run(client: &mut Client, command: &Command, context: &Context) -> Outcome {
    match execute(client, command, context) {
        Ok(outcome) => outcome,
        // Our reader went away (`| head`): not an error of ours.
        Err(Failure::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => Outcome::Ok,
        Err(e) => {
            eprintln!("nkv-client: {e}");
            match &e {
                Failure::Nkv(e) if e.code() == Some(ErrorCode::NotFound) => Outcome::NotFound,
                Failure::Conflict { .. } => Outcome::Conflict,
                _ => Outcome::Failed,
            }
        }
    }
}

fn execute(client: &mut Client, command: &Command, context: &Context) -> Result<Outcome, Failure> {
    match command {
        Command::Subscribe { key, no_reconnect } => {
            follow::subscribe(client, key, !no_reconnect, context)
        }
        Command::Wait {
            key,
            equals,
            no_reconnect,
        } => follow::wait(client, key, equals.as_deref(), !no_reconnect, context),
        Command::Watch {
            prefix,
            no_init,
            no_reconnect,
            command,
        } => follow::watch(client, prefix, *no_init, !no_reconnect, command, context),
        Command::Dump { prefix } => transfer::dump(client, prefix.as_deref(), context),
        Command::Restore => transfer::restore(client, context),
        Command::Completions { shell } => {
            let mut out = io::stdout().lock();
            out.write_all(completions(*shell).as_bytes())?;
            out.flush()?;
            Ok(Outcome::Ok)
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            man::render(command, &man::CLIENT, &mut io::stdout().lock())?;
            Ok(Outcome::Ok)
        }
        other => commands::request(client, other, context),
    }
}

/// The completion script for `shell`.
///
/// clap_complete's bash script names a subcommand's case label `nkv__subcmd__client__...`
/// where it dispatches to `nkv__client__...` (it mangles the `-` of the binary's name in two
/// ways), so no subcommand's arguments or options ever completed; the labels are made to
/// match here. `tests/it/terminal.rs` completes through real bash, zsh and fish.
fn completions(shell: clap_complete::Shell) -> String {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "nkv-client", &mut script);
    let script = String::from_utf8_lossy(&script).into_owned();
    match shell {
        clap_complete::Shell::Bash => script.replace("nkv__subcmd__client", "nkv__client"),
        // clap_complete's fish script completes no positional value, not even the shells of
        // `completions` (an enum) that bash and zsh offer; add them.
        clap_complete::Shell::Fish => {
            use clap::ValueEnum;
            let shells: Vec<String> = clap_complete::Shell::value_variants()
                .iter()
                .filter_map(|s| s.to_possible_value())
                .map(|v| v.get_name().to_owned())
                .collect();
            format!(
                "{script}complete -c nkv-client -n \"__fish_nkv_client_using_subcommand completions\" -f -a \"{}\"\n",
                shells.join(" ")
            )
        }
        _ => script,
    }
}
