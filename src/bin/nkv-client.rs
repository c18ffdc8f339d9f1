//! `nkv-client`: the command-line client. Exit status: 0 success, 1 not found, 2 any other error.

use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use nkv::{Client, Error, ErrorCode, Event};

/// Command-line client for the nkv notify key-value store.
///
/// With no command, reads commands line by line from standard input (with a prompt and line
/// editing when it is a terminal): get, put, delete, keys, subscribe, health, version, stats,
/// trace, help, quit.
#[derive(Parser, Debug)]
#[command(name = "nkv-client", version, about, long_about)]
struct Cli {
    /// The server's Unix socket
    #[arg(
        long,
        short,
        visible_alias = "addr",
        env = "NKV_SOCKET",
        default_value = "/tmp/nkv/nkv.sock",
        global = true
    )]
    socket: PathBuf,

    /// Print the server's response (or event) lines as they are
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Print a key's value (strings raw, anything else as JSON)
    Get {
        /// A key, or a pattern (`prefix.*`, `*`) to print all matching keys and values
        key: String,
    },
    /// Store a value: JSON if it parses as JSON, otherwise a string; `-` reads standard input
    Put { key: String, value: String },
    /// Delete a key, or every key matching a pattern (`prefix.*`, `*`)
    #[command(visible_alias = "del")]
    Delete { key: String },
    /// List keys: all, those covered by a key (itself and below), or matching a pattern
    Keys { pattern: Option<String> },
    /// Print events for a key and everything below it (or a pattern) until interrupted
    #[command(visible_alias = "sub")]
    Subscribe { key: String },
    /// Check that the server answers
    Health,
    /// Print the server's version
    Version,
    /// Print the server's counters
    Stats,
    /// List the subscribers that would be told of a change to a key
    Trace { key: String },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff)
    Man,
}

/// How a command ended, for the exit status.
enum Outcome {
    Ok,
    NotFound,
    Failed,
}

impl Outcome {
    fn exit_code(&self) -> ExitCode {
        match self {
            Outcome::Ok => ExitCode::SUCCESS,
            Outcome::NotFound => ExitCode::from(1),
            Outcome::Failed => ExitCode::from(2),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Completions { shell }) => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut command, "nkv-client", &mut io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            let command = <Cli as clap::CommandFactory>::command();
            return match clap_mangen::Man::new(command).render(&mut io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nkv-client: {e}");
                    ExitCode::from(2)
                }
            };
        }
        _ => {}
    }
    let mut client = match Client::connect(&cli.socket) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("nkv-client: {}: {e}", cli.socket.display());
            return ExitCode::from(2);
        }
    };
    match cli.command.clone() {
        Some(command) => run(&mut client, &command, cli.json).exit_code(),
        None => interactive(&mut client, cli.json),
    }
}

fn run(client: &mut Client, command: &Command, json: bool) -> Outcome {
    match execute(client, command, json) {
        Ok(outcome) => outcome,
        Err(e) if is_broken_pipe(&e) => Outcome::Ok,
        Err(e) => {
            eprintln!("nkv-client: {e}");
            match e.code() {
                Some(ErrorCode::NotFound) => Outcome::NotFound,
                _ => Outcome::Failed,
            }
        }
    }
}

fn is_broken_pipe(e: &Error) -> bool {
    matches!(e, Error::Io(io) if io.kind() == io::ErrorKind::BrokenPipe)
}

/// The request a command sends, in the JSON form.
fn request(command: &Command) -> Result<Value, Error> {
    Ok(match command {
        Command::Get { key } => json!({"op": "get", "key": key}),
        Command::Put { key, value } => {
            json!({"op": "put", "key": key, "value": parse_value(value)?})
        }
        Command::Delete { key } => json!({"op": "del", "key": key}),
        Command::Keys { pattern: Some(p) } => json!({"op": "keys", "key": p}),
        Command::Keys { pattern: None } => json!({"op": "keys"}),
        Command::Health => json!({"op": "health"}),
        Command::Version => json!({"op": "version"}),
        Command::Stats => json!({"op": "stats"}),
        Command::Trace { key } => json!({"op": "trace", "key": key}),
        Command::Subscribe { .. } | Command::Completions { .. } | Command::Man => {
            unreachable!("handled without a request")
        }
    })
}

/// A command-line value: JSON if it parses, otherwise a string (like the text protocol).
fn parse_value(text: &str) -> Result<Value, Error> {
    let text = if text == "-" {
        let mut input = String::new();
        io::stdin().read_to_string(&mut input)?;
        if input.ends_with('\n') {
            input.pop();
        }
        input
    } else {
        text.to_owned()
    };
    Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn execute(client: &mut Client, command: &Command, json: bool) -> Result<Outcome, Error> {
    if let Command::Subscribe { key } = command {
        return subscribe(client, key, json);
    }
    let line = client.raw(&request(command)?.to_string())?;
    let mut out = io::stdout().lock();
    let response: serde_json::Map<String, Value> =
        serde_json::from_str(&line).map_err(|e| Error::Protocol(format!("{e}: {line:?}")))?;
    if response.get("ok") != Some(&Value::Bool(true)) {
        if json {
            writeln!(out, "{line}")?;
        }
        let code = response.get("error").and_then(Value::as_str).unwrap_or("");
        let message = response
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("");
        return Err(Error::Server {
            code: ErrorCode::from_wire(code),
            raw_code: code.to_owned(),
            message: message.to_owned(),
        });
    }
    if json {
        writeln!(out, "{line}")?;
        return Ok(Outcome::Ok);
    }
    let field = |name: &str| response.get(name).cloned().unwrap_or(Value::Null);
    match command {
        Command::Get { .. } => match response.get("values") {
            Some(Value::Object(values)) => {
                for (key, value) in values {
                    writeln!(out, "{key} {}", display(value))?;
                }
            }
            _ => writeln!(out, "{}", display(&field("value")))?,
        },
        Command::Delete { .. } if response.contains_key("deleted") => {
            writeln!(out, "deleted {}", field("deleted"))?;
        }
        Command::Put { .. } | Command::Delete { .. } => {}
        Command::Keys { .. } => {
            let keys: Vec<String> = field("keys")
                .as_array()
                .into_iter()
                .flatten()
                .map(display)
                .collect();
            if io::stdout().is_terminal() {
                write_tree(&mut out, &keys)?;
            } else {
                for key in keys {
                    writeln!(out, "{key}")?;
                }
            }
        }
        Command::Health => writeln!(out, "ok")?,
        Command::Version => writeln!(out, "{}", display(&field("version")))?,
        Command::Stats => {
            for (name, value) in response.iter().filter(|(name, _)| *name != "ok") {
                writeln!(out, "{name} {value}")?;
            }
        }
        Command::Trace { .. } => {
            for sub in field("subscribers").as_array().into_iter().flatten() {
                writeln!(
                    out,
                    "{} {} {}",
                    sub["id"],
                    display(&sub["name"]),
                    sub["subscriptions"]
                )?;
            }
        }
        Command::Subscribe { .. } | Command::Completions { .. } | Command::Man => {}
    }
    Ok(Outcome::Ok)
}

/// Sorted keys as an indented tree, for a person at a terminal. A segment that is only a
/// branch (not itself a key) ends with `.`.
fn write_tree(out: &mut impl Write, keys: &[String]) -> io::Result<()> {
    let is_key: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut previous: Vec<&str> = Vec::new();
    for key in keys {
        let segments: Vec<&str> = key.split('.').collect();
        let common = previous
            .iter()
            .zip(&segments)
            .take_while(|(a, b)| a == b)
            .count();
        for depth in common..segments.len() {
            let path = segments[..=depth].join(".");
            let dot = if is_key.contains(path.as_str()) {
                ""
            } else {
                "."
            };
            writeln!(out, "{}{}{dot}", "  ".repeat(depth), segments[depth])?;
        }
        previous = segments;
    }
    Ok(())
}

/// A string raw, anything else as JSON.
fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn subscribe(client: &Client, key: &str, json: bool) -> Result<Outcome, Error> {
    exit_on_interrupt();
    let mut sub = client.subscribe(key)?;
    while let Some(line) = sub.next_line()? {
        // Stdout is locked per event, not across the blocking read, and flushed each time:
        // an interrupt finds nothing pending and nothing locked.
        let mut out = io::stdout().lock();
        if json {
            writeln!(out, "{line}")?;
        } else {
            match Event::parse(&line)? {
                Some(Event::Init { key, value, .. }) => {
                    writeln!(out, "init {key} {}", display(&value))?
                }
                Some(Event::Put { key, value, .. }) => {
                    writeln!(out, "put {key} {}", display(&value))?
                }
                Some(Event::Del { key, .. }) => writeln!(out, "del {key}")?,
                Some(Event::Ready { sub, count }) => writeln!(out, "ready {sub} {count}")?,
                Some(Event::Shutdown) => writeln!(out, "shutdown")?,
                None => {}
            }
        }
        out.flush()?;
    }
    Ok(Outcome::Ok)
}

/// Ctrl-C (or SIGTERM) ends a subscription successfully: it is how a user stops watching.
fn exit_on_interrupt() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    if let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                std::process::exit(0);
            }
        });
    }
}

const INTERACTIVE_HELP: &str = "\
commands:
  get KEY | get PREFIX.* | get *
  put KEY VALUE          (VALUE is the rest of the line; JSON if it parses, else a string)
  delete KEY | delete PREFIX.*
  keys [PREFIX.*]
  subscribe KEY          (prints events until Ctrl-C)
  health | version | stats | trace KEY
  help | quit";

fn interactive(client: &mut Client, json: bool) -> ExitCode {
    if io::stdin().is_terminal() {
        let Ok(mut editor) = rustyline::DefaultEditor::new() else {
            return piped(client, json);
        };
        eprintln!(
            "nkv-client {}: type help for commands",
            env!("CARGO_PKG_VERSION")
        );
        loop {
            match editor.readline("nkv> ") {
                Ok(line) => {
                    let _ = editor.add_history_entry(line.as_str());
                    if interpret(client, &line, json).is_none() {
                        break;
                    }
                }
                Err(rustyline::error::ReadlineError::Interrupted) => continue,
                Err(_) => break,
            }
        }
        ExitCode::SUCCESS
    } else {
        piped(client, json)
    }
}

fn piped(client: &mut Client, json: bool) -> ExitCode {
    // A piped session fails (status 2) if any of its commands failed.
    let mut failed = false;
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match interpret(client, &line, json) {
            None => break,
            Some(outcome) => failed |= matches!(outcome, Outcome::Failed),
        }
    }
    if failed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one interactive line; `None` ends the session.
fn interpret(client: &mut Client, line: &str, json: bool) -> Option<Outcome> {
    let line = line.trim();
    let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
    let rest = rest.trim_start();
    let mut args = rest.split_whitespace();
    let mut arg = || args.next().map(str::to_owned);
    let command = match verb.to_ascii_lowercase().as_str() {
        "" => return Some(Outcome::Ok),
        "quit" | "exit" => return None,
        "help" | "?" => {
            println!("{INTERACTIVE_HELP}");
            return Some(Outcome::Ok);
        }
        "get" => arg().map(|key| Command::Get { key }),
        "put" | "set" => rest.split_once(' ').map(|(key, value)| Command::Put {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
        "delete" | "del" => arg().map(|key| Command::Delete { key }),
        "keys" => Some(Command::Keys { pattern: arg() }),
        "subscribe" | "sub" => arg().map(|key| Command::Subscribe { key }),
        "health" => Some(Command::Health),
        "version" => Some(Command::Version),
        "stats" => Some(Command::Stats),
        "trace" => arg().map(|key| Command::Trace { key }),
        other => {
            eprintln!("unknown command {other:?}; type help");
            return Some(Outcome::Failed);
        }
    };
    let Some(command) = command else {
        eprintln!("{verb}: missing argument; type help");
        return Some(Outcome::Failed);
    };
    Some(run(client, &command, json))
}
