//! The commands built on a subscription: `subscribe`, `wait`, `watch`.
//!
//! Each turns the command's own connection into the subscriber connection (no idle second
//! connection is held), and so reads the snapshot and every later change without a gap: no
//! poll loop and no race between looking and waiting.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde_json::value::RawValue;

use nkv::client::{Connection, Delivery};
use nkv::{Client, RawEvent as Event, Watch};

use crate::commands::{display, parse_value};
use crate::signals::Following;
use crate::{Context, Failure, Outcome};

/// This command's connection, made a watch of `target` (see [`Watch`]: it reconnects and
/// resumes unless `--no-reconnect`); the client is left to reconnect for the next command of
/// a session. Losing and regaining the connection is told on stderr.
fn take_watch(
    client: &mut Client,
    target: &str,
    reconnect: bool,
    what: &'static str,
) -> Result<Watch, Failure> {
    let fresh = Client::lazy(client.path(), client.timeouts());
    let watch = std::mem::replace(client, fresh).into_watch(target)?;
    Ok(watch
        .reconnecting(reconnect)
        .on_connection(move |change| match change {
            Connection::Lost(why) => {
                eprintln!("nkv-client: {what}: connection to the server lost ({why}); reconnecting")
            }
            Connection::Resumed {
                from_rev: Some(rev),
            } => {
                eprintln!("nkv-client: {what}: reconnected; resuming after rev {rev}")
            }
            Connection::Resumed { from_rev: None } => {
                eprintln!("nkv-client: {what}: reconnected; subscribing again")
            }
        }))
}

fn follow(watch: &Watch, context: &Context) -> Following {
    Following::start(context.at_prompt.then(|| watch.interrupter()))
}

/// How the stream of events ended.
enum End {
    /// The server sent `shutdown` (only with `--no-reconnect`).
    Shutdown,
    /// Ctrl-C at the prompt.
    Interrupted,
    /// The deadline (`wait --timeout`) passed.
    TimedOut,
    Lost(String),
}

/// Reads the next event, with the line the server sent (`None` for a `del` the watch made up
/// after a reset); `Err(End)` when the stream is over.
fn next_event(
    watch: &mut Watch,
    deadline: Option<Instant>,
) -> Result<(Event, Option<String>), End> {
    loop {
        match watch.next_delivery(deadline) {
            Ok(Some(Delivery {
                event: Event::Shutdown,
                ..
            })) => return Err(End::Shutdown),
            Ok(Some(delivery)) => return Ok((delivery.event, delivery.line)),
            Ok(None) if watch.interrupted() => return Err(End::Interrupted),
            Ok(None) => return Err(End::Lost("the server closed the connection".into())),
            Err(nkv::Error::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(End::TimedOut)
            }
            Err(_) if watch.interrupted() => return Err(End::Interrupted),
            // A line that is not an event: the watch dropped the connection and reconnects.
            Err(e) if watch.goes_on() => {
                eprintln!("nkv-client: {e}");
                continue;
            }
            Err(e) => return Err(End::Lost(e.to_string())),
        }
    }
}

/// The line to print for an event under `--json`: the server's, or the event written out.
fn json_line(event: &Event, line: Option<String>) -> Result<String, Failure> {
    match line {
        Some(line) => Ok(line),
        None => serde_json::to_string(event).map_err(|e| Failure::Usage(e.to_string())),
    }
}

fn ended(end: End, what: &str) -> Outcome {
    match end {
        End::Shutdown | End::Interrupted => Outcome::Ok,
        End::TimedOut => {
            eprintln!("nkv-client: {what}: timed out");
            Outcome::Failed
        }
        End::Lost(why) => {
            eprintln!("nkv-client: {what}: connection to the server lost: {why}");
            Outcome::Failed
        }
    }
}

pub fn subscribe(
    client: &mut Client,
    key: &str,
    reconnect: bool,
    context: &Context,
) -> Result<Outcome, Failure> {
    let mut watch = take_watch(client, key, reconnect, "subscribe")?;
    let _following = follow(&watch, context);
    loop {
        let (event, line) = match next_event(&mut watch, None) {
            Ok(next) => next,
            Err(End::Shutdown) => {
                if context.cli.json {
                    println!("{}", json_line(&Event::Shutdown, None)?);
                } else {
                    println!("shutdown");
                }
                return Ok(Outcome::Ok);
            }
            Err(end) => return Ok(ended(end, "subscribe")),
        };
        // Stdout is locked per event, not across the blocking read, and flushed each time:
        // an interrupt finds nothing pending and nothing locked.
        let mut out = io::stdout().lock();
        if context.cli.json {
            writeln!(out, "{}", json_line(&event, line)?)?;
        } else {
            match event {
                Event::Init { key, value, .. } => writeln!(out, "init {key} {}", display(&value))?,
                Event::Put { key, value, .. } => writeln!(out, "put {key} {}", display(&value))?,
                Event::Del { key, .. } => writeln!(out, "del {key}")?,
                Event::Ready { sub, count, .. } => writeln!(out, "ready {sub} {count}")?,
                Event::Reset { sub } => writeln!(out, "reset {sub}")?,
                Event::Shutdown => {}
            }
        }
        out.flush()?;
    }
}

pub fn wait(
    client: &mut Client,
    key: &str,
    equals: Option<&str>,
    reconnect: bool,
    context: &Context,
) -> Result<Outcome, Failure> {
    if key.contains('*') {
        return Err(Failure::Usage(format!(
            "wait: {key:?} is a pattern; wait takes one key"
        )));
    }
    // Equal means the same JSON text once whitespace outside strings is removed (how the
    // server stores a value): `1` is not `1.0`, and numbers are compared digit by digit.
    let want: Option<Box<RawValue>> = equals.map(parse_value);
    let deadline = context
        .cli
        .timeout
        .filter(|t| !t.is_zero())
        .map(|t| Instant::now() + t);
    let mut watch = match take_watch(client, key, reconnect, "wait") {
        Ok(watch) => watch,
        // A server that accepts but does not answer within --timeout: the wait timed out
        // (exit 1), as it does when the key does not come.
        Err(Failure::Nkv(nkv::Error::Io(e)))
            if deadline.is_some()
                && matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
        {
            let secs = context.cli.timeout.unwrap_or_default().as_secs_f64();
            eprintln!("nkv-client: wait: no answer from the server within {secs} s (--timeout)");
            return Ok(Outcome::NotFound);
        }
        Err(e) => return Err(e),
    };
    let _following = follow(&watch, context);
    // Whether KEY existed (with another value) at some point: the timeout says so.
    let mut seen = false;
    loop {
        let (event, line) = match next_event(&mut watch, deadline) {
            Ok(next) => next,
            Err(End::TimedOut) => return Ok(timed_out(key, seen, context)),
            Err(End::Lost(_)) if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Ok(timed_out(key, seen, context))
            }
            Err(End::Shutdown) => {
                eprintln!("nkv-client: wait: the server stopped before {key} was there");
                return Ok(Outcome::Failed);
            }
            Err(end) => return Ok(ended(end, "wait")),
        };
        let (Event::Init {
            key: got, value, ..
        }
        | Event::Put {
            key: got, value, ..
        }) = event
        else {
            continue;
        };
        seen |= got == key;
        if got == key
            && want
                .as_ref()
                .is_none_or(|want| want.get() == nkv::json::compact(value.get()))
        {
            let mut out = io::stdout().lock();
            if context.cli.json {
                // An init or put always comes as the server's line.
                writeln!(out, "{}", line.unwrap_or_default())?;
            } else {
                writeln!(out, "{}", display(&value))?;
            }
            out.flush()?;
            return Ok(Outcome::Ok);
        }
    }
}

fn timed_out(key: &str, seen: bool, context: &Context) -> Outcome {
    let secs = context.cli.timeout.unwrap_or_default().as_secs_f64();
    if seen {
        eprintln!(
            "nkv-client: wait: {key} did not get the --equals value within {secs} s (--timeout)"
        );
    } else {
        eprintln!("nkv-client: wait: {key} did not appear within {secs} s (--timeout)");
    }
    Outcome::NotFound
}

/// Changes not yet handed to CMD: the latest event of each key, in the order keys changed.
#[derive(Default)]
struct Pending {
    order: VecDeque<String>,
    latest: HashMap<String, Event>,
    end: Option<End>,
}

pub fn watch(
    client: &mut Client,
    prefix: &str,
    no_init: bool,
    reconnect: bool,
    command: &[String],
    context: &Context,
) -> Result<Outcome, Failure> {
    let Some((program, args)) = command.split_first() else {
        return Err(Failure::Usage("watch: give the command after --".into()));
    };
    let mut watch = take_watch(client, prefix, reconnect, "watch")?;
    let _following = follow(&watch, context);
    let pending = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
    // The reader keeps reading while CMD runs, so the server never waits on us, and
    // coalesces: a key that changes again before its run replaces its pending event.
    let reader = {
        let pending = pending.clone();
        // --no-init skips the first snapshot only: after a reset, an `init` may be a change
        // made while the watch was away (the server can no longer tell which), so each runs.
        let mut started = false;
        std::thread::spawn(move || loop {
            let next = next_event(&mut watch, None);
            let (lock, ready) = &*pending;
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            match next {
                Ok((Event::Ready { .. }, _)) => {
                    started = true;
                    continue;
                }
                Ok((Event::Init { .. }, _)) if no_init && !started => continue,
                Ok((event, _)) => {
                    let Some(key) = event.key().cloned() else {
                        continue;
                    };
                    if state.latest.insert(key.clone(), event).is_none() {
                        state.order.push_back(key);
                    }
                }
                Err(end) => {
                    state.end = Some(end);
                    ready.notify_all();
                    return;
                }
            }
            ready.notify_all();
        })
    };
    let (lock, ready) = &*pending;
    let outcome = loop {
        let event = {
            let mut state = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(key) = state.order.pop_front() {
                    break state.latest.remove(&key);
                }
                if let Some(end) = state.end.take() {
                    drop(state);
                    let _ = reader.join();
                    return Ok(ended(end, "watch"));
                }
                state = ready.wait(state).unwrap_or_else(|e| e.into_inner());
            }
        };
        let Some(event) = event else { continue };
        match run_for(program, args, &event) {
            Ok(()) => {}
            // CMD does not exist or may not be run: no later change can run it either.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) =>
            {
                eprintln!("nkv-client: watch: cannot run {program}: {e}");
                break Outcome::Failed;
            }
            // Anything else is this run's failure: reported, and the watch goes on.
            Err(e) => eprintln!("nkv-client: watch: cannot run {program} for this change: {e}"),
        }
    };
    Ok(outcome)
}

/// The longest value passed in `NKV_VALUE`. Linux refuses to start a program with one
/// environment string over 128 KiB (`MAX_ARG_STRLEN`, counting `NKV_VALUE=` and the NUL),
/// which would end the watch; a longer value goes to a file named by `NKV_VALUE_FILE`.
const MAX_ENV_VALUE: usize = 128 * 1024 - 64;

/// A value too long for the environment, in a private temporary file removed after CMD's run.
struct ValueFile {
    path: std::path::PathBuf,
}

impl ValueFile {
    fn write(text: &str) -> io::Result<ValueFile> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "nkv-watch-{}-{}.json",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let file_guard = ValueFile { path };
        file.write_all(text.as_bytes())?;
        Ok(file_guard)
    }
}

impl Drop for ValueFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs CMD once for `event`; its failure is reported, not returned. Fails only when CMD
/// cannot be started at all (it never will be).
fn run_for(program: &str, args: &[String], event: &Event) -> io::Result<()> {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let (kind, key, value, rev) = match event {
        Event::Init { key, value, rev } => ("init", key, Some(value), rev),
        Event::Put { key, value, rev } => ("put", key, Some(value), rev),
        Event::Del { key, rev } => ("del", key, None, rev),
        Event::Ready { .. } | Event::Reset { .. } | Event::Shutdown => return Ok(()),
    };
    cmd.env("NKV_EVENT", kind)
        .env("NKV_KEY", key)
        .env("NKV_REV", rev.to_string());
    cmd.env_remove("NKV_VALUE").env_remove("NKV_VALUE_FILE");
    let mut file = None;
    match value {
        Some(value) if value.get().len() <= MAX_ENV_VALUE => {
            cmd.env("NKV_VALUE", value.get());
        }
        Some(value) => {
            let spill = ValueFile::write(value.get())?;
            cmd.env("NKV_VALUE_FILE", &spill.path);
            file = Some(spill);
        }
        None => {}
    }
    let status = cmd.status();
    drop(file);
    let status = status?;
    if !status.success() {
        eprintln!("nkv-client: watch: {program} failed for {kind} {key} (rev {rev}): {status}");
    }
    Ok(())
}
