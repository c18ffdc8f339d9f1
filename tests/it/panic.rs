//! A panicking connection thread is contained: logged, its connection closed, the server and
//! its shared state unaffected.

use crate::support::Server;

#[test]
fn a_panic_in_one_connection_leaves_the_server_and_its_locks_intact() {
    let server = Server::start_with_env(&[], &[("NKV_DEBUG_PANIC_KEY", "boom")]);
    let mut other = server.raw();
    assert_eq!(other.request("PUT a 1")["ok"], true);

    // The put of `boom` panics while holding its stripe lock and the map's write lock.
    let mut doomed = server.raw();
    doomed.send("PUT boom 1");
    assert_eq!(
        doomed.line(),
        None,
        "the panicking connection is closed without a response"
    );

    // The map lock was released and not poisoned: reads and writes from an existing and a new
    // connection go on, including keys on every stripe.
    assert_eq!(other.request("GET a")["value"], 1);
    let mut fresh = server.raw();
    for i in 0..300 {
        assert_eq!(fresh.request(&format!("PUT k{i} {i}"))["ok"], true);
    }
    assert_eq!(
        other.request("GET *")["values"].as_object().unwrap().len(),
        301
    );
    assert_eq!(other.request("GET boom")["error"], "not_found");
    // It happens again, and is contained again.
    let mut doomed = server.raw();
    doomed.send("PUT boom 2");
    assert_eq!(doomed.line(), None);
    assert_eq!(fresh.request("HEALTH")["ok"], true);
    let log = server.log_text();
    assert!(log.contains("connection thread panicked"), "log:\n{log}");
}
