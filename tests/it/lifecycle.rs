//! The server's life: clean stops on SIGTERM/SIGINT, SIGHUP survived, one server per socket
//! and per data directory, stale sockets replaced, and writes that survive SIGKILL at any moment.

use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::support::{wait_until, BoundedOutput, Raw, Server, SERVER};

/// How long a second server may take to refuse to start before the test calls it a hang.
const REFUSAL: Duration = Duration::from_secs(10);

fn is_socket(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// SIGTERM and SIGINT: new connections are not served, the request already sent is answered,
/// subscribers are told, the socket file goes, and the process exits 0 within a second.
fn stops_cleanly_on(signal: Signal) {
    let mut server = Server::start();
    let mut sub = server.raw();
    sub.subscribe("s");
    let mut idle = server.raw();
    assert!(idle.healthy());
    // A burst of requests, all in the server's queue when the signal arrives.
    const IN_FLIGHT: usize = 100;
    let mut busy = server.raw();
    // Accepted before the signal: a connection still in the listen backlog is not in flight.
    assert!(busy.healthy());
    let burst: String = (0..IN_FLIGHT)
        .map(|i| format!("PUT r.k{} {i}\n", i % 10))
        .collect();
    busy.send_bytes(burst.as_bytes());

    server.signal(signal as i32);
    let signalled = Instant::now();
    let pid = server.pid();
    wait_until("the server to start shutting down", || {
        server.log_text().contains("shutting down")
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err()
    });
    // No longer accepting: a new client is refused, or never answered.
    if let Ok(mut late) = Raw::try_connect(&server.socket) {
        assert_eq!(
            late.try_request("HEALTH").ok(),
            None,
            "a connection made during shutdown was served"
        );
    }
    let budget = Duration::from_secs(1).saturating_sub(signalled.elapsed());
    let status = server.wait_exit(budget);
    assert!(
        status.success(),
        "exit status {status} after {signal}; log:\n{}",
        server.log_text()
    );
    assert!(
        !server.socket.exists(),
        "socket file left behind after {signal}"
    );

    // Everything the server had received was answered, in order, then the connection closed.
    let mut revs = Vec::new();
    while let Some(line) = busy.line() {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["ok"], true, "{v}");
        revs.push(v["rev"].as_u64().expect("rev"));
    }
    assert_eq!(
        revs,
        (1..=IN_FLIGHT as u64).collect::<Vec<_>>(),
        "in-flight requests answered"
    );
    assert_eq!(sub.line().as_deref(), Some(r#"{"event":"shutdown"}"#));
    assert_eq!(sub.line(), None, "closed after the shutdown event");
    assert_eq!(idle.line(), None, "an idle client is closed without a word");

    // The data made it: a new server on the same directory has every write.
    server.spawn_and_wait();
    let mut conn = server.raw();
    assert_eq!(
        conn.request("KEYS r.*")["keys"].as_array().unwrap().len(),
        10
    );
    assert_eq!(conn.request("STATS")["rev"], IN_FLIGHT);
}

#[test]
fn sigterm_stops_the_server_cleanly() {
    stops_cleanly_on(Signal::SIGTERM);
}

#[test]
fn sigint_stops_the_server_cleanly() {
    stops_cleanly_on(Signal::SIGINT);
}

/// Clients that stop reading cannot hold the server up: a subscriber with a full socket and a
/// request-mode client stuck behind its unread responses are cut off after the drain grace.
#[test]
fn sigterm_stops_the_server_despite_clients_that_do_not_read() {
    let mut server = Server::start();
    let mut stalled_sub = server.raw();
    stalled_sub.subscribe("*");
    let mut writer = server.raw();
    let big = json!("x".repeat(100_000));
    for i in 0..50 {
        assert_eq!(writer.request(&format!("PUT k{i} {big}"))["ok"], true);
    }
    let flood = UnixStream::connect(&server.socket).unwrap();
    flood.set_nonblocking(true).unwrap();
    let requests = b"GET k1\n".repeat(100);
    loop {
        match (&flood).write(&requests) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("flood: {e}"),
        }
    }

    server.signal(Signal::SIGTERM as i32);
    let signalled = Instant::now();
    // Request connections get 300 ms; a subscriber whose socket accepts nothing is dropped
    // after 1 s of that (ARCHITECTURE.md, "Shutdown").
    let status = server.wait_exit(Duration::from_secs(4));
    assert!(status.success(), "exit status {status}");
    assert!(!server.socket.exists());
    assert!(signalled.elapsed() < Duration::from_secs(3));
    drop(stalled_sub);
}

#[test]
fn sighup_is_logged_and_the_server_keeps_serving() {
    let mut server = Server::start();
    let mut sub = server.raw();
    sub.subscribe("h");
    let mut conn = server.raw();
    assert_eq!(conn.request("PUT h.a 1")["rev"], 1);
    assert_eq!(sub.json()["rev"], 1);

    server.signal(Signal::SIGHUP as i32);
    wait_until("SIGHUP to be logged", || {
        server.log_text().contains("SIGHUP")
    });
    assert!(conn.healthy());
    assert_eq!(conn.request("PUT h.a 2")["rev"], 2);
    // The subscriber sees the next change, not a shutdown.
    let event = sub.json();
    assert_eq!(
        (&event["event"], &event["value"]),
        (&json!("put"), &json!(2))
    );
    let mut fresh = server.raw();
    assert_eq!(fresh.request("GET h.a")["value"], 2);
    assert!(is_socket(&server.socket));
    assert!(server.stop().success());
}

/// Runs a server command that is expected to refuse to start; returns its status and stderr.
fn run_refused(mut cmd: Command, stderr: &Path) -> (ExitStatus, String) {
    let file = fs::File::create(stderr).expect("stderr file");
    let mut child = cmd.stderr(file).spawn().expect("spawn nkv-server");
    let end = Instant::now() + REFUSAL;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the second server did not refuse to start; stderr:\n{}",
                fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    (status, fs::read_to_string(stderr).unwrap_or_default())
}

#[test]
fn a_second_server_on_the_same_socket_refuses_and_leaves_the_first_alone() {
    let first = Server::start();
    let mut conn = first.raw();
    assert_eq!(conn.request("PUT k 1")["rev"], 1);
    let inode = fs::metadata(&first.socket).unwrap().ino();

    let tmp = tempfile::tempdir().unwrap();
    let mut second = Server::new_in(tmp.path(), &[]);
    second.socket = first.socket.clone();
    let (status, stderr) = run_refused(second.command(), &tmp.path().join("stderr"));
    assert!(!status.success(), "second server exited with {status}");
    assert!(
        stderr.contains(&first.socket.display().to_string()),
        "the refusal names the socket: {stderr:?}"
    );
    assert!(stderr.contains("already"), "a clear reason: {stderr:?}");

    assert_eq!(
        fs::metadata(&first.socket).unwrap().ino(),
        inode,
        "the socket file was replaced"
    );
    assert!(conn.healthy(), "the first server's clients are unaffected");
    let mut fresh = first.raw();
    assert_eq!(fresh.request("GET k")["value"], 1);
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses() {
    let mut first = Server::start();
    let mut conn = first.raw();
    assert_eq!(conn.request("PUT k 1")["rev"], 1);

    let tmp = tempfile::tempdir().unwrap();
    let mut second = Server::new_in(tmp.path(), &[]);
    second.data = first.data.clone();
    let (status, stderr) = run_refused(second.command(), &tmp.path().join("stderr"));
    assert!(!status.success(), "second server exited with {status}");
    assert!(
        stderr.contains(&first.data.display().to_string()),
        "the refusal names the data dir: {stderr:?}"
    );
    assert!(
        !second.socket.exists(),
        "a refused server left a socket file"
    );
    assert!(conn.healthy());
    assert_eq!(conn.request("PUT k 2")["rev"], 2);

    // Once the first is gone, the directory is free.
    assert!(first.stop().success());
    second.spawn_and_wait();
    assert_eq!(second.raw().request("GET k")["value"], 2);
}

#[test]
fn a_stale_socket_left_by_sigkill_is_replaced() {
    let mut server = Server::start();
    assert_eq!(server.raw().request("PUT k 1")["rev"], 1);
    server.kill();
    assert!(is_socket(&server.socket), "SIGKILL leaves the socket file");
    let err = UnixStream::connect(&server.socket).expect_err("nobody listens");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    server.spawn_and_wait();
    let mut conn = server.raw();
    assert!(conn.healthy());
    assert_eq!(conn.request("GET k")["value"], 1);
}

/// A small deterministic PRNG (splitmix64), so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What a key holds, as far as a writer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Absent,
    Put { n: u64 },
}

/// One writer's view: the acknowledged state of each of its keys, and the one request it may
/// have had in flight when the server died.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<String, (State, u64)>,
    pending: Option<(String, State)>,
    /// The highest revision acknowledged to this writer.
    max_rev: u64,
}

const WRITERS: usize = 2;
/// The pending "key" of a pattern delete in flight: it may have removed any of the writer's keys.
const ALL_OF_WRITER: &str = "*";
const KEYS_PER_WRITER: usize = 8;

fn key_of(writer: usize, i: usize) -> String {
    format!("w{writer}.k{i}")
}

/// Streams puts (and some deletes) on this writer's keys until the server dies, recording each
/// acknowledgement in `ledger`.
fn write_until_killed(
    socket: &Path,
    writer: usize,
    seed: u64,
    counter: &AtomicU64,
    ledger: &Mutex<Ledger>,
    acked_this_round: &AtomicU64,
) {
    let mut rng = Rng(seed);
    let Ok(mut conn) = Raw::try_connect(socket) else {
        return;
    };
    loop {
        let key = key_of(writer, rng.below(KEYS_PER_WRITER as u64) as usize);
        let present = matches!(
            ledger.lock().unwrap().acked.get(&key),
            Some((State::Put { .. }, _))
        );
        let roll = rng.below(40);
        if present && roll == 0 {
            // A pattern delete: each key is its own change, so a kill may leave any subset
            // of this writer's keys deleted.
            ledger.lock().unwrap().pending = Some((ALL_OF_WRITER.to_owned(), State::Absent));
            let Ok(response) = conn.try_request(format!("DEL w{writer}.*")) else {
                return;
            };
            assert_eq!(response["ok"], true, "DEL w{writer}.*: {response}");
            assert!(response["deleted"].as_u64().unwrap() >= 1, "{response}");
            let mut ledger = ledger.lock().unwrap();
            for i in 0..KEYS_PER_WRITER {
                ledger.acked.insert(key_of(writer, i), (State::Absent, 0));
            }
            ledger.pending = None;
            drop(ledger);
            acked_this_round.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let (line, state) = if present && roll < 4 {
            (format!("DEL {key}"), State::Absent)
        } else {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let pad = "p".repeat(rng.below(300) as usize);
            let value = json!({"w": writer, "n": n, "pad": pad});
            (format!("PUT {key} {value}"), State::Put { n })
        };
        ledger.lock().unwrap().pending = Some((key.clone(), state));
        let Ok(response) = conn.try_request(&line) else {
            return;
        };
        assert_eq!(response["ok"], true, "{line}: {response}");
        let rev = response["rev"].as_u64().expect("rev");
        let mut ledger = ledger.lock().unwrap();
        assert!(
            rev > ledger.max_rev,
            "revision went backwards: {rev} after {}",
            ledger.max_rev
        );
        ledger.max_rev = rev;
        ledger.acked.insert(key, (state, rev));
        ledger.pending = None;
        drop(ledger);
        acked_this_round.fetch_add(1, Ordering::SeqCst);
    }
}

/// Checks the files a SIGKILL left: every key file parses and names one of our keys.
/// Returns the number of temporary files found.
fn check_files_after_kill(data: &Path) -> usize {
    let mut tmp_files = 0;
    for entry in fs::read_dir(data).expect("data dir") {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let path = data.join(&name);
        if name.starts_with(".tmp-") {
            tmp_files += 1;
        } else if name == ".rev" {
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.trim().parse::<u64>().is_ok(), "torn .rev: {text:?}");
        } else if ![".reserve", ".tombstone-log", ".epoch"].contains(&name.as_str()) {
            let key = name
                .strip_suffix(".json")
                .unwrap_or_else(|| panic!("stray {name}"));
            assert!(key.starts_with('w'), "unexpected key file {name}");
            let text = fs::read_to_string(&path).unwrap();
            let record: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("torn key file {name} ({e}): {text:?}"));
            assert!(record["rev"].is_u64(), "{name}: {text}");
            assert!(record["value"]["n"].is_u64(), "{name}: {text}");
        }
    }
    tmp_files
}

/// After a restart: every key holds its acknowledged state, or the state of the one request
/// that was in flight. Reconciles the ledger with what was found.
fn check_and_reconcile(conn: &mut Raw, writer: usize, ledger: &mut Ledger) -> bool {
    let mut pending_applied = false;
    for i in 0..KEYS_PER_WRITER {
        let key = key_of(writer, i);
        let got = conn.request(&format!("GET {key}"));
        let (found, rev) = if got["ok"] == true {
            assert_eq!(got["value"]["w"], writer, "{key}: {got}");
            let n = got["value"]["n"].as_u64().expect("n");
            (State::Put { n }, got["rev"].as_u64().expect("rev"))
        } else {
            assert_eq!(got["error"], "not_found", "{key}: {got}");
            (State::Absent, 0)
        };
        let (acked, acked_rev) = ledger
            .acked
            .get(&key)
            .copied()
            .unwrap_or((State::Absent, 0));
        let pending = ledger
            .pending
            .as_ref()
            .filter(|(k, _)| *k == key || k == ALL_OF_WRITER)
            .map(|(_, s)| *s);
        if found == acked && (found == State::Absent || rev == acked_rev) {
            continue;
        }
        assert_eq!(
            Some(found),
            pending,
            "{key}: acknowledged {acked:?} (rev {acked_rev}), in flight {pending:?}, found {found:?} (rev {rev})"
        );
        assert!(rev == 0 || rev > ledger.max_rev, "{key}: rev {rev}");
        pending_applied = true;
        ledger.acked.insert(key, (found, rev));
    }
    ledger.pending = None;
    pending_applied
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_moments() {
    kill_loop(&[], 100);
}

#[test]
fn acknowledged_writes_survive_sigkill_with_fsync() {
    kill_loop(&["--fsync"], 30);
}

/// Kills the server `kills` times at random moments under writers that put, delete and
/// pattern-delete; after each restart every acknowledged change is there.
fn kill_loop(flags: &[&str], kills: usize) {
    let seed: u64 = std::env::var("NKV_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e6b_7621);
    let mut rng = Rng(seed);
    let mut server = Server::start_with(flags);
    let counter = AtomicU64::new(1);
    let ledgers: Vec<Mutex<Ledger>> = (0..WRITERS).map(|_| Mutex::default()).collect();
    let (mut acked_total, mut tmp_seen, mut applied_in_flight) = (0u64, 0usize, 0usize);
    let started = Instant::now();

    for round in 0..kills {
        // Between 0 and 400 acknowledged writes, then SIGKILL wherever the writers are.
        let target = rng.below(401);
        let acked_this_round = AtomicU64::new(0);
        let socket = server.socket.clone();
        thread::scope(|scope| {
            let writers: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let (socket, ledger) = (&socket, &ledgers[w]);
                    let (counter, acked) = (&counter, &acked_this_round);
                    let seed = rng.next();
                    scope.spawn(move || write_until_killed(socket, w, seed, counter, ledger, acked))
                })
                .collect();
            wait_until("the writers to reach the kill point", || {
                assert!(
                    !writers.iter().any(|w| w.is_finished()),
                    "a writer stopped before the kill in round {round}"
                );
                acked_this_round.load(Ordering::SeqCst) >= target
            });
            server.kill();
        });
        acked_total += acked_this_round.load(Ordering::SeqCst);
        tmp_seen += check_files_after_kill(&server.data);

        server.spawn_and_wait();
        let leftovers: Vec<_> = fs::read_dir(&server.data)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files survived the start: {leftovers:?}"
        );
        let mut conn = server.raw();
        let stats_rev = conn.request("STATS")["rev"].as_u64().unwrap();
        for (w, ledger) in ledgers.iter().enumerate() {
            let mut ledger = ledger.lock().unwrap();
            if check_and_reconcile(&mut conn, w, &mut ledger) {
                applied_in_flight += 1;
            }
            assert!(
                stats_rev >= ledger.max_rev,
                "round {round}: the server's revision {stats_rev} is behind acknowledged {}",
                ledger.max_rev
            );
            ledger.max_rev = stats_rev;
        }
    }
    eprintln!(
        "kill test {flags:?} (seed {seed}): {kills} SIGKILLs, {acked_total} acknowledged writes, \
         {} keys checked after every restart, {tmp_seen} temp files found after kills \
         (all removed at start), {applied_in_flight} unacknowledged in-flight writes found \
         applied, {:.1?}",
        WRITERS * KEYS_PER_WRITER,
        started.elapsed()
    );
    assert!(acked_total > 0);
}

/// Median wall time of `n` sequential puts on one connection.
fn median_put(socket: &Path, n: usize) -> Duration {
    let mut conn = Raw::connect(socket);
    let mut times: Vec<Duration> = (0..n)
        .map(|i| {
            let started = Instant::now();
            let v = conn.request(&format!("PUT f.k{} {{\"i\":{i}}}", i % 50));
            assert_eq!(v["ok"], true, "{v}");
            started.elapsed()
        })
        .collect();
    times.sort();
    times[n / 2]
}

#[test]
fn fsync_mode_acknowledges_writes_that_survive_sigkill() {
    const PUTS: usize = 300;
    let mut plain = Server::start();
    let without = median_put(&plain.socket, PUTS);
    plain.stop();

    let mut server = Server::start_with(&["--fsync"]);
    let with = median_put(&server.socket, PUTS);
    server.kill();
    server.spawn_and_wait();
    let mut conn = server.raw();
    let keys = conn.request("KEYS f.*");
    assert_eq!(keys["keys"].as_array().unwrap().len(), 50, "{keys}");
    for k in 0..50 {
        // The last put to f.k<k> was i = 250 + k.
        let got = conn.request(&format!("GET f.k{k}"));
        assert_eq!(got["value"], json!({"i": 250 + k}), "{got}");
    }
    assert_eq!(conn.request("STATS")["rev"], PUTS);
    eprintln!(
        "put cost, median of {PUTS} sequential puts: {without:?} without --fsync, {with:?} with --fsync"
    );
}

/// The pid of the server answering on `socket`, from the socket's peer credentials.
fn server_pid(socket: &Path) -> i32 {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let stream = UnixStream::connect(socket).expect("connect");
    getsockopt(&stream, PeerCredentials)
        .expect("peer credentials")
        .pid()
}

/// Counts the fsync-family calls a server makes for `puts` puts, traced by strace.
fn traced_syncs(dir: &Path, flags: &[&str], puts: usize) -> usize {
    let server = Server::new_in(dir, flags);
    let trace = dir.join("strace.out");
    let cmd = server.command();
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(SERVER)
        .args(cmd.get_args())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace");
    wait_until("the traced server to listen", || {
        UnixStream::connect(&server.socket).is_ok()
    });
    let mut conn = server.raw();
    let before = fs::read_to_string(&trace)
        .unwrap_or_default()
        .lines()
        .count();
    for i in 0..puts {
        assert_eq!(conn.request(&format!("PUT t.k{i} {i}"))["ok"], true);
    }
    let pid = server_pid(&server.socket);
    drop(conn);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM");
    let status = strace.wait().expect("strace exit");
    assert!(status.success(), "traced server: {status}");
    let after = fs::read_to_string(&trace).expect("strace output");
    let syncs: Vec<&str> = after
        .lines()
        .skip(before)
        .filter(|l| l.contains("sync("))
        .collect();
    syncs.len()
}

#[test]
fn fsync_mode_really_syncs_each_write() {
    assert!(
        Command::new("strace").arg("-V").bounded_output().is_ok(),
        "strace is needed (apt-get install strace)"
    );
    const PUTS: usize = 20;
    let tmp = tempfile::tempdir().unwrap();
    let (plain, synced) = (tmp.path().join("plain"), tmp.path().join("synced"));
    fs::create_dir(&plain).unwrap();
    fs::create_dir(&synced).unwrap();
    assert_eq!(traced_syncs(&plain, &[], PUTS), 0, "syncs without --fsync");
    let n = traced_syncs(&synced, &["--fsync"], PUTS);
    // The file's data, then the directory entry, for every put.
    assert!(n >= 2 * PUTS, "{n} sync calls for {PUTS} puts with --fsync");
}
