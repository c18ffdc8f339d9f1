//! The Rust client: put, get, a wildcard read, then watch a keyspace.
//!
//! ```sh
//! cargo run --release --bin nkv-server &        # or any running server
//! cargo run --example rust_client -- /tmp/nkv/nkv.sock
//! ```

use std::process::ExitCode;

use nkv::{Client, Event};
use serde_json::json;

fn main() -> ExitCode {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/tmp/nkv/nkv.sock".to_owned());
    match run(&socket) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rust_client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(socket: &str) -> Result<(), nkv::Error> {
    let mut client = Client::connect(socket)?;
    let rev = client.put("example.sensor.temp", &json!({"celsius": 21.5}))?;
    println!("stored example.sensor.temp at rev {rev}");
    client.put("example.sensor.door", &"closed")?;

    if let Some(entry) = client.get_entry("example.sensor.temp")? {
        println!("example.sensor.temp = {} (rev {})", entry.value, entry.rev);
    }
    for (key, value) in client.get_matching("example.*")? {
        println!("  {key} = {value}");
    }

    // Watch the keyspace: the current values, the marker, then changes. This example makes
    // one change itself so it has something to show, and stops there.
    let mut events = client.subscribe("example")?;
    for event in events.by_ref() {
        match event? {
            Event::Init { key, value, .. } => println!("now:     {key} = {value}"),
            Event::Ready { count, .. } => {
                println!("({count} current values; watching for changes)");
                break;
            }
            other => println!("{other:?}"),
        }
    }
    client.put("example.sensor.door", &"open")?;
    if let Some(event) = events.next() {
        match event? {
            Event::Put { key, value, rev } => println!("changed: {key} = {value} (rev {rev})"),
            Event::Del { key, .. } => println!("deleted: {key}"),
            other => println!("{other:?}"),
        }
    }
    Ok(())
}
