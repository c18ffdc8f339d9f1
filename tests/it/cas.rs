//! Compare-and-set against the real server: `PUTIF`, `DELIF`, JSON `"if_rev"`, the exact
//! conflict reply, and racing writers of which exactly one wins each revision.

use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::support::Server;

#[test]
fn putif_and_delif_change_only_at_the_expected_revision() {
    let server = Server::start();
    let mut raw = server.raw();
    assert_eq!(raw.request("PUTIF a 0 1"), json!({"ok": true, "rev": 1}));
    let conflict = raw.request("PUTIF a 0 2");
    assert_eq!(conflict["ok"], false);
    assert_eq!(conflict["error"], "conflict");
    assert_eq!(conflict["rev"], 1);
    assert!(conflict["message"].as_str().unwrap().contains("rev 1"));
    assert_eq!(
        conflict.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["error", "message", "ok", "rev"]
    );
    assert_eq!(
        raw.request("GET a")["value"],
        1,
        "a conflict changes nothing"
    );
    assert_eq!(raw.request("PUTIF a 1 two words")["rev"], 2);
    assert_eq!(raw.request("GET a")["value"], "two words");
    assert_eq!(raw.request("DELIF a 1")["rev"], 2);
    assert_eq!(raw.request("DELIF a 2"), json!({"ok": true, "rev": 3}));
    let absent = raw.request("DELIF a 3");
    assert_eq!(
        (absent["error"].clone(), absent["rev"].clone()),
        (json!("conflict"), json!(0))
    );
    assert_eq!(raw.request("DELIF a 0")["error"], "not_found");
    assert_eq!(raw.request("PUTIF b 5 1")["rev"], 0);
    // The JSON form, with the id echoed on both outcomes.
    assert_eq!(
        raw.request(r#"{"op":"put","key":"b","value":{"x":1},"if_rev":0,"id":"w1"}"#),
        json!({"ok": true, "rev": 4, "id": "w1"})
    );
    let reply = raw.request(r#"{"op":"put","key":"b","value":2,"if_rev":0,"id":9}"#);
    assert_eq!(
        (
            reply["error"].clone(),
            reply["rev"].clone(),
            reply["id"].clone()
        ),
        (json!("conflict"), json!(4), json!(9))
    );
    assert_eq!(
        raw.request(r#"{"op":"del","key":"b","if_rev":3}"#)["error"],
        "conflict"
    );
    assert_eq!(
        raw.request(r#"{"op":"del","key":"b","if_rev":4}"#),
        json!({"ok": true, "rev": 5})
    );
    assert_eq!(raw.request("PUTIF b x 1")["error"], "bad_request");
    assert_eq!(raw.request("STATS")["rev"], 5, "conflicts take no revision");
}

#[test]
fn racing_writers_have_one_winner_per_revision() {
    const WRITERS: usize = 8;
    const ROUNDS: usize = 40;
    let server = Server::start();
    server.raw().request("PUT counter 0");
    let wins = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (socket, wins) = (server.socket.clone(), wins.clone());
            std::thread::spawn(move || {
                let mut raw = crate::support::Raw::connect(&socket);
                let mut won = 0;
                let mut conflicts = 0;
                while won < ROUNDS {
                    let got = raw.request("GET counter");
                    let (n, rev) = (got["value"].as_u64().unwrap(), got["rev"].as_u64().unwrap());
                    let reply = raw.request(&format!("PUTIF counter {rev} {}", n + 1));
                    if reply["ok"] == true {
                        won += 1;
                        wins.lock()
                            .unwrap()
                            .push((rev, reply["rev"].as_u64().unwrap(), w));
                    } else {
                        assert_eq!(reply["error"], "conflict", "writer {w}: {reply}");
                        assert!(reply["rev"].as_u64().unwrap() > rev, "{reply}");
                        conflicts += 1;
                    }
                }
                conflicts
            })
        })
        .collect();
    let conflicts: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let mut wins = wins.lock().unwrap().clone();
    wins.sort();
    // Each revision was won once, and each win built on the previous one: no lost update.
    for pair in wins.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "two writers won from one revision: {pair:?}"
        );
    }
    let total = (WRITERS * ROUNDS) as u64;
    assert_eq!(server.raw().request("GET counter")["value"], total);
    println!("{total} wins, {conflicts} conflicts among {WRITERS} writers");
}

#[test]
fn a_null_optional_field_counts_as_not_given() {
    let server = Server::start();
    let mut raw = server.raw();
    let put = |raw: &mut crate::support::Raw, extra: &str, v: u64| {
        raw.request(&format!(r#"{{"op":"put","key":"n.k","value":{v}{extra}}}"#))
    };
    assert_eq!(put(&mut raw, "", 1)["rev"], 1);
    // A plain put, not "only if absent" (which `0` would be) and not a conflict.
    assert_eq!(put(&mut raw, r#","if_rev":null"#, 2)["ok"], true);
    // Not a session key: it outlives its connection.
    assert_eq!(put(&mut raw, r#","session":null"#, 3)["ok"], true);
    drop(raw);
    let mut raw = server.raw();
    let got = raw.request(r#"{"op":"get","key":"n.k","id":null}"#);
    assert_eq!(got["value"], 3, "{got}");
    assert!(got.get("id").is_some_and(|id| id.is_null()), "{got}");
    assert_eq!(
        raw.request(r#"{"op":"put","key":"n.z","value":null}"#)["ok"],
        true
    );
    assert!(raw.request("GET n.z")["value"].is_null());
    // A full snapshot, as without `from_rev`.
    raw.send(r#"{"op":"sub","key":"n","from_rev":null,"epoch":null}"#);
    assert_eq!(raw.json()["ok"], true);
    let mut inits = 0;
    loop {
        let event = raw.json();
        match event["event"].as_str() {
            Some("init") => inits += 1,
            Some("ready") => break,
            other => panic!("unexpected {other:?}: {event}"),
        }
    }
    assert_eq!(inits, 2);
}
