//! The commands that are one request and one response: send, decode with the wire types,
//! print (or, with `--json`, print the response line as it came).

use std::collections::{BTreeMap, HashSet};
use std::io::{self, IsTerminal, Read, Write};

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use std::time::Duration;

use nkv::client::{cas_outcome, parse_reply, Cas};
use nkv::wire::{self, JsonRequest, Op};
use nkv::Client;

use crate::cli::Command;
use crate::{Context, Failure, Outcome};

/// Sends `request`, prints the line as is under `--json`, decodes the body of a success.
pub fn ask<B: DeserializeOwned>(
    client: &mut Client,
    request: &JsonRequest,
    context: &Context,
) -> Result<B, Failure> {
    let text = serde_json::to_string(request).map_err(|e| Failure::Usage(e.to_string()))?;
    let line = client.raw(&text)?;
    if context.cli.json {
        let mut out = io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(parse_reply(&line)?)
}

pub fn request(
    client: &mut Client,
    command: &Command,
    context: &Context,
) -> Result<Outcome, Failure> {
    let json = context.cli.json;
    let mut out = io::stdout().lock();
    match command {
        Command::Get { key } if is_pattern(key) => {
            let got: wire::Values<BTreeMap<String, Box<RawValue>>> =
                ask(client, &JsonRequest::new(Op::Get).key(key), context)?;
            if !json {
                for (key, value) in got.values {
                    writeln!(out, "{key} {}", display(&value))?;
                }
            }
        }
        Command::Get { key } => {
            let got: wire::Got<String, Box<RawValue>> =
                ask(client, &JsonRequest::new(Op::Get).key(key), context)?;
            if !json {
                writeln!(out, "{}", display(&got.value))?;
            }
        }
        Command::Put {
            key,
            value,
            if_rev,
            session,
        } => {
            let raw = value_argument(&value.join(" "), context)?;
            let mut request = JsonRequest::new(Op::Put).key(key);
            request.value = Some(&raw);
            request.if_rev = *if_rev;
            if *session {
                drop(out);
                return hold_session(client, key, &raw, context);
            }
            match if_rev {
                Some(rev) => compare_and_set(client, &request, key, *rev, context)?,
                None => {
                    let _: wire::Rev = ask(client, &request, context)?;
                }
            }
        }
        Command::Delete {
            key,
            if_rev: Some(rev),
        } => {
            let mut request = JsonRequest::new(Op::Del).key(key);
            request.if_rev = Some(*rev);
            compare_and_set(client, &request, key, *rev, context)?;
        }
        Command::Delete { key, .. } if is_pattern(key) => {
            let deleted: wire::Deleted = ask(client, &JsonRequest::new(Op::Del).key(key), context)?;
            if !json {
                writeln!(out, "deleted {}", deleted.deleted)?;
            }
        }
        Command::Delete { key, .. } => {
            let _: wire::Rev = ask(client, &JsonRequest::new(Op::Del).key(key), context)?;
        }
        Command::Keys { pattern } => {
            let mut request = JsonRequest::new(Op::Keys);
            if let Some(pattern) = pattern {
                request = request.key(pattern);
            }
            let keys: wire::KeyList<Vec<String>> = ask(client, &request, context)?;
            if !json {
                if io::stdout().is_terminal() {
                    write_tree(&mut out, &keys.keys)?;
                } else {
                    for key in keys.keys {
                        writeln!(out, "{key}")?;
                    }
                }
            }
        }
        Command::Health => {
            let _: wire::Health<String> = ask(client, &JsonRequest::new(Op::Health), context)?;
            if !json {
                writeln!(out, "ok")?;
            }
        }
        Command::Version => {
            let v: wire::Version<String> = ask(client, &JsonRequest::new(Op::Version), context)?;
            if !json {
                writeln!(out, "{}", v.version)?;
            }
        }
        Command::Stats => {
            let s: wire::Stats = ask(client, &JsonRequest::new(Op::Stats), context)?;
            if !json {
                writeln!(out, "connections {}", s.connections)?;
                writeln!(out, "subscribers {}", s.subscribers)?;
                writeln!(out, "keys {}", s.keys)?;
                writeln!(out, "rev {}", s.rev)?;
                writeln!(out, "events {}", s.events)?;
                writeln!(out, "coalesced {}", s.coalesced)?;
                writeln!(out, "names {}", s.names.join(" "))?;
            }
        }
        Command::Trace { key } => {
            let t: wire::Traced<String, Vec<wire::Subscriber>> =
                ask(client, &JsonRequest::new(Op::Trace).key(key), context)?;
            if !json {
                for sub in t.subscribers {
                    let targets = serde_json::to_string(&sub.subscriptions)
                        .map_err(|e| Failure::Usage(e.to_string()))?;
                    writeln!(out, "{} {} {targets}", sub.id, sub.name)?;
                }
            }
        }
        // Handled by the caller; listed so that a new command must be placed somewhere.
        Command::Subscribe { .. }
        | Command::Wait { .. }
        | Command::Watch { .. }
        | Command::Dump { .. }
        | Command::Restore
        | Command::Completions { .. }
        | Command::Man => {
            return Err(Failure::Usage(
                "this command is not a single request".into(),
            ))
        }
    }
    out.flush()?;
    Ok(Outcome::Ok)
}

/// Sends a `put` or `del` with `if_rev`; a conflict is [`Failure::Conflict`] (exit 3).
fn compare_and_set(
    client: &mut Client,
    request: &JsonRequest,
    key: &str,
    expected: u64,
    context: &Context,
) -> Result<(), Failure> {
    let text = serde_json::to_string(request).map_err(|e| Failure::Usage(e.to_string()))?;
    let line = client.raw(&text)?;
    if context.cli.json {
        let mut out = io::stdout().lock();
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    match cas_outcome(&line)? {
        Cas::Done(_) => Ok(()),
        Cas::Conflict(current) => Err(Failure::Conflict {
            key: key.to_owned(),
            expected,
            current,
        }),
    }
}

/// `put --session`: puts KEY as a session key of this connection. In a session the key then
/// lives as long as the session's connection. As a command, holds the connection open until
/// SIGINT or SIGTERM (exit 0; closing the connection makes the server delete the key); when the
/// server closes it (a restart), reconnects and puts the key again, backing off up to 1 s.
fn hold_session(
    client: &mut Client,
    key: &str,
    value: &RawValue,
    context: &Context,
) -> Result<Outcome, Failure> {
    let mut request = JsonRequest::new(Op::Put).key(key);
    request.value = Some(value);
    request.session = Some(true);
    if context.in_session {
        let _: wire::Rev = ask(client, &request, context)?;
        return Ok(Outcome::Ok);
    }
    // Before the put: an interrupt right after it must already end the process cleanly.
    crate::signals::exit_zero_on_interrupt();
    let _: wire::Rev = ask(client, &request, context)?;
    loop {
        client.wait_closed()?;
        eprintln!(
            "nkv-client: put --session: the server closed the connection, and {key} with it; putting it again"
        );
        let mut backoff = Duration::from_millis(10);
        loop {
            match ask::<wire::Rev>(client, &request, context) {
                Ok(_) => break,
                // The server is there and refuses: no retry can help.
                Err(Failure::Nkv(e @ nkv::Error::Server { .. })) => return Err(e.into()),
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        eprintln!("nkv-client: put --session: {key} is back");
    }
}

fn is_pattern(target: &str) -> bool {
    target.contains('*')
}

/// A command-line value: JSON if it parses, otherwise a string (as in the text protocol);
/// `-` reads standard input, except in a session, where standard input is the commands.
pub fn value_argument(text: &str, context: &Context) -> Result<Box<RawValue>, Failure> {
    if text != "-" {
        return Ok(parse_value(text));
    }
    if context.in_session {
        return Err(Failure::Usage(
            "put KEY -: in a session standard input carries the commands; give the value on the line".into(),
        ));
    }
    let mut input = String::new();
    io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| Failure::Usage(format!("cannot read the value from standard input: {e}")))?;
    if input.ends_with('\n') {
        input.pop();
    }
    Ok(parse_value(&input))
}

/// JSON if it is a value the server accepts, sent as typed (only whitespace outside strings
/// removed, so that it stays one line): `12345678901234567890123` is not rounded, `1e2` stays
/// `1e2`, an object keeps its key order. Otherwise the text as a string.
pub fn parse_value(text: &str) -> Box<RawValue> {
    if nkv::json::validate(text).is_ok() {
        if let Ok(raw) = RawValue::from_string(nkv::json::compact(text).into_owned()) {
            return raw;
        }
    }
    // A `&str` always serialises.
    serde_json::value::to_raw_value(text)
        .unwrap_or_else(|_| RawValue::from_string("null".to_owned()).expect("null is JSON"))
}

/// A string raw (decoded), anything else as the JSON text the server stores, unchanged.
pub fn display(value: &RawValue) -> String {
    let text = value.get();
    if text.starts_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(text) {
            return s;
        }
    }
    text.to_owned()
}

/// Sorted keys as an indented tree, for a person at a terminal. A segment that is only a
/// branch (not itself a key) ends with `.`.
fn write_tree(out: &mut impl Write, keys: &[String]) -> io::Result<()> {
    let is_key: HashSet<&str> = keys.iter().map(String::as_str).collect();
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
