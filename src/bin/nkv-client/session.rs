//! A session: commands read line by line from standard input, each parsed with the same clap
//! definitions as a one-shot command, run on one connection that is opened again when the
//! server restarts. The session's exit status is the worst of its commands'.

use std::io::{self, BufRead, IsTerminal};

use clap::error::ErrorKind;
use clap::Parser;

use nkv::Client;

use crate::cli::{Cli, Command, SessionLine};
use crate::{signals, Context, Outcome};

pub fn run(cli: &Cli) -> Outcome {
    let mut client = Client::lazy(&cli.socket, cli.timeouts());
    if io::stdin().is_terminal() {
        if let Ok(editor) = rustyline::DefaultEditor::new() {
            return interactive(cli, &mut client, editor);
        }
    }
    piped(cli, &mut client)
}

fn interactive(cli: &Cli, client: &mut Client, mut editor: rustyline::DefaultEditor) -> Outcome {
    use rustyline::error::ReadlineError;
    signals::return_to_prompt();
    let context = Context {
        cli,
        in_session: true,
        at_prompt: true,
    };
    eprintln!(
        "nkv-client {}: type help for commands",
        env!("CARGO_PKG_VERSION")
    );
    let mut worst = Outcome::Ok;
    loop {
        match editor.readline("nkv> ") {
            Ok(line) => {
                let _ = editor.add_history_entry(line.as_str());
                match interpret(client, &line, &context) {
                    Some(outcome) => worst = worst.max(outcome),
                    None => break,
                }
            }
            // Ctrl-C at the prompt clears the line, as in a shell.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("nkv-client: cannot read the terminal: {e}");
                worst = Outcome::Failed;
                break;
            }
        }
    }
    worst
}

fn piped(cli: &Cli, client: &mut Client) -> Outcome {
    let context = Context {
        cli,
        in_session: true,
        at_prompt: false,
    };
    let mut worst = Outcome::Ok;
    // The only reader of standard input in a session: commands that would read it too
    // (`put KEY -`, `restore`) refuse to.
    for line in io::stdin().lock().lines() {
        let line = match line {
            Ok(line) => line,
            Err(e) => {
                eprintln!("nkv-client: cannot read standard input: {e}");
                return Outcome::Failed;
            }
        };
        match interpret(client, &line, &context) {
            Some(outcome) => worst = worst.max(outcome),
            None => break,
        }
    }
    worst
}

/// Runs one session line; `None` ends the session.
pub fn interpret(client: &mut Client, line: &str, context: &Context) -> Option<Outcome> {
    let words = words(line);
    let Some(&(_, verb)) = words.first() else {
        return Some(Outcome::Ok);
    };
    if verb.starts_with('#') {
        return Some(Outcome::Ok);
    }
    let verb = verb.to_ascii_lowercase();
    if verb == "quit" || verb == "exit" {
        return None;
    }
    let args = std::iter::once(if verb == "?" { "help" } else { verb.as_str() })
        .chain(words[1..].iter().map(|(_, w)| *w));
    let mut command = match SessionLine::try_parse_from(args) {
        Ok(parsed) => parsed.command,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            print!("{}", e.render());
            return Some(Outcome::Ok);
        }
        Err(e) => {
            eprint!("{}", e.render());
            return Some(Outcome::Failed);
        }
    };
    // A value is the rest of the line as typed, inner spaces and all.
    if let Command::Put { key, value } = &mut command {
        if let [_, (_, k), (start, _), ..] = words.as_slice() {
            if k == key {
                *value = vec![line[*start..].trim_end().to_owned()];
            }
        }
    }
    Some(crate::run(client, &command, context))
}

/// The whitespace-separated words of a line with their byte offsets.
fn words(line: &str) -> Vec<(usize, &str)> {
    let mut words = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                words.push((s, &line[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        words.push((s, &line[s..]));
    }
    words
}
