//! The watch-property checker: reads a subscriber's stream on its own thread and checks, line
//! by line, what nkv promises every subscriber:
//!
//! - per-key revisions strictly increase (an `init` of a later `SUB` may restate the revision
//!   already seen, never go back);
//! - no duplicate event;
//! - each `SUB`'s snapshot is whole: its `ready` comes after exactly `count` `init` events;
//! - nothing after `{"event":"shutdown"}`;
//! - no gap while the subscriber keeps up: [`Watch::assert_no_gap`] against the writers'
//!   history when nothing was coalesced;
//! - converged: [`Watch::wait_converged`] waits until its view equals `GET prefix.*`.
//!
//! Resumed subscribers (`SUB target FROM rev`) are checked too: [`Watch::resume`] starts from the
//! view of the subscriber it resumes; the `put`/`del` events before `ready` count as its
//! snapshot (they may restate a revision already seen, never go back); a `reset` clears the
//! view, so keys the full snapshot does not restate are gone. [`Seen::resume_point`] is the
//! revision a client resumes from: the last `ready`'s, raised by every later event without
//! `skipped`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::Value;

use crate::support::{parse, wait_until, Raw, Server};

/// What the checker has seen on one subscriber connection.
#[derive(Debug, Default)]
pub struct Seen {
    /// Each covered key's current value as the subscriber knows it (`None` = deleted).
    pub view: BTreeMap<String, Option<Value>>,
    /// Each key's last revision.
    pub revs: HashMap<String, u64>,
    /// Every revision seen per key, in order (for the no-gap check).
    pub history: HashMap<String, Vec<u64>>,
    pub events: u64,
    pub replies: Vec<Value>,
    pub violations: Vec<String>,
    pub shutdown: bool,
    pub closed: bool,
    /// `init` events since the last acknowledgement (the snapshot being received).
    inits: u64,
    /// Between an acknowledgement and its `ready`: every event is part of the snapshot.
    in_snapshot: bool,
    /// Where a client would resume from (see the module doc).
    pub resume_point: u64,
    /// `reset` lines seen.
    pub resets: u64,
    /// Events carrying `skipped`, and the sum of their counts.
    pub skipped_events: u64,
    pub skipped_total: u64,
}

impl Seen {
    /// Checks one line and applies it to the view.
    pub fn feed(&mut self, line: &str) {
        if self.shutdown {
            self.violations.push(format!("line after shutdown: {line}"));
        }
        let v = parse(line);
        let Some(kind) = v["event"].as_str() else {
            if v == serde_json::json!({"ok": true}) {
                self.inits = 0;
                self.in_snapshot = true;
            }
            self.replies.push(v);
            return;
        };
        match kind {
            "init" | "put" | "del" => {
                let key = v["key"].as_str().unwrap_or_default().to_owned();
                let rev = v["rev"].as_u64().unwrap_or(0);
                let init = kind == "init" || self.in_snapshot;
                if init {
                    self.inits += 1;
                }
                match v["skipped"].as_u64() {
                    Some(n) => {
                        if n == 0 {
                            self.violations.push(format!("skipped 0: {line}"));
                        }
                        self.skipped_events += 1;
                        self.skipped_total += n;
                    }
                    None if !init => self.resume_point = self.resume_point.max(rev),
                    None => {}
                }
                if let Some(&prev) = self.revs.get(&key) {
                    if rev < prev || (rev == prev && !init) {
                        self.violations
                            .push(format!("{key}: {kind} rev {rev} after rev {prev}"));
                    }
                }
                if self.revs.get(&key) != Some(&rev) {
                    self.history.entry(key.clone()).or_default().push(rev);
                }
                self.revs.insert(key.clone(), rev);
                let value = (kind != "del").then(|| v["value"].clone());
                self.view.insert(key, value);
                self.events += 1;
            }
            "ready" => {
                let count = v["count"].as_u64().unwrap_or(u64::MAX);
                if count != self.inits {
                    self.violations.push(format!(
                        "ready {} after {} init events: {line}",
                        v["sub"], self.inits
                    ));
                }
                self.inits = 0;
                self.in_snapshot = false;
                match v["rev"].as_u64() {
                    Some(rev) => self.resume_point = rev,
                    None => self.violations.push(format!("ready without rev: {line}")),
                }
            }
            "reset" => {
                if !self.in_snapshot {
                    self.violations
                        .push(format!("reset outside a snapshot: {line}"));
                }
                self.resets += 1;
                self.view.clear();
            }
            "shutdown" => self.shutdown = true,
            other => self
                .violations
                .push(format!("unknown event {other}: {line}")),
        }
    }

    /// The keys that exist in the view, with their values.
    pub fn present(&self) -> BTreeMap<String, Value> {
        self.view
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect()
    }
}

/// A subscriber connection read and checked on its own thread.
pub struct Watch {
    pub seen: Arc<Mutex<Seen>>,
    stream: std::os::unix::net::UnixStream,
    reader: Option<JoinHandle<()>>,
}

impl Watch {
    /// Connects, sends `SUB target` for each target, and starts checking.
    pub fn start(server: &Server, targets: &[&str]) -> Watch {
        let raw = server.raw();
        Watch::on(raw, targets)
    }

    /// Starts checking `raw` after sending `SUB target` for each target.
    pub fn on(raw: Raw, targets: &[&str]) -> Watch {
        Watch::continuing(raw, targets, Seen::default())
    }

    /// Resumes the subscriber that saw `seen`: a new connection, `SUB target FROM <its resume
    /// point>`, checked as the continuation of that view.
    pub fn resume(server: &Server, target: &str, seen: Seen) -> Watch {
        let from = seen.resume_point;
        Watch::continuing(server.raw(), &[&format!("{target} FROM {from}")], seen)
    }

    fn continuing(mut raw: Raw, targets: &[&str], mut seen: Seen) -> Watch {
        for target in targets {
            raw.send(&format!("SUB {target}"));
        }
        let stream = raw.stream().try_clone().expect("clone");
        seen.replies.clear();
        seen.closed = false;
        seen.shutdown = false;
        let seen = Arc::new(Mutex::new(seen));
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                while let Ok(Some(line)) = raw.try_line() {
                    seen.lock().unwrap().feed(&line);
                }
                seen.lock().unwrap().closed = true;
            })
        };
        let watch = Watch {
            seen,
            stream,
            reader: Some(reader),
        };
        let n = targets.len();
        wait_until("the subscriptions to be acknowledged", || {
            watch.seen.lock().unwrap().replies.len() >= n
        });
        watch
    }

    /// Sends a request line on the subscriber connection.
    pub fn send(&self, line: &str) {
        use std::io::Write;
        (&self.stream)
            .write_all(format!("{line}\n").as_bytes())
            .expect("send");
    }

    /// Waits until the view equals `GET pattern` and the connection's revisions have stopped
    /// moving; panics with the difference after the deadline.
    pub fn wait_converged(&self, probe: &mut Raw, pattern: &str) {
        let end = std::time::Instant::now() + crate::support::DEADLINE;
        loop {
            let truth = probe.request(&format!("GET {pattern}"));
            let truth: BTreeMap<String, Value> = truth["values"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            let prefix = pattern.trim_end_matches('*');
            let (mut present, state) = {
                let seen = self.seen.lock().unwrap();
                let state = format!(
                    "{} events, {} replies, closed {}, {} violations {:?}",
                    seen.events,
                    seen.replies.len(),
                    seen.closed,
                    seen.violations.len(),
                    seen.violations.first()
                );
                (seen.present(), state)
            };
            present.retain(|k, _| k.starts_with(prefix));
            if present == truth {
                return;
            }
            let stale: Vec<&String> = truth
                .iter()
                .filter(|(k, v)| present.get(*k) != Some(v))
                .map(|(k, _)| k)
                .collect();
            let last = format!(
                "{} of {} keys stale (e.g. {:?}); {} keys in the view; {state}",
                stale.len(),
                truth.len(),
                stale.iter().take(3).collect::<Vec<_>>(),
                present.len()
            );
            assert!(
                std::time::Instant::now() < end,
                "subscriber did not converge to GET {pattern}: {last}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// No violation so far.
    pub fn assert_ok(&self, who: &str) {
        let seen = self.seen.lock().unwrap();
        assert!(
            seen.violations.is_empty(),
            "{who}: {} violations, first: {:?}",
            seen.violations.len(),
            &seen.violations[..seen.violations.len().min(5)]
        );
    }

    /// With nothing coalesced, the subscriber saw every revision `written` lists for its keys
    /// (those after its snapshot).
    pub fn assert_no_gap(&self, who: &str, written: &HashMap<String, Vec<u64>>) {
        let seen = self.seen.lock().unwrap();
        for (key, revs) in written {
            let Some(got) = seen.history.get(key) else {
                continue;
            };
            let first = got[0];
            let expected: Vec<u64> = revs.iter().copied().filter(|r| *r >= first).collect();
            assert_eq!(
                got, &expected,
                "{who}: gap in {key} while nothing was coalesced"
            );
        }
    }

    /// Closes the connection from the client's side (a client that dies or loses its socket)
    /// and returns what it saw, to [`resume`](Watch::resume) from.
    pub fn disconnect(mut self) -> Seen {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            reader.join().expect("reader thread");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    /// Waits until the server closed the connection; returns what was seen.
    pub fn wait_closed(mut self) -> Arc<Mutex<Seen>> {
        if let Some(reader) = self.reader.take() {
            reader.join().expect("reader thread");
        }
        self.seen.clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}
