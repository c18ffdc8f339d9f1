//! A soak test: 200 connections at once — writers mixing puts, deletes, gets and wildcard gets,
//! and raw `SUB` subscribers, some joining while the writers run — for a fixed time (3 s, or
//! `NKV_SOAK_SECS`). Then: no error responses, no lost writes, every subscriber converged, the
//! server's memory flat after warm-up and its threads back to the baseline once clients leave.

use std::collections::{BTreeMap, HashMap};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{proc_status, rss_kib, wait_until, Raw, Server, DEADLINE};

const CONNECTIONS: usize = 200;
/// Of the connections, how many subscribe; half before the writers start, half while they run.
const SUBSCRIBERS: usize = 40;
const WRITERS: usize = CONNECTIONS - SUBSCRIBERS;
/// Writer `w` writes below `soak.g<w % GROUPS>`; subscriber `s` subscribes to `soak.g<s % GROUPS>`
/// (so `soak.g1` must not see `soak.g10`).
const GROUPS: usize = 20;
const KEYS_PER_WRITER: usize = 4;
/// How much the server's RSS may grow between the end of warm-up and the end of the run.
const RSS_MARGIN_KIB: u64 = 16 * 1024;

/// Error responses, protocol violations and broken connections, from every thread.
type Failures = Arc<Mutex<Vec<String>>>;

fn fail(failures: &Failures, message: String) {
    failures.lock().expect("failures lock").push(message);
}

fn soak_time() -> Duration {
    let secs = std::env::var("NKV_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Threads that serve clients (and the server's own), not the fan-out threads a large fan-out
/// starts once for the server's life.
fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads") - crate::support::fanout_threads(pid)
}

/// Sends a request on `conn`; returns its response, which must be a success. Problems are
/// reported, not panicked on, so a writer or subscriber thread can record them and stop.
fn request_ok(conn: &mut Raw, line: &str) -> Result<Value, String> {
    let response = conn
        .try_request(line)
        .map_err(|e| format!("{line:?}: {e}"))?;
    if response["ok"] != true {
        return Err(format!("{line:?} -> {response}"));
    }
    Ok(response)
}

/// What a writer last had acknowledged for each of its keys (`None` = deleted).
type Written = BTreeMap<String, Option<Value>>;

struct Writer {
    id: usize,
    conn: Raw,
    written: Written,
    rng: u64,
    ops: u64,
}

impl Writer {
    fn key(&self, k: usize) -> String {
        format!("soak.g{}.w{}.k{k}", self.id % GROUPS, self.id)
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64: deterministic per writer, no dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// One random operation, checked against what this writer alone has written.
    fn step(&mut self) -> Result<(), String> {
        self.ops += 1;
        let roll = self.next_random() % 100;
        let k = self.next_random() as usize % KEYS_PER_WRITER;
        let key = self.key(k);
        let current = self.written.get(&key).cloned().flatten();
        match (roll, current) {
            (0..=4, _) => self.check_wildcard(),
            (5..=14, Some(_)) => {
                let response = self.request(&format!("DEL {key}"))?;
                expect_rev(&response)?;
                self.written.insert(key, None);
                Ok(())
            }
            (15..=39, Some(value)) => {
                let response = self.request(&format!("GET {key}"))?;
                if response["value"] != value || response["key"] != key.as_str() {
                    return Err(format!("GET {key}: {response}, last written {value}"));
                }
                expect_rev(&response)
            }
            _ => {
                let pad = "x".repeat(self.next_random() as usize % 200);
                let value = json!({"w": self.id, "i": self.ops, "pad": pad});
                let response = self.request(&format!("PUT {key} {value}"))?;
                expect_rev(&response)?;
                self.written.insert(key, Some(value));
                Ok(())
            }
        }
    }

    /// `GET soak.*` shows this writer's keys exactly as it last wrote them.
    fn check_wildcard(&mut self) -> Result<(), String> {
        let response = self.request("GET soak.*")?;
        let values = response["values"]
            .as_object()
            .ok_or_else(|| format!("GET soak.*: no values in {response}"))?;
        for (key, written) in &self.written {
            if values.get(key) != written.as_ref() {
                return Err(format!(
                    "GET soak.*: {key} is {:?}, last written {written:?}",
                    values.get(key)
                ));
            }
        }
        Ok(())
    }

    fn request(&mut self, line: &str) -> Result<Value, String> {
        request_ok(&mut self.conn, line)
    }
}

fn expect_rev(response: &Value) -> Result<(), String> {
    match response["rev"].as_u64() {
        Some(rev) if rev > 0 => Ok(()),
        _ => Err(format!("no revision in {response}")),
    }
}

/// What one subscriber has been told: key → (revision, value or `None` if deleted).
type View = Arc<Mutex<HashMap<String, (u64, Option<Value>)>>>;

/// Subscribes to `soak.g<group>`, reports readiness, then applies events to `view` until the
/// connection is shut down.
fn subscribe(
    conn: &mut Raw,
    group: usize,
    view: &View,
    ready: &mpsc::Sender<()>,
) -> Result<(), String> {
    let root = format!("soak.g{group}");
    let below = format!("{root}.");
    request_ok(conn, &format!("SUB {root}"))?;
    let mut inits = 0u64;
    while let Some(line) = conn.try_line()? {
        let line: Value =
            serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
        let event = line["event"].as_str().unwrap_or_default();
        if event == "ready" {
            if line["sub"] != root.as_str() || line["count"] != inits {
                return Err(format!("SUB {root}: {line} after {inits} init events"));
            }
            let _ = ready.send(());
            continue;
        }
        let (Some(key), Some(rev)) = (line["key"].as_str(), line["rev"].as_u64()) else {
            return Err(format!("SUB {root}: unexpected line {line}"));
        };
        if !key.starts_with(&below) {
            return Err(format!("SUB {root}: event for uncovered key {line}"));
        }
        let value = match event {
            "init" => {
                inits += 1;
                Some(line["value"].clone())
            }
            "put" => Some(line["value"].clone()),
            "del" => None,
            _ => return Err(format!("SUB {root}: unexpected line {line}")),
        };
        let mut view = view.lock().expect("view lock");
        if let Some((seen, _)) = view.get(key) {
            if rev <= *seen {
                return Err(format!(
                    "SUB {root}: rev {rev} of {key} after rev {seen}: {line}"
                ));
            }
        }
        view.insert(key.to_owned(), (rev, value));
    }
    Ok(())
}

/// The existing keys of a view.
fn present(view: &View) -> BTreeMap<String, Value> {
    view.lock()
        .expect("view lock")
        .iter()
        .filter_map(|(k, (_, v))| Some((k.clone(), v.clone()?)))
        .collect()
}

fn stats(conn: &mut Raw) -> Value {
    request_ok(conn, "STATS").expect("STATS")
}

#[test]
fn soak_mixed_clients_keep_state_memory_and_threads() {
    let server = Server::start();
    let pid = server.pid();
    let socket = server.socket.clone();
    let run_for = soak_time();
    let warm_up = (run_for / 3).clamp(Duration::from_millis(500), Duration::from_secs(5));

    // Baseline: only our monitor connection open (the harness's start-up probe has gone).
    let mut monitor = Raw::connect(&socket);
    wait_until("the start-up probe connection to close", || {
        stats(&mut monitor)["connections"] == 1
    });
    // The accepting thread serves a connection's first request itself and hands accepting
    // to another thread at its second: after two requests the monitor has a thread of its
    // own beside the accepting one, as at the end (the baseline was one thread short when the
    // probe had already gone at the first look).
    stats(&mut monitor);
    stats(&mut monitor);
    let (threads_before, rss_before) = (threads(pid), rss_kib(pid));
    eprintln!(
        "soak: {run_for:?} (warm-up {warm_up:?}), {WRITERS} writers, {SUBSCRIBERS} subscribers"
    );
    eprintln!("soak: before:        rss {rss_before} KiB, threads {threads_before}");

    let failures: Failures = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();

    // Subscribers: each keeps a handle to its socket so the test can end it.
    let mut subscribers = Vec::new();
    let spawn_subscriber = |s: usize, subscribers: &mut Vec<_>| {
        let mut conn = Raw::connect(&socket);
        let handle = conn.stream().try_clone().expect("clone");
        let view = View::default();
        let (view2, failures, ready) = (view.clone(), failures.clone(), ready_tx.clone());
        let thread = thread::spawn(move || {
            if let Err(e) = subscribe(&mut conn, s % GROUPS, &view2, &ready) {
                fail(&failures, format!("subscriber {s}: {e}"));
            }
        });
        subscribers.push((s % GROUPS, view, handle, thread));
    };
    for s in 0..SUBSCRIBERS / 2 {
        spawn_subscriber(s, &mut subscribers);
    }
    for _ in 0..SUBSCRIBERS / 2 {
        ready_rx
            .recv_timeout(DEADLINE)
            .expect("early subscriber ready");
    }

    let start = Arc::new(Barrier::new(WRITERS + 1));
    let writers: Vec<_> = (0..WRITERS)
        .map(|id| {
            let conn = Raw::connect(&socket);
            let (start, stop, failures) = (start.clone(), stop.clone(), failures.clone());
            thread::spawn(move || {
                let mut writer = Writer {
                    id,
                    conn,
                    written: Written::new(),
                    rng: 0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1),
                    ops: 0,
                };
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = writer.step() {
                        fail(&failures, format!("writer {id}: {e}"));
                        break;
                    }
                }
                writer
            })
        })
        .collect();
    start.wait();
    let started = Instant::now();

    // The other half subscribes while the writers run.
    for s in SUBSCRIBERS / 2..SUBSCRIBERS {
        spawn_subscriber(s, &mut subscribers);
    }
    for _ in SUBSCRIBERS / 2..SUBSCRIBERS {
        ready_rx
            .recv_timeout(DEADLINE)
            .expect("late subscriber ready");
    }
    // A soak runs for a fixed time: sleeping is the point here.
    thread::sleep(warm_up.saturating_sub(started.elapsed()));
    let (threads_warm, rss_warm) = (threads(pid), rss_kib(pid));
    eprintln!("soak: after warm-up: rss {rss_warm} KiB, threads {threads_warm}");
    thread::sleep(run_for.saturating_sub(started.elapsed()));
    stop.store(true, Ordering::Relaxed);

    let writers: Vec<Writer> = writers
        .into_iter()
        .map(|t| t.join().expect("writer thread"))
        .collect();
    let ops: u64 = writers.iter().map(|w| w.ops).sum();
    eprintln!(
        "soak: {ops} writer requests in {:?} ({:.0}/s)",
        started.elapsed(),
        ops as f64 / started.elapsed().as_secs_f64()
    );

    // No lost writes: the final state is every writer's last acknowledged value.
    let expected: BTreeMap<String, Value> = writers
        .iter()
        .flat_map(|w| &w.written)
        .filter_map(|(k, v)| Some((k.clone(), v.clone()?)))
        .collect();
    let mut checker = Raw::connect(&socket);
    let all = request_ok(&mut checker, "GET soak.*").expect("GET soak.*");
    let stored: BTreeMap<String, Value> = all["values"]
        .as_object()
        .expect("values")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        stored, expected,
        "GET soak.* differs from the acknowledged writes"
    );
    for (key, value) in &expected {
        let got = request_ok(&mut checker, &format!("GET {key}")).expect("GET");
        assert_eq!(&got["value"], value, "GET {key}");
    }

    // Every subscriber converges to the final state of its keys.
    let deadline = Instant::now() + DEADLINE;
    for (group, view, _, _) in &subscribers {
        let prefix = format!("soak.g{group}.");
        let want: BTreeMap<String, Value> = expected
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        loop {
            let have = present(view);
            if have == want {
                break;
            }
            assert!(
                Instant::now() < deadline && failures.lock().expect("lock").is_empty(),
                "subscriber of soak.g{group} did not converge: has {} keys, want {}; failures {:#?}",
                have.len(),
                want.len(),
                failures.lock().expect("lock")
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
    let (threads_end, rss_end) = (threads(pid), rss_kib(pid));
    let counters = stats(&mut monitor);
    eprintln!("soak: at end:        rss {rss_end} KiB, threads {threads_end}; {counters}");

    // Everyone leaves; connection and writer threads exit asynchronously.
    drop(writers);
    drop(checker);
    for (_, _, handle, thread) in subscribers {
        let _ = handle.shutdown(Shutdown::Both);
        thread.join().expect("subscriber thread");
    }
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (now, count) = (threads(pid), stats(&mut monitor));
        if now <= threads_before && count["connections"] == 1 && count["subscribers"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server threads stay at {now} (baseline {threads_before}) after clients left; {count}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let (threads_after, rss_after) = (threads(pid), rss_kib(pid));
    eprintln!("soak: clients gone:  rss {rss_after} KiB, threads {threads_after}");

    let failures = failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} failures, first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        rss_end <= rss_warm + RSS_MARGIN_KIB,
        "server RSS grew from {rss_warm} KiB after warm-up to {rss_end} KiB"
    );
}
