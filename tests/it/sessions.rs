//! Session keys against the real server: owned by the connection that put them, deleted (with
//! a `del` event) however it ends, never restored at start; what other connections may do.

use serde_json::json;

use crate::support::{wait_until, Raw, Server};

fn session_put(raw: &mut Raw, key: &str, value: &str) -> u64 {
    let reply = raw.request(&format!(
        r#"{{"op":"put","key":"{key}","value":{value},"session":true}}"#
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    reply["rev"].as_u64().unwrap()
}

/// Reads events until `want` (an event name and key) arrives.
fn wait_event(sub: &mut Raw, event: &str, key: &str) -> serde_json::Value {
    loop {
        let e = sub.json();
        if e["event"] == event && e["key"] == key {
            return e;
        }
    }
}

#[test]
fn session_keys_are_deleted_when_their_connection_closes() {
    let server = Server::start();
    let mut sub = server.raw();
    sub.subscribe("svc");
    let mut owner = server.raw();
    let rev = session_put(&mut owner, "svc.alive", r#"{"pid":1}"#);
    assert_eq!(wait_event(&mut sub, "put", "svc.alive")["rev"], rev);
    let got = owner.request("GET svc.alive");
    assert_eq!(got["class"], "memory", "{got}");
    assert_eq!(server.raw().request("STATS")["sessions"], 1);
    drop(owner);
    let del = wait_event(&mut sub, "del", "svc.alive");
    assert!(del["rev"].as_u64().unwrap() > rev);
    assert_eq!(server.raw().request("GET svc.alive")["error"], "not_found");
    assert_eq!(server.raw().request("STATS")["sessions"], 0);
}

#[test]
fn a_connection_the_server_drops_loses_its_session_keys() {
    let server = Server::start_with(&["--max-value-bytes", "100"]);
    let mut sub = server.raw();
    sub.subscribe("svc");
    let mut owner = server.raw();
    session_put(&mut owner, "svc.a", "1");
    // A line over the limit: the server answers too_large and closes the connection.
    owner.send(&"x".repeat(100 + 64 * 1024 + 10));
    assert_eq!(owner.json()["error"], "too_large");
    wait_event(&mut sub, "del", "svc.a");
}

#[test]
fn session_keys_are_not_restored_after_kill_9() {
    let mut server = Server::start();
    let mut owner = server.raw();
    owner.request("PUT svc.b 1");
    session_put(&mut owner, "svc.b", "2");
    session_put(&mut owner, "svc.c", "3");
    server.restart();
    let mut raw = server.raw();
    assert_eq!(raw.request("GET svc.b")["error"], "not_found");
    assert_eq!(raw.request("GET svc.c")["error"], "not_found");
    assert_eq!(raw.request("KEYS"), json!({"ok": true, "keys": []}));
}

#[test]
fn another_connections_plain_put_takes_a_session_key_over() {
    let server = Server::start();
    let mut owner = server.raw();
    let mut other = server.raw();
    session_put(&mut owner, "svc.a", "1");
    session_put(&mut owner, "svc.b", "1");
    session_put(&mut owner, "svc.c", "1");
    // A plain put makes svc.a an ordinary key of its prefix's class.
    other.request("PUT svc.a 2");
    assert_eq!(other.request("GET svc.a")["class"], "persistent");
    // A session put moves svc.b to the other connection.
    session_put(&mut other, "svc.b", "2");
    // Anyone may delete a session key.
    assert_eq!(other.request("DEL svc.c")["ok"], true);
    drop(owner);
    let mut probe = server.raw();
    // The owner's end deleted nothing it no longer owned.
    wait_until("the owner's connection to end", || {
        probe.request("STATS")["connections"] == 2
    });
    assert_eq!(probe.request("GET svc.a")["value"], 2);
    assert_eq!(probe.request("GET svc.b")["value"], 2);
    drop(other);
    wait_until("svc.b to go with its new owner", || {
        probe.request("GET svc.b")["error"] == "not_found"
    });
    assert_eq!(probe.request("GET svc.a")["value"], 2);
}

#[test]
fn a_session_key_survives_its_owner_only_if_taken_over_before_the_end() {
    let server = Server::start();
    let mut owner = server.raw();
    session_put(&mut owner, "svc.a", "1");
    // The owner turns its own key into an ordinary one: closing no longer deletes it.
    owner.request("PUT svc.a 2");
    drop(owner);
    let mut probe = server.raw();
    wait_until("the owner's connection to end", || {
        probe.request("STATS")["connections"] == 1
    });
    assert_eq!(probe.request("GET svc.a")["value"], 2);
}
