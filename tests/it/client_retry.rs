//! The Rust client's retries and timeouts: a request is sent again only when it cannot have
//! been applied, and no call waits forever.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use nkv::{Client, Timeouts};

use crate::support::Server;

/// A listener in a temp dir that plays a server by hand.
fn fake() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// Accepts one connection, reads one line, and closes without answering.
fn read_one_and_close(listener: &UnixListener) -> String {
    let (stream, _) = listener.accept().unwrap();
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    line
}

#[test]
fn a_put_whose_connection_breaks_after_sending_is_not_sent_again() {
    let (_dir, path, listener) = fake();
    let server = thread::spawn(move || {
        let line = read_one_and_close(&listener);
        listener.set_nonblocking(true).unwrap();
        (line, listener)
    });
    let mut client = Client::connect(&path).unwrap();
    let err = client.put("a", &1).unwrap_err();
    assert!(
        err.to_string().contains("may or may not have been applied"),
        "{err}"
    );
    let (line, listener) = server.join().unwrap();
    assert!(line.contains("\"op\":\"put\""), "{line}");
    // No second connection carrying the put again.
    let again = listener.accept();
    assert!(
        matches!(&again, Err(e) if e.kind() == ErrorKind::WouldBlock),
        "the put was sent again: {again:?}"
    );
}

#[test]
fn a_read_whose_connection_breaks_is_retried_once() {
    let (_dir, path, listener) = fake();
    let server = thread::spawn(move || {
        read_one_and_close(&listener);
        let (mut stream, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        stream
            .write_all(b"{\"ok\":true,\"key\":\"a\",\"value\":1,\"rev\":4}\n")
            .unwrap();
        line
    });
    let mut client = Client::connect(&path).unwrap();
    assert_eq!(client.get("a").unwrap(), Some(json!(1)));
    assert!(server.join().unwrap().contains("\"op\":\"get\""));
}

#[test]
fn a_put_after_the_server_restarted_goes_through_once() {
    let mut server = Server::start();
    let mut client = server.client();
    assert_eq!(client.put("r.a", &1).unwrap(), 1);
    server.restart();
    // The old connection is dead; the write fails, so the put cannot have been applied and
    // is sent on a new connection.
    assert_eq!(client.put("r.b", &2).unwrap(), 2);
    assert_eq!(client.get("r.b").unwrap(), Some(json!(2)));
    assert_eq!(client.stats().unwrap()["rev"], 2, "applied once");
}

#[test]
fn a_server_that_does_not_answer_times_out() {
    let (_dir, path, listener) = fake();
    let hold = thread::spawn(move || listener.accept().map(|(s, _)| s));
    let timeouts = Timeouts {
        connect: Some(Duration::from_secs(5)),
        request: Some(Duration::from_millis(200)),
    };
    let mut client = Client::connect_with(&path, timeouts).unwrap();
    let started = Instant::now();
    let err = client.get("a").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(3), "{err}");
    assert!(err.to_string().contains("no response within"), "{err}");
    drop(hold.join());
}

#[test]
fn a_full_backlog_times_out_the_connect() {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(&path).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    // With a backlog of 0 the kernel queues one connection; nobody accepts it, so the next
    // connect waits for room.
    let _queued = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let timeouts = Timeouts {
        connect: Some(Duration::from_millis(300)),
        request: None,
    };
    let started = Instant::now();
    let result = Client::connect_with(&path, timeouts);
    let took = started.elapsed();
    let err = result.err().expect("connecting to a full backlog fails");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(err.to_string().contains("did not accept"), "{err}");
}
