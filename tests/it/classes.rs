//! Storage classes against the real server: where each class's keys live, what survives a
//! restart (and a simulated reboot), `GET`'s `class`, `STATS` counts, and revisions that never
//! go back across a restart that loses keys.

use std::path::Path;

use serde_json::json;

use crate::support::{BoundedOutput, Raw, Server};

/// A server in `dir` with a `volatile` prefix and a `memory` prefix (besides `runtime`).
fn server_in(dir: &Path) -> Server {
    let vol = dir.join("vol");
    let mut server = Server::new_in(
        dir,
        &[
            "--volatile-dir",
            vol.to_str().unwrap(),
            "--class",
            "run=volatile",
            "--class",
            "cache=memory",
            "--class",
            "cache.keep=persistent",
        ],
    );
    server.spawn_and_wait();
    server
}

fn put(raw: &mut Raw, key: &str, value: &str) -> u64 {
    let reply = raw.request(&format!("PUT {key} {value}"));
    assert_eq!(reply["ok"], true, "PUT {key}: {reply}");
    reply["rev"].as_u64().unwrap()
}

fn class_of(raw: &mut Raw, key: &str) -> serde_json::Value {
    let reply = raw.request(&format!("GET {key}"));
    if reply["ok"] == true {
        reply["class"].clone()
    } else {
        reply["error"].clone()
    }
}

#[test]
fn each_class_lives_as_long_as_it_promises() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = server_in(tmp.path());
    let mut raw = server.raw();
    let mut highest = 0;
    for key in ["svc.a", "run.a", "cache.a", "cache.keep.a", "runtime.a"] {
        highest = highest.max(put(&mut raw, key, "1"));
    }
    assert_eq!(class_of(&mut raw, "svc.a"), "persistent");
    assert_eq!(class_of(&mut raw, "run.a"), "volatile");
    assert_eq!(class_of(&mut raw, "cache.a"), "memory");
    assert_eq!(class_of(&mut raw, "cache.keep.a"), "persistent");
    assert_eq!(class_of(&mut raw, "runtime.a"), "memory");
    let stats = raw.request("STATS");
    assert_eq!(
        stats["classes"],
        json!({"persistent": 2, "volatile": 1, "memory": 2}),
        "{stats}"
    );
    // Each class's files are where it says, and only there.
    assert!(tmp.path().join("data/svc.a.json").is_file());
    assert!(tmp.path().join("data/cache.keep.a.json").is_file());
    assert!(tmp.path().join("vol/run.a.json").is_file());
    assert!(!tmp.path().join("data/run.a.json").exists());
    assert!(!tmp.path().join("data/cache.a.json").exists());
    assert!(!tmp.path().join("data/runtime.a.json").exists());

    // A crash: persistent and volatile keys stay, memory keys are gone.
    server.restart();
    let mut raw = server.raw();
    assert_eq!(class_of(&mut raw, "svc.a"), "persistent");
    assert_eq!(class_of(&mut raw, "run.a"), "volatile");
    assert_eq!(class_of(&mut raw, "cache.a"), "not_found");
    assert_eq!(class_of(&mut raw, "runtime.a"), "not_found");
    let rev = put(&mut raw, "svc.b", "2");
    assert!(rev > highest, "rev {rev} after a restart, {highest} before");
    highest = rev;

    // A reboot: the volatile directory is empty again (a tmpfs); persistent keys stay.
    server.kill();
    std::fs::remove_dir_all(tmp.path().join("vol")).unwrap();
    server.spawn_and_wait();
    let mut raw = server.raw();
    assert_eq!(class_of(&mut raw, "svc.a"), "persistent");
    assert_eq!(class_of(&mut raw, "run.a"), "not_found");
    let rev = put(&mut raw, "run.b", "3");
    assert!(rev > highest, "rev {rev} after a reboot, {highest} before");
    assert_eq!(
        raw.request("STATS")["classes"],
        json!({"persistent": 3, "volatile": 1, "memory": 0})
    );
}

#[test]
fn revisions_never_go_back_across_a_restart_that_loses_memory_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = server_in(tmp.path());
    let mut raw = server.raw();
    put(&mut raw, "svc.a", "1");
    let mut last = 0;
    for i in 0..50 {
        last = put(&mut raw, &format!("runtime.k{i}"), "1");
    }
    raw.request("DEL runtime.k0");
    server.restart();
    let mut raw = server.raw();
    let after = put(&mut raw, "runtime.k1", "2");
    assert!(
        after > last,
        "memory put after restart got rev {after}, before {last}"
    );
    let persistent = put(&mut raw, "svc.a", "2");
    assert!(persistent > after);
}

#[test]
fn a_key_that_changes_class_leaves_its_old_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = server_in(tmp.path());
    let mut raw = server.raw();
    put(&mut raw, "svc.a", "1");
    assert!(tmp.path().join("data/svc.a.json").is_file());
    // A session key is memory whatever its prefix: the persistent file must go, or a restart
    // would bring the key back.
    let reply = raw.request(r#"{"op":"put","key":"svc.a","value":2,"session":true}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(class_of(&mut raw, "svc.a"), "memory");
    assert!(!tmp.path().join("data/svc.a.json").exists());
    put(&mut raw, "svc.a", "3");
    assert_eq!(class_of(&mut raw, "svc.a"), "persistent");
    assert!(tmp.path().join("data/svc.a.json").is_file());
    drop(raw);
    server.restart();
    assert_eq!(server.raw().request("GET svc.a")["value"], 3);
}

#[test]
fn bad_class_rules_stop_the_server_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    for rule in ["nocolon", "a..b=memory", "a=disk"] {
        let server = Server::new_in(tmp.path(), &["--class", rule]);
        let out = server
            .command()
            .stderr(std::process::Stdio::piped())
            .bounded_output()
            .unwrap();
        assert!(!out.status.success(), "--class {rule} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--class"), "--class {rule}: {err}");
    }
}

#[test]
fn classes_come_from_the_environment_too() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("v");
    let mut server = Server::new_in(tmp.path(), &[]);
    server.env = vec![
        ("NKV_CLASSES".into(), "a=memory,b=volatile".into()),
        ("NKV_VOLATILE_DIR".into(), vol.to_str().unwrap().into()),
    ];
    server.spawn_and_wait();
    let mut raw = server.raw();
    put(&mut raw, "a.x", "1");
    put(&mut raw, "b.x", "1");
    assert_eq!(class_of(&mut raw, "a.x"), "memory");
    assert_eq!(class_of(&mut raw, "b.x"), "volatile");
    assert!(vol.join("b.x.json").is_file());
}

#[test]
fn conflicting_class_rules_stop_the_server_with_status_2() {
    let tmp = tempfile::tempdir().unwrap();
    let vol = tmp.path().join("vol");
    let refused = |args: &[&str], env: Option<&str>| {
        let mut server = Server::new_in(tmp.path(), args);
        if let Some(classes) = env {
            server.env = vec![("NKV_CLASSES".into(), classes.into())];
        }
        let out = server
            .command()
            .arg("--volatile-dir")
            .arg(&vol)
            .stderr(std::process::Stdio::piped())
            .bounded_output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = refused(&["--class", "a=memory", "--class", "a=volatile"], None);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--class") && err.contains("a=memory") && err.contains("a=volatile"),
        "{err}"
    );
    let (code, err) = refused(&[], Some("a=memory,b=persistent,a=volatile"));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("NKV_CLASSES") && err.contains("conflicting"),
        "{err}"
    );
    assert!(
        !tmp.path().join("data").exists(),
        "refused before touching the disk"
    );
    // The same rule twice is no conflict.
    let mut server = Server::new_in(tmp.path(), &["--class", "a=memory", "--class", "a=memory"]);
    server.spawn_and_wait();
    assert_eq!(class_of(&mut server.raw(), "a.x"), "not_found");
    put(&mut server.raw(), "a.x", "1");
    assert_eq!(class_of(&mut server.raw(), "a.x"), "memory");
}
