//! Resuming subscriptions against the real server: `ready` carries the snapshot's revision;
//! `SUB target FROM rev` sends exactly what changed after it (deletes included); a resume the
//! delete history cannot answer gets `reset` and the full snapshot; the history survives a
//! clean restart, not a crash; resumed subscribers keep every watch property.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{Raw, Server};
use crate::watchcheck::Watch;

/// What a `SUB` sent before its `ready`: (event, key) pairs, a reset flag, and the `ready`.
struct Snapshot {
    events: BTreeSet<(String, String)>,
    reset: bool,
    ready: Value,
    bytes: usize,
}

fn sub(raw: &mut Raw, line: &str) -> Snapshot {
    raw.send(line);
    assert_eq!(raw.json(), json!({"ok": true}), "ack of {line}");
    let mut snap = Snapshot {
        events: BTreeSet::new(),
        reset: false,
        ready: Value::Null,
        bytes: 0,
    };
    loop {
        let text = raw.line().expect("a line of the snapshot");
        snap.bytes += text.len() + 1;
        let ev: Value = serde_json::from_str(&text).unwrap();
        match ev["event"].as_str().unwrap() {
            "reset" => {
                assert!(snap.events.is_empty(), "reset comes first: {text}");
                snap.reset = true;
            }
            "ready" => {
                assert_eq!(ev["count"], snap.events.len() as u64, "{text}");
                snap.ready = ev;
                return snap;
            }
            kind => {
                let key = ev["key"].as_str().unwrap().to_owned();
                assert!(snap.events.insert((kind.to_owned(), key)), "twice: {text}");
            }
        }
    }
}

fn pairs(list: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    list.iter()
        .map(|(e, k)| (e.to_string(), k.to_string()))
        .collect()
}

fn ready_rev(snap: &Snapshot) -> u64 {
    snap.ready["rev"].as_u64().expect("ready carries rev")
}

/// The `epoch` of a snapshot's `ready`: 32 lowercase hex digits.
fn epoch_of(snap: &Snapshot) -> String {
    let epoch = snap.ready["epoch"].as_str().expect("ready carries epoch");
    assert!(
        epoch.len() == 32
            && epoch
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{epoch:?}"
    );
    epoch.to_owned()
}

/// Stops the server (SIGKILL), removes its data directory and starts it again: a new history
/// whose revisions start again from 1.
fn wipe(server: &mut Server) {
    server.kill();
    std::fs::remove_dir_all(&server.data).unwrap();
    server.spawn_and_wait();
}

#[test]
fn a_resume_naming_a_wiped_directorys_epoch_gets_a_reset_at_the_same_revision() {
    let mut server = Server::start();
    server.raw().request("PUT a.x 1");
    let before = sub(&mut server.raw(), "SUB a");
    let (rev, old) = (ready_rev(&before), epoch_of(&before));
    assert_eq!(rev, 1);
    wipe(&mut server);
    server.raw().request("PUT a.y 1");
    // Line form.
    let line = sub(&mut server.raw(), &format!("SUB a FROM {rev} EPOCH {old}"));
    assert!(line.reset, "another history: reset");
    assert_eq!(line.events, pairs(&[("init", "a.y")]));
    let new = epoch_of(&line);
    assert_ne!(new, old, "a wiped directory has a new epoch");
    assert_eq!(ready_rev(&line), 1);
    // JSON form, upper-case hex too.
    let mut raw = server.raw();
    raw.send(&format!(
        r#"{{"op":"sub","key":"a","from_rev":{rev},"epoch":"{}","id":"j"}}"#,
        old.to_uppercase()
    ));
    assert_eq!(raw.json(), json!({"ok": true, "id": "j"}));
    assert_eq!(raw.json(), json!({"event": "reset", "sub": "a"}));
    assert_eq!(raw.json()["key"], "a.y");
    assert_eq!(
        raw.json(),
        json!({"event": "ready", "sub": "a", "count": 1, "rev": 1, "epoch": new})
    );
    // Naming the new epoch resumes; naming none cannot tell the histories apart (documented).
    let same = sub(&mut server.raw(), &format!("SUB a FROM 1 EPOCH {new}"));
    assert!(!same.reset && same.events.is_empty());
    let blind = sub(&mut server.raw(), "SUB a FROM 1");
    assert!(!blind.reset && blind.events.is_empty());
}

#[test]
fn the_epoch_survives_a_clean_restart_and_a_crash() {
    let mut server = Server::start();
    let epoch_file = server.data.join(".epoch");
    let text = std::fs::read_to_string(&epoch_file).expect("the first start writes .epoch");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&epoch_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "like the other server files");
    server.raw().request("PUT a.x 1");
    let first = sub(&mut server.raw(), "SUB a");
    let epoch = epoch_of(&first);
    assert_eq!(text, format!("{epoch}\n"));
    let mut from = ready_rev(&first);
    for (how, i) in [("sigterm", 2), ("sigkill", 3)] {
        if how == "sigterm" {
            server.stop();
            server.spawn_and_wait();
        } else {
            server.restart();
        }
        server.raw().request(&format!("PUT a.x {i}"));
        let resumed = sub(
            &mut server.raw(),
            &format!("SUB a FROM {from} EPOCH {epoch}"),
        );
        assert!(!resumed.reset, "after {how}: the same history");
        assert_eq!(resumed.events, pairs(&[("put", "a.x")]), "after {how}");
        assert_eq!(epoch_of(&resumed), epoch, "after {how}");
        from = ready_rev(&resumed);
    }
}

/// Something done to a file.
type Spoil = dyn Fn(&std::path::Path);

#[test]
fn a_removed_or_damaged_epoch_file_makes_resumes_reset() {
    let mut server = Server::start();
    server.raw().request("PUT a.x 1");
    let file = server.data.join(".epoch");
    let mut epoch = epoch_of(&sub(&mut server.raw(), "SUB a"));
    let damage: [(&str, &Spoil); 6] = [
        ("removed", &|f| std::fs::remove_file(f).unwrap()),
        ("garbage", &|f| std::fs::write(f, "not an epoch\n").unwrap()),
        ("empty", &|f| std::fs::write(f, "").unwrap()),
        ("huge", &|f| std::fs::write(f, vec![b'a'; 1 << 20]).unwrap()),
        ("binary", &|f| std::fs::write(f, [0xff_u8; 33]).unwrap()),
        ("a symlink", &|f| {
            std::fs::remove_file(f).unwrap();
            std::os::unix::fs::symlink("/etc/hostname", f).unwrap();
        }),
    ];
    for (what, spoil) in damage {
        server.stop();
        spoil(&file);
        server.spawn_and_wait();
        let resumed = sub(&mut server.raw(), &format!("SUB a FROM 1 EPOCH {epoch}"));
        assert!(resumed.reset, "epoch file {what}: reset");
        assert_eq!(resumed.events, pairs(&[("init", "a.x")]), "{what}");
        let new = epoch_of(&resumed);
        assert_ne!(new, epoch, "epoch file {what}: a new epoch");
        let meta = std::fs::symlink_metadata(&file).unwrap();
        assert!(meta.is_file(), "{what}: replaced by a plain file");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{new}\n"));
        epoch = new;
    }
    // A directory in its place: the server still starts and serves, with a new epoch each
    // start (it cannot save one), so every resume gets a reset.
    server.stop();
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    server.spawn_and_wait();
    let resumed = sub(&mut server.raw(), &format!("SUB a FROM 1 EPOCH {epoch}"));
    assert!(resumed.reset);
    let new = epoch_of(&resumed);
    let again = sub(&mut server.raw(), &format!("SUB a FROM 1 EPOCH {new}"));
    assert!(!again.reset, "the running server keeps its epoch");
}

#[test]
fn a_malformed_epoch_is_a_clear_error() {
    let server = Server::start();
    let mut raw = server.raw();
    for line in [
        "SUB a FROM 1 EPOCH nothex",
        "SUB a FROM 1 EPOCH",
        "SUB a FROM 1 AT 2",
        r#"{"op":"sub","key":"a","from_rev":1,"epoch":"12"}"#,
        r#"{"op":"sub","key":"a","epoch":"0123456789abcdef0123456789abcdef"}"#,
    ] {
        let reply = raw.request(line);
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        assert_eq!(reply["error"], "bad_request", "{line}: {reply}");
    }
    assert!(raw.healthy());
}

#[test]
fn ready_carries_the_revision_its_snapshot_was_taken_at() {
    let server = Server::start();
    let mut raw = server.raw();
    raw.request("PUT a.x 1");
    raw.request("PUT b 1");
    let snap = sub(&mut server.raw(), "SUB a");
    let epoch = epoch_of(&snap);
    assert_eq!(
        snap.ready,
        json!({"event": "ready", "sub": "a", "count": 1, "rev": 2, "epoch": epoch})
    );
}

#[test]
fn a_resume_gets_exactly_the_missed_changes() {
    let server = Server::start();
    let mut w = server.raw();
    for i in 0..10 {
        w.request(&format!("PUT p.k{i} {i}"));
    }
    w.request("PUT other 1");
    let first = sub(&mut server.raw(), "SUB p");
    assert_eq!(first.events.len(), 10);
    let from = ready_rev(&first);
    // Missed while away: an update, a delete, a new key, a key born and gone, and changes
    // outside the prefix.
    w.request("PUT p.k1 11");
    w.request("DEL p.k2");
    w.request("PUT p.new 1");
    w.request("PUT p.brief 1");
    w.request("DEL p.brief");
    w.request("PUT other 2");
    w.request("DEL other");
    let resumed = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
    assert!(!resumed.reset);
    assert_eq!(
        resumed.events,
        pairs(&[
            ("put", "p.k1"),
            ("del", "p.k2"),
            ("put", "p.new"),
            ("del", "p.brief"),
        ])
    );
    assert_eq!(ready_rev(&resumed), from + 7);
    // The JSON form, and a resume from the present: nothing.
    let mut raw = server.raw();
    raw.send(&format!(
        r#"{{"op":"sub","key":"p.*","from_rev":{},"id":1}}"#,
        from + 7
    ));
    assert_eq!(raw.json(), json!({"ok": true, "id": 1}));
    let ready = raw.json();
    assert_eq!(
        ready,
        json!({"event": "ready", "sub": "p.*", "count": 0, "rev": from + 7, "epoch": ready["epoch"]})
    );
    // Live events follow as usual.
    w.request("PUT p.k3 33");
    assert_eq!(raw.json()["key"], "p.k3");
}

#[test]
fn a_resume_past_the_tombstone_horizon_gets_a_reset() {
    let server = Server::start_with(&["--tombstones", "2"]);
    let mut w = server.raw();
    for i in 0..5 {
        w.request(&format!("PUT p.k{i} {i}"));
    }
    let from = ready_rev(&sub(&mut server.raw(), "SUB p"));
    for i in 0..3 {
        w.request(&format!("DEL p.k{i}"));
    }
    let resumed = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
    assert!(
        resumed.reset,
        "three deletes, two tombstones: the history is short"
    );
    assert_eq!(resumed.events, pairs(&[("init", "p.k3"), ("init", "p.k4")]));
    // Within the horizon it still answers.
    let recent = sub(&mut server.raw(), &format!("SUB p FROM {}", from + 1));
    assert!(!recent.reset);
    assert_eq!(recent.events, pairs(&[("del", "p.k1"), ("del", "p.k2")]));
    // A revision from the future (another server's) is a reset too, never a failure.
    let future = sub(&mut server.raw(), "SUB p FROM 999999");
    assert!(future.reset);
    assert_eq!(server.raw().request("STATS")["tombstones"], 2);
}

#[test]
fn the_delete_history_survives_a_clean_restart_and_a_crash() {
    let mut server = Server::start();
    let mut w = server.raw();
    w.request("PUT p.a 1");
    w.request("PUT p.b 1");
    w.request("PUT runtime.x 1");
    let from = ready_rev(&sub(&mut server.raw(), "SUB *"));
    w.request("DEL p.a");
    drop(w);
    assert!(server.stop().success());
    server.spawn_and_wait();
    assert!(
        !server.data.join(".tombstones").exists(),
        "read once, then removed"
    );
    let resumed = sub(&mut server.raw(), &format!("SUB * FROM {from}"));
    assert!(!resumed.reset, "a clean restart keeps the history");
    // The memory key did not survive the restart: the resume says so.
    assert_eq!(
        resumed.events,
        pairs(&[("del", "p.a"), ("del", "runtime.x")])
    );
    let from = ready_rev(&resumed);
    server.raw().request("DEL p.b");
    server.restart();
    // The delete log keeps persistent deletes across a crash.
    let after_crash = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
    assert!(!after_crash.reset, "the delete log survives a crash");
    assert_eq!(after_crash.events, pairs(&[("del", "p.b")]));
    // What a crash did to memory keys is not known: a target that may cover them is reset.
    let everything = sub(&mut server.raw(), &format!("SUB * FROM {from}"));
    assert!(everything.reset, "memory deletes are not logged");
}

/// Puts `p.a`..`p.e`, subscribes to `p`, then deletes `p.a` and `p.b` and puts `p.f`; the
/// revision the resume starts from.
fn deletes_after(server: &Server) -> u64 {
    let mut w = server.raw();
    for k in ["a", "b", "c", "d", "e"] {
        assert_eq!(w.request(&format!("PUT p.{k} 1"))["ok"], true);
    }
    let from = ready_rev(&sub(&mut server.raw(), "SUB p"));
    assert_eq!(w.request("DEL p.a")["ok"], true);
    assert_eq!(w.request("DEL p.b")["ok"], true);
    assert_eq!(w.request("PUT p.f 1")["ok"], true);
    from
}

#[test]
fn a_resume_after_sigkill_gets_exactly_the_missed_deletes() {
    for flags in [&[][..], &["--fsync"][..]] {
        let mut server = Server::start_with(flags);
        let from = deletes_after(&server);
        server.restart();
        let resumed = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
        assert!(
            !resumed.reset,
            "{flags:?}: the delete log answers the resume"
        );
        assert_eq!(
            resumed.events,
            pairs(&[("del", "p.a"), ("del", "p.b"), ("put", "p.f")]),
            "{flags:?}"
        );
        // Twice: the start compacted the log, and a second crash still finds it whole.
        server.raw().request("DEL p.c");
        server.restart();
        let again = sub(&mut server.raw(), &format!("SUB p.c FROM {from}"));
        assert!(!again.reset, "{flags:?}");
        assert_eq!(again.events, pairs(&[("del", "p.c")]), "{flags:?}");
    }
}

#[test]
fn a_session_key_lost_in_a_crash_is_told_as_a_del() {
    let mut server = Server::start();
    let mut owner = server.raw();
    let reply = owner.request(r#"{"op":"put","key":"svc.s","value":1,"session":true}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    let from = ready_rev(&sub(&mut server.raw(), "SUB svc"));
    server.restart();
    assert_eq!(get(&mut server.raw(), "svc.s")["error"], "not_found");
    let resumed = sub(&mut server.raw(), &format!("SUB svc FROM {from}"));
    assert!(!resumed.reset);
    assert_eq!(resumed.events, pairs(&[("del", "svc.s")]));
}

#[test]
fn a_delete_log_that_cannot_be_trusted_forces_a_reset() {
    let log = |server: &Server| server.data.join(".tombstone-log");
    // Lost, damaged, holding a revision above the floor, or written under other rules: reset.
    let damage: [(&str, Harm); 4] = [
        ("removed", |p| std::fs::remove_file(p).unwrap()),
        ("a bad record", |p| append(p, b"d x p.z\n")),
        ("above the floor", |p| append(p, b"d 999999 p.z\n")),
        ("truncated into its header", |p| {
            let text = std::fs::read(p).unwrap();
            std::fs::write(p, &text[..5]).unwrap();
        }),
    ];
    for (what, harm) in damage {
        let mut server = Server::start();
        let from = deletes_after(&server);
        server.kill();
        harm(&log(&server));
        server.spawn_and_wait();
        let resumed = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
        assert!(resumed.reset, "a log {what} must not be trusted");
        assert_eq!(
            resumed.events,
            pairs(&[
                ("init", "p.c"),
                ("init", "p.d"),
                ("init", "p.e"),
                ("init", "p.f")
            ]),
            "{what}"
        );
        assert!(server.raw().healthy(), "{what}");
    }
    // A torn last record is an append that never finished: ignored, the rest trusted.
    let mut server = Server::start();
    let from = deletes_after(&server);
    server.kill();
    append(&log(&server), b"d 7 p.gone");
    server.spawn_and_wait();
    let resumed = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
    assert!(!resumed.reset);
    assert_eq!(
        resumed.events,
        pairs(&[("del", "p.a"), ("del", "p.b"), ("put", "p.f")])
    );
    // Other class rules after the crash: deletes of keys that were not persistent are not
    // in the log.
    let tmp = tempfile::tempdir().unwrap();
    let mut server = with_classes(tmp.path(), "q=memory");
    server.spawn_and_wait();
    let from = deletes_after(&server);
    server.kill();
    set_classes(&mut server, "q=volatile");
    server.spawn_and_wait();
    assert!(sub(&mut server.raw(), &format!("SUB p FROM {from}")).reset);
}

/// Something done to the delete log while the server is down.
type Harm = fn(&std::path::Path);

fn append(path: &std::path::Path, bytes: &[u8]) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

#[test]
fn resume_bytes_versus_a_full_snapshot_of_100000_keys() {
    const KEYS: usize = 100_000;
    let server = Server::start();
    let mut w = server.raw();
    // Pipelined puts of a memory-class prefix (the bytes on the wire do not depend on it).
    let mut batch = String::new();
    for i in 0..KEYS {
        batch.push_str(&format!(
            "PUT runtime.big.k{i:06} {{\"n\":{i},\"on\":true}}\n"
        ));
    }
    // Sent from another thread while this one reads the replies: neither side waits forever.
    let mut sender = Raw::connect(&server.socket);
    let mut replies = Raw::connect(&server.socket);
    std::mem::swap(&mut sender, &mut replies);
    let stream = sender.stream().try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        use std::io::Write;
        (&stream).write_all(batch.as_bytes()).unwrap();
    });
    for _ in 0..KEYS {
        assert_eq!(sender.json()["ok"], true);
    }
    feeder.join().unwrap();
    drop(replies);
    let full = sub(&mut server.raw(), "SUB runtime.big");
    assert_eq!(full.events.len(), KEYS);
    let from = ready_rev(&full);
    for i in 0..8 {
        w.request(&format!("PUT runtime.big.k{:06} {{\"n\":-1}}", i * 1000));
    }
    w.request("DEL runtime.big.k000001");
    w.request("DEL runtime.big.k000002");
    let started = Instant::now();
    let resumed = sub(&mut server.raw(), &format!("SUB runtime.big FROM {from}"));
    let took = started.elapsed();
    assert_eq!(resumed.events.len(), 10);
    println!(
        "resume vs full snapshot, {KEYS} keys, 10 changes missed: full {} bytes, resume {} bytes ({:.4}%), resume took {:?}",
        full.bytes,
        resumed.bytes,
        100.0 * resumed.bytes as f64 / full.bytes as f64,
        took
    );
    assert!(
        resumed.bytes * 1000 < full.bytes,
        "a resume sends what changed, not everything"
    );
    assert!(took < Duration::from_secs(5));
}

#[test]
fn resumed_subscribers_keep_the_watch_properties() {
    let server = Server::start_with(&["--tombstones", "10"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (socket, stop) = (server.socket.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut raw = Raw::connect(&socket);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("w.k{}", (i * 7 + w) % 200);
                    if i % 5 == 4 {
                        raw.request(&format!("DEL {key}"));
                    } else {
                        raw.request(&format!("PUT {key} {i}"));
                    }
                    i += 1;
                }
            })
        })
        .collect();
    let mut watch = Watch::start(&server, &["w"]);
    let mut resets = 0;
    for round in 0..12 {
        // Let some changes through, then lose the connection and resume where it left.
        let seen_before = watch.seen.lock().unwrap().events;
        crate::support::wait_until("some events", || {
            watch.seen.lock().unwrap().events > seen_before + 20
        });
        let seen = watch.disconnect();
        assert!(
            seen.violations.is_empty(),
            "round {round}: {:?}",
            seen.violations
        );
        resets = seen.resets;
        // Sometimes stay away long enough for the history (10 tombstones) to run out.
        if round % 4 == 3 {
            let mut probe = server.raw();
            let end = probe.request("STATS")["rev"].as_u64().unwrap() + 400;
            crate::support::wait_until("the writers to move on", || {
                probe.request("STATS")["rev"].as_u64().unwrap() > end
            });
        }
        watch = Watch::resume(&server, "w", seen);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    watch.wait_converged(&mut server.raw(), "w.*");
    watch.assert_ok("resumed subscriber");
    let seen = watch.disconnect();
    println!(
        "resumed 12 times: {} events, {} resets, {} skipped events",
        seen.events,
        seen.resets.max(resets),
        seen.skipped_events
    );
    assert!(
        seen.resets >= 1,
        "the long absences reached past the horizon"
    );
}

#[test]
fn a_data_directory_edited_while_stopped_is_not_resumed_from() {
    let mut server = Server::start();
    let mut w = server.raw();
    w.request("PUT p.a 1");
    w.request("PUT p.b 1");
    let from = ready_rev(&sub(&mut server.raw(), "SUB p"));
    drop(w);
    assert!(server.stop().success());
    // Someone removes a key file while the server is stopped (the layout allows it).
    std::fs::remove_file(server.data.join("p.b.json")).unwrap();
    server.spawn_and_wait();
    let resumed = sub(&mut server.raw(), &format!("SUB p FROM {from}"));
    assert!(
        resumed.reset,
        "the saved history no longer describes the directory"
    );
    assert_eq!(resumed.events, pairs(&[("init", "p.a")]));
}

/// A server in `dir` whose volatile directory is `dir/vol`, with `classes` (NKV_CLASSES).
fn with_classes(dir: &std::path::Path, classes: &str) -> Server {
    let mut server = Server::new_in(dir, &[]);
    set_classes(&mut server, classes);
    server
}

fn set_classes(server: &mut Server, classes: &str) {
    let vol = server.dir.join("vol");
    server.env = vec![
        ("NKV_VOLATILE_DIR".into(), vol.to_str().unwrap().into()),
        ("NKV_CLASSES".into(), classes.into()),
    ];
}

fn get(raw: &mut Raw, key: &str) -> Value {
    raw.request(&format!("GET {key}"))
}

#[test]
fn a_volatile_key_has_one_home_whatever_the_rules_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, vol) = (tmp.path().join("data"), tmp.path().join("vol"));
    let mut server = with_classes(tmp.path(), "v=volatile");
    server.spawn_and_wait();
    let mut w = server.raw();
    let first = w.request("PUT v.a 1")["rev"].as_u64().unwrap();
    w.request("PUT v.b 1");
    assert!(vol.join("v.a.json").is_file());
    drop(w);
    assert!(server.stop().success());

    // Without the rule: the keys are persistent now, moved home, visible and deletable.
    set_classes(&mut server, "runtime=memory");
    server.spawn_and_wait();
    let mut w = server.raw();
    let a = get(&mut w, "v.a");
    assert_eq!(
        (a["value"].clone(), a["class"].clone()),
        (json!(1), json!("persistent")),
        "{a}"
    );
    assert_eq!(a["rev"], first, "a move keeps the revision");
    assert!(data.join("v.a.json").is_file() && !vol.join("v.a.json").exists());
    let from = ready_rev(&sub(&mut server.raw(), "SUB v"));
    assert_eq!(w.request("DEL v.a")["ok"], true);
    assert_eq!(get(&mut w, "v.a")["error"], "not_found");
    assert!(!data.join("v.a.json").exists() && !vol.join("v.a.json").exists());
    w.request("PUT v.c 3");
    drop(w);
    assert!(server.stop().success());

    // With the rule again: nothing stale comes back; v.b and v.c move to the volatile
    // directory; the resume gets exactly the missed changes.
    set_classes(&mut server, "v=volatile");
    server.spawn_and_wait();
    let mut w = server.raw();
    assert_eq!(get(&mut w, "v.a")["error"], "not_found");
    assert_eq!(get(&mut w, "v.b")["class"], "volatile");
    assert_eq!(get(&mut w, "v.c")["class"], "volatile");
    for key in ["v.b", "v.c"] {
        assert!(vol.join(format!("{key}.json")).is_file(), "{key} in vol");
        assert!(
            !data.join(format!("{key}.json")).exists(),
            "{key} not in data"
        );
    }
    let resumed = sub(&mut server.raw(), &format!("SUB v FROM {from}"));
    assert!(
        !resumed.reset,
        "the stop's history describes what was found"
    );
    assert_eq!(resumed.events, pairs(&[("del", "v.a"), ("put", "v.c")]));
    assert_eq!(w.request("DEL v.b")["ok"], true);
    assert!(!vol.join("v.b.json").exists());
}

#[test]
fn a_key_in_both_class_directories_keeps_its_latest_record_and_a_resume_is_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, vol) = (tmp.path().join("data"), tmp.path().join("vol"));
    let mut server = with_classes(tmp.path(), "v=volatile");
    server.spawn_and_wait();
    let mut w = server.raw();
    w.request("PUT v.a 1");
    w.request("PUT v.a 2");
    // What an older server (or an operator) may leave: a stale copy in the data directory,
    // and a volatile key the stop never had, at a revision below the resume point.
    let stale = std::fs::read_to_string(vol.join("v.a.json")).unwrap();
    w.request("PUT v.a 3");
    let from = ready_rev(&sub(&mut server.raw(), "SUB v"));
    drop(w);
    assert!(server.stop().success());
    std::fs::write(data.join("v.a.json"), &stale).unwrap();
    std::fs::write(vol.join("v.hidden.json"), "{\"rev\":1,\"value\":7}\n").unwrap();
    server.spawn_and_wait();
    let mut w = server.raw();
    let a = get(&mut w, "v.a");
    assert_eq!(
        (a["value"].clone(), a["class"].clone()),
        (json!(3), json!("volatile")),
        "{a}"
    );
    assert!(
        !data.join("v.a.json").exists(),
        "the losing record is removed"
    );
    assert_eq!(get(&mut w, "v.hidden")["value"], 7);
    let resumed = sub(&mut server.raw(), &format!("SUB v FROM {from}"));
    assert!(
        resumed.reset,
        "a key appeared at start below the resume point"
    );
    assert_eq!(
        resumed.events,
        pairs(&[("init", "v.a"), ("init", "v.hidden")])
    );
}

#[test]
fn a_volatile_directory_of_another_data_directory_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let mut first = with_classes(tmp.path(), "v=volatile");
    first.spawn_and_wait();
    first.raw().request("PUT v.a 1");
    assert!(first.stop().success());
    let other = tempfile::tempdir().unwrap();
    let mut second = Server::new_in(other.path(), &[]);
    second.env = vec![("NKV_VOLATILE_DIR".into(), vol.to_str().unwrap().into())];
    second.spawn_and_wait();
    assert_eq!(get(&mut second.raw(), "v.a")["error"], "not_found");
    assert!(
        vol.join("v.a.json").is_file(),
        "not taken by another data directory"
    );
}

/// Every key a restart loses is told gone to a resuming subscriber, however many there are:
/// memory keys across a clean stop, volatile keys across a reboot (their directory cleared),
/// session keys across a crash. (Found by the issue-12 adversary: the history held one key per
/// revision, and all of them are gone at one new revision, so only the last was told; putting
/// one of them again then dropped the last one's tombstone too.)
#[test]
fn every_key_a_restart_loses_is_told_gone() {
    let keys = |prefix: &str| -> Vec<String> { (0..5).map(|i| format!("{prefix}.k{i}")).collect() };
    let dels = |prefix: &str| -> BTreeSet<(String, String)> {
        keys(prefix)
            .into_iter()
            .map(|k| ("del".to_owned(), k))
            .collect()
    };
    // Memory keys (the default `runtime` rule) across a clean stop; one of them put again.
    let mut server = Server::start();
    let mut raw = server.raw();
    for key in keys("runtime") {
        assert_eq!(raw.request(&format!("PUT {key} 1"))["ok"], true);
    }
    let from = ready_rev(&sub(&mut server.raw(), "SUB runtime"));
    assert!(server.stop().success());
    server.spawn_and_wait();
    let resumed = sub(&mut server.raw(), &format!("SUB runtime FROM {from}"));
    assert!(!resumed.reset);
    assert_eq!(resumed.events, dels("runtime"));
    assert_eq!(server.raw().request("PUT runtime.k0 2")["ok"], true);
    let resumed = sub(&mut server.raw(), &format!("SUB runtime FROM {from}"));
    let mut want = dels("runtime");
    want.remove(&("del".to_owned(), "runtime.k0".to_owned()));
    want.insert(("put".to_owned(), "runtime.k0".to_owned()));
    assert_eq!(resumed.events, want);

    // Volatile keys across a reboot.
    let tmp = tempfile::tempdir().unwrap();
    let mut server = with_classes(tmp.path(), "v=volatile");
    server.spawn_and_wait();
    let mut raw = server.raw();
    for key in keys("v") {
        assert_eq!(raw.request(&format!("PUT {key} 1"))["ok"], true);
    }
    let from = ready_rev(&sub(&mut server.raw(), "SUB v"));
    assert!(server.stop().success());
    std::fs::remove_dir_all(tmp.path().join("vol")).unwrap();
    server.spawn_and_wait();
    let resumed = sub(&mut server.raw(), &format!("SUB v FROM {from}"));
    assert!(!resumed.reset);
    assert_eq!(resumed.events, dels("v"));

    // Session keys across a crash.
    let mut server = Server::start();
    let mut owner = server.raw();
    for key in keys("svc") {
        let put = format!(r#"{{"op":"put","key":"{key}","value":1,"session":true}}"#);
        assert_eq!(owner.request(&put)["ok"], true);
    }
    let from = ready_rev(&sub(&mut server.raw(), "SUB svc"));
    server.restart();
    let resumed = sub(&mut server.raw(), &format!("SUB svc FROM {from}"));
    assert!(!resumed.reset);
    assert_eq!(resumed.events, dels("svc"));
}
