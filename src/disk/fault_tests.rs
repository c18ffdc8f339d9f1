//! Fault injection against a real server run in-process: every file-system operation of the
//! disk layer fails in turn (ENOSPC, EIO, EACCES, ENOENT) in the middle of a workload of puts,
//! overwrites, deletes and pattern deletes. After each: memory == disk == what a subscriber
//! saw, every acknowledged change survives a restart, and revisions never go backwards.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value as Json;

use super::fault::{plan_for, Fault, Op};
use crate::server::{Config, Limits, Server};
use crate::{Client, Event};

/// Each key's value (its JSON text, shortened: values of 100 KiB make unreadable failures)
/// and revision.
type State = BTreeMap<String, (String, u64)>;

fn short(value: &Json) -> String {
    let text = value.to_string();
    if text.len() <= 40 {
        return text;
    }
    let sum = text
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    format!("{}… ({} bytes, sum {sum:x})", &text[..20], text.len())
}

struct Running {
    client: Client,
    stop: crate::server::StopHandle,
    thread: thread::JoinHandle<()>,
    seen: Arc<Mutex<State>>,
}

fn config(dir: &Path, fsync: bool) -> Config {
    Config {
        socket: dir.join("nkv.sock"),
        data_dir: dir.join("data"),
        socket_mode: 0o600,
        socket_group: None,
        fsync,
        allow_unsafe_dirs: false,
        limits: Limits::default(),
        classes: crate::class::ClassRules::default(),
        volatile_dir: dir.join("volatile"),
        tombstones: crate::store::DEFAULT_TOMBSTONES,
    }
}

fn start(dir: &Path, fsync: bool) -> Running {
    let config = config(dir, fsync);
    // The previous server's connection threads may still hold its store (and lock) briefly.
    let end = Instant::now() + Duration::from_secs(20);
    let server = loop {
        match Server::start(&config) {
            Ok(server) => break server,
            Err(crate::server::StartError::Data(crate::disk::OpenError::InUse(_)))
                if Instant::now() < end =>
            {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("server does not start: {e}"),
        }
    };
    let stop = server.stop_handle();
    let thread = thread::spawn(move || server.run());
    let client = Client::connect(&config.socket).expect("connect");
    let seen = Arc::new(Mutex::new(State::new()));
    let sub = client.subscribe("*").expect("subscribe");
    let view = seen.clone();
    thread::spawn(move || {
        for event in sub {
            match event {
                Ok(Event::Init { key, value, rev }) | Ok(Event::Put { key, value, rev }) => {
                    view.lock().insert(key, (short(&value), rev));
                }
                Ok(Event::Del { key, .. }) => {
                    view.lock().remove(&key);
                }
                Ok(Event::Shutdown) | Err(_) => break,
                Ok(_) => {}
            }
        }
    });
    Running {
        client,
        stop,
        thread,
        seen,
    }
}

impl Running {
    fn stop(self) {
        drop(self.client);
        self.stop.stop();
        self.thread.join().expect("server thread");
    }

    /// Every key with value and revision, as the server's memory holds them.
    fn memory(&mut self) -> State {
        let mut state = State::new();
        for key in self.client.keys(None).expect("KEYS") {
            let entry = self
                .client
                .get_entry(&key)
                .expect("GET")
                .expect("listed key");
            state.insert(key, (short(&entry.value), entry.rev));
        }
        state
    }

    /// Sends `line`; the revision it acknowledged, or its error code.
    fn request(&mut self, line: &str) -> Result<u64, String> {
        let answer: Json = serde_json::from_str(&self.client.raw(line).expect("answer")).unwrap();
        if answer["ok"] == true {
            Ok(answer["rev"].as_u64().unwrap_or(0))
        } else {
            Err(answer["error"].as_str().unwrap().to_owned())
        }
    }
}

/// What the key files say.
fn disk(data: &Path) -> State {
    let mut state = State::new();
    for entry in std::fs::read_dir(data).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if let Some(key) = name.strip_suffix(".json") {
            let record: Json =
                serde_json::from_str(&std::fs::read_to_string(data.join(&name)).unwrap()).unwrap();
            state.insert(
                key.to_owned(),
                (short(&record["value"]), record["rev"].as_u64().unwrap()),
            );
        }
    }
    state
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// One scenario: a workload with `op` failing `times` times with `errno`.
fn scenario(op: Op, errno: i32, times: usize, fsync: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let what = format!("{op:?} failing with errno {errno} x{times}, fsync {fsync}");
    let mut server = start(tmp.path(), fsync);
    for line in ["PUT a.1 1", "PUT a.2 2", "PUT a.3 3", "PUT b 0"] {
        server.request(line).unwrap();
    }
    let big = format!("PUT big \"{}\"", "x".repeat(100 * 1024));
    let workload = [
        "PUT a.1 11".to_owned(),
        "PUT new 5".to_owned(),
        big,
        "DEL a.2".to_owned(),
        "PUT b {\"v\":1}".to_owned(),
        "DEL a.*".to_owned(),
        "PUT a.1 111".to_owned(),
        "DEL b".to_owned(),
    ];
    let plan = plan_for(&data);
    plan.set(Some(Fault { op, errno, times }));
    let mut last_rev = server.client.stats().unwrap()["rev"];
    let mut not_durable = 0;
    let mut failed = 0;
    for line in &workload {
        match server.request(line) {
            Ok(rev) => {
                // A pattern delete answers a count, not a revision.
                if !line.starts_with("DEL a.*") {
                    assert!(
                        rev > last_rev,
                        "{what}: {line} got rev {rev} after {last_rev}"
                    );
                    last_rev = rev;
                }
            }
            Err(code) if code == "not_durable" => not_durable += 1,
            Err(code) => {
                assert!(
                    code == "internal" || code == "no_space",
                    "{what}: {line}: {code}"
                );
                assert!(
                    code != "no_space" || errno == nix::libc::ENOSPC,
                    "{what}: {code}"
                );
                failed += 1;
            }
        }
    }
    plan.set(None);
    assert!(
        plan.injected() > 0,
        "{what}: the workload never reached the fault"
    );
    if matches!(op, Op::SyncDir) {
        assert!(
            not_durable > 0,
            "{what}: a failed directory fsync is reported"
        );
    }
    if not_durable > 0 {
        assert!(
            matches!(op, Op::SyncDir),
            "{what}: only the last fsync is not_durable"
        );
        // Counted per change: one `DEL a.*` answer may stand for several.
        assert!(server.client.stats().unwrap()["not_durable"] >= not_durable);
    }
    // A single ENOSPC while writing an overwrite's temp file is absorbed by the reserve
    // (the first change of the workload is a same-size overwrite). A failing delete-log
    // append or fsync never fails a delete: the log is removed instead (a crash then costs a
    // reset; see `tomblog::fault_tests`).
    let absorbed = (errno == nix::libc::ENOSPC
        && times == 1
        && matches!(
            op,
            Op::CreateTemp | Op::WriteTemp | Op::FillRev | Op::SyncFile
        ))
        || matches!(op, Op::AppendLog | Op::SyncLog);
    if op == Op::CheckDir {
        // A check that tells nothing about the path is asked again, then taken as in place:
        // the change is in the directory held, and refusing it would leave its record there
        // with its revision given back for reuse.
        assert_eq!((failed, not_durable), (0, 0), "{what}: nothing refused");
    }
    assert!(
        failed > 0 || not_durable > 0 || absorbed || op == Op::CheckDir,
        "{what}: the fault showed"
    );
    let memory = server.memory();
    assert_eq!(memory, disk(&data), "{what}: memory == disk");
    wait_for(&format!("{what}: the subscriber to converge"), || {
        *server.seen.lock() == memory
    });
    // Revisions of failed changes are never acknowledged; those acknowledged must never be
    // handed out again.
    let acked = memory
        .values()
        .map(|(_, rev)| *rev)
        .max()
        .unwrap_or(0)
        .max(last_rev);
    let rev_before = server.client.stats().unwrap()["rev"];
    assert!(
        rev_before >= acked,
        "{what}: STATS rev {rev_before} < acknowledged {acked}"
    );
    let rev_before = acked;
    server.stop();

    let mut server = start(tmp.path(), fsync);
    assert_eq!(
        server.memory(),
        memory,
        "{what}: everything acknowledged survives a restart"
    );
    let rev_after = server.client.stats().unwrap()["rev"];
    assert!(
        rev_after >= rev_before,
        "{what}: rev {rev_before} → {rev_after} after restart"
    );
    let next = server.request("PUT after 1").unwrap();
    assert!(
        next > rev_before,
        "{what}: revisions go on from {rev_before}, got {next}"
    );
    server.stop();
}

/// Every operation the workload reaches fails in turn, once with each errno and then for good.
fn every_operation_fails_in_turn(ops: &[Op], fsync: bool) {
    let errnos = [
        nix::libc::ENOSPC,
        nix::libc::EIO,
        nix::libc::EACCES,
        nix::libc::ENOENT,
    ];
    for &op in ops {
        for errno in errnos {
            // ENOENT from unlink means the file is already gone, which is what a delete
            // wants; an error injected before the call cannot simulate that.
            if op == Op::Unlink && errno == nix::libc::ENOENT {
                continue;
            }
            // ENOENT or EACCES from the directory check means the directory was replaced,
            // which it was not: `replaced_mid_change` replaces it for real.
            if op == Op::CheckDir && matches!(errno, nix::libc::ENOENT | nix::libc::EACCES) {
                continue;
            }
            scenario(op, errno, 1, fsync);
        }
        // A fault that persists: every such operation of the workload fails.
        scenario(op, nix::libc::EIO, usize::MAX, fsync);
    }
}

#[test]
fn every_disk_operation_fails_in_turn_and_nothing_diverges() {
    every_operation_fails_in_turn(&Op::ALL, true);
}

/// Without `--fsync` a put takes its revision only after writing its record (see
/// `Disk::write_numbered`): a failure on either side of that point leaves nothing behind.
#[test]
fn without_fsync_every_disk_operation_fails_in_turn_and_nothing_diverges() {
    let unsynced: Vec<Op> = Op::ALL
        .into_iter()
        .filter(|op| !matches!(op, Op::SyncFile | Op::SyncDir | Op::SyncRev | Op::SyncLog))
        .collect();
    every_operation_fails_in_turn(&unsynced, false);
}

/// The data directory is replaced (renamed away, a new one made) while a change is under
/// way, after the check at its start: the change lands in the orphaned directory, so it must
/// be neither applied nor acknowledged.
fn replaced_mid_change(op: Op, line: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = start(tmp.path(), true);
    server.request("PUT k \"before\"").unwrap();
    let before = server.memory();
    wait_for("the subscriber to see the first put", || {
        *server.seen.lock() == before
    });
    let (path, old) = (data.clone(), tmp.path().join("data.old"));
    plan_for(&data).on(op, move || {
        std::fs::rename(&path, &old).unwrap();
        std::fs::create_dir(&path).unwrap();
    });
    let answer: Json = serde_json::from_str(&server.client.raw(line).expect("answer")).unwrap();
    assert_eq!(answer["error"], "internal", "{line}: {answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("removed or replaced"),
        "{line}: {answer}"
    );
    assert_eq!(server.memory(), before, "{line}: not applied");
    assert_eq!(*server.seen.lock(), before, "{line}: not announced");
    server.stop();
}

#[test]
fn a_directory_replaced_during_a_change_is_never_acknowledged_into() {
    // A slow fdatasync of the temp file is where the probe replaced the directory.
    replaced_mid_change(Op::SyncFile, "PUT k \"acked\"");
    replaced_mid_change(Op::Rename, "PUT k \"acked\"");
    replaced_mid_change(Op::Unlink, "DEL k");
}
