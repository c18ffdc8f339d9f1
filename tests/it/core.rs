//! The core issue: commands, errors, persistence, clients.

use crate::support::Server;

#[test]
fn smoke_put_get_over_every_interface() {
    let server = Server::start();
    let mut client = server.client();
    assert_eq!(client.put("a.b", &serde_json::json!({"x": 1})).unwrap(), 1);
    assert_eq!(
        client.get("a.b").unwrap(),
        Some(serde_json::json!({"x": 1}))
    );
    let out = server.socat("GET a.b\n");
    assert_eq!(
        out,
        "{\"ok\":true,\"key\":\"a.b\",\"value\":{\"x\":1},\"rev\":1}\n"
    );
    let out = server.cli(&["get", "a.b"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "{\"x\":1}\n");
    let mut raw = server.raw();
    assert_eq!(raw.request("GET a.b")["rev"], 1);
}
