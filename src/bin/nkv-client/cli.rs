//! The command line, defined once: one-shot commands and the lines of a session are parsed by
//! these same clap definitions.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use nkv::Timeouts;

/// Command-line client for the nkv notify key-value store.
///
/// With no command, runs a session: reads commands line by line from standard input (with a
/// prompt and line editing when it is a terminal). Each line is a command as on the command
/// line (`get KEY`, `put KEY VALUE`, ...), plus `help` and `quit`. A session reconnects when
/// the server restarts; its exit status is the worst of its commands'.
#[derive(Parser, Debug)]
#[command(name = "nkv-client", version, about, long_about)]
pub struct Cli {
    /// The server's Unix socket
    #[arg(
        long,
        short,
        visible_alias = "addr",
        env = "NKV_SOCKET",
        default_value = "/tmp/nkv/nkv.sock",
        global = true
    )]
    pub socket: PathBuf,

    /// Print the server's response (or event) lines as they are
    #[arg(long, global = true)]
    pub json: bool,

    /// Seconds to wait for the server to accept and to answer each request (0: forever);
    /// for `wait`, how long to wait for the key. Default: 10 to connect, 30 per response
    #[arg(long, global = true, env = "NKV_TIMEOUT", value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<Duration>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    pub fn timeouts(&self) -> Timeouts {
        match self.timeout {
            None => Timeouts::default(),
            Some(t) if t.is_zero() => Timeouts::all(None),
            Some(t) => Timeouts::all(Some(t)),
        }
    }
}

/// Seconds, fractions allowed (`0.5`).
fn parse_secs(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{text:?} is not a number of seconds such as 5 or 0.5"))
}

#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print a key's value (strings raw, anything else as JSON)
    Get {
        /// A key, or a pattern (`prefix.*`, `*`) to print all matching keys and values
        key: String,
    },
    /// Store a value: JSON if it parses as JSON, otherwise a string; `-` reads standard input
    #[command(visible_alias = "set")]
    Put {
        /// Only if KEY is at revision N (0: only if it does not exist); exit 3 on a conflict
        #[arg(long, value_name = "N", conflicts_with = "session")]
        if_rev: Option<u64>,
        /// A session key: kept in memory, owned by this command's connection, which it holds
        /// open until SIGINT/SIGTERM (then exit 0, and the server deletes the key). Put again
        /// when the server restarts. In a session, the key lives as long as the session's
        /// connection instead
        #[arg(long)]
        session: bool,
        key: String,
        /// The value; several words are joined with spaces; may start with `-` (`put k -5`)
        #[arg(required = true, num_args = 1.., allow_hyphen_values = true, trailing_var_arg = true)]
        value: Vec<String>,
    },
    /// Delete a key, or every key matching a pattern (`prefix.*`, `*`)
    #[command(visible_alias = "del")]
    Delete {
        /// Only if KEY is at revision N; exit 3 on a conflict
        #[arg(long, value_name = "N")]
        if_rev: Option<u64>,
        key: String,
    },
    /// List keys: all, those covered by a key (itself and below), or matching a pattern
    Keys { pattern: Option<String> },
    /// Print events for a key and everything below it (or a pattern) until Ctrl-C (exit
    /// 130); when the server restarts, reconnect and resume (missed changes, or `reset` and
    /// the whole state, then `ready`)
    #[command(visible_alias = "sub")]
    Subscribe {
        /// End when the connection ends, as before resuming existed: after the server's
        /// `shutdown` (printed; exit 0), or when the connection is lost (exit 2)
        #[arg(long)]
        no_reconnect: bool,
        key: String,
    },
    /// Wait until KEY exists (and equals --equals), print its value; exit 1 on --timeout.
    /// Waits across server restarts
    Wait {
        /// Fail (exit 2) when the server stops or the connection is lost instead of waiting
        /// for the server to return
        #[arg(long)]
        no_reconnect: bool,
        key: String,
        /// Wait for this value (JSON if it parses as JSON, otherwise a string)
        #[arg(long, value_name = "JSON", allow_hyphen_values = true)]
        equals: Option<String>,
    },
    /// Run CMD once per change below PREFIX, with NKV_EVENT, NKV_KEY, NKV_VALUE (JSON text)
    /// and NKV_REV set; runs are serialized, changes during a run are coalesced per key.
    /// Resumes across server restarts
    Watch {
        /// End (exit 0 on the server's shutdown, 2 on a lost connection) instead of
        /// reconnecting
        #[arg(long)]
        no_reconnect: bool,
        prefix: String,
        /// Skip the initial values: run only for changes after the start
        #[arg(long)]
        no_init: bool,
        /// The command and its arguments, after `--`
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Check that the server answers
    Health,
    /// Print the server's version
    Version,
    /// Print the server's counters and the names of its connections
    Stats,
    /// List the subscribers that would be told of a change to a key
    Trace { key: String },
    /// Print `{"key":..,"value":..}` lines for every key (or PREFIX and below)
    Dump { prefix: Option<String> },
    /// Read `dump` lines from standard input and put each; stops at the first error
    Restore,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff)
    Man,
}

/// `put KEY VALUE...` with everything after KEY made the value, even words clap would read
/// as flags (`--help`, `-h`, `--json`, `--timeout`, `--`): a `--` is put after KEY. A `--`
/// right after KEY that is followed by more words is the usual end-of-flags mark and is
/// dropped (`put k -- --json` stores `"--json"`; `put k --` stores `"--"`). Flags go before
/// the key; other commands are left alone.
pub fn put_value_as_typed(args: Vec<OsString>) -> Vec<OsString> {
    // Global flags that take a value, so that their value is not taken for the command.
    const WITH_VALUE: &[&str] = &["-s", "--socket", "--addr", "--timeout", "--if-rev"];
    let mut i = 1;
    let mut command = None;
    while i < args.len() {
        let word = args[i].to_string_lossy();
        if word == "--" {
            return args;
        }
        if word.starts_with('-') {
            i += if WITH_VALUE.contains(&word.as_ref()) {
                2
            } else {
                1
            };
            continue;
        }
        match command {
            None if word == "put" || word == "set" => command = Some(i),
            None => return args,
            Some(_) => {
                let key = i;
                let mut rest = &args[key + 1..];
                if rest.is_empty() {
                    return args;
                }
                if rest.len() > 1 && rest[0] == "--" {
                    rest = &rest[1..];
                }
                let mut out = args[..=key].to_vec();
                out.push("--".into());
                out.extend_from_slice(rest);
                return out;
            }
        }
        i += 1;
    }
    args
}

/// One line of a session: a command, parsed with the same definitions.
#[derive(Parser, Debug)]
#[command(
    name = "nkv-client",
    no_binary_name = true,
    disable_version_flag = true,
    subcommand_required = true,
    help_template = "commands (as on the command line; flags go before the key):\n{subcommands}\n  quit    End the session"
)]
pub struct SessionLine {
    #[command(subcommand)]
    pub command: Command,
}
