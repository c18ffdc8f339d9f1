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
    let verb = if verb == "?" { "help".to_owned() } else { verb };
    // A put value is the rest of the line as typed, after the one separator following the
    // key (see `value_after_key`); clap sees only a placeholder, so a value such as `--help`
    // or `-5` is never read as a flag.
    let typed = value_after_key(&verb, &words, line);
    let mut args: Vec<&str> = std::iter::once(verb.as_str())
        .chain(words[1..].iter().map(|(_, w)| *w))
        .collect();
    if typed.is_some() {
        args.truncate(2);
        args.extend(["--", "value"]);
    }
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
    if let (Command::Put { value, .. }, Some(typed)) = (&mut command, typed) {
        *value = vec![typed.to_owned()];
    }
    Some(crate::run(client, &command, context))
}

/// For `put KEY VALUE...`: the line after KEY and the one whitespace character that follows
/// it, kept exactly (leading, inner and trailing spaces). A `-- ` right after that separator
/// is the end-of-flags mark and is dropped when something follows it, as on the command line.
/// `None` for other commands, or when KEY looks like a flag or no value follows.
fn value_after_key<'a>(verb: &str, words: &[(usize, &str)], line: &'a str) -> Option<&'a str> {
    if verb != "put" && verb != "set" {
        return None;
    }
    let &(start, key) = words.get(1)?;
    words.get(2)?;
    if key.starts_with('-') {
        return None;
    }
    let after = &line[start + key.len()..];
    let separator = after.chars().next()?.len_utf8();
    let value = &after[separator..];
    Some(match value.strip_prefix("-- ") {
        Some(rest) if !rest.is_empty() => rest,
        _ => value,
    })
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
