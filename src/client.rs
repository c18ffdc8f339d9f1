//! The blocking Rust client.
//!
//! ```no_run
//! use nkv::Client;
//!
//! # fn main() -> Result<(), nkv::Error> {
//! let mut client = Client::connect("/tmp/nkv/nkv.sock")?;
//! client.put("service.topicA.key1", &serde_json::json!({"on": true}))?;
//! let value = client.get("service.topicA.key1")?; // Some(json!({"on": true}))
//! println!("{value:?}");
//!
//! for event in client.subscribe("service")? {
//!     match event? {
//!         nkv::Event::Put { key, value, .. } => println!("{key} = {value}"),
//!         nkv::Event::Ready { .. } => println!("initial state complete"),
//!         other => println!("{other:?}"),
//!     }
//! #   break;
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::error::{Error, ErrorCode};

/// A key's value with the revision of its last change.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub value: Value,
    pub rev: u64,
}

/// One persistent connection to an nkv server; requests are answered in order on it.
pub struct Client {
    path: PathBuf,
    conn: Conn,
    /// No request has completed on this connection yet. The server closes a connection that
    /// sends nothing for `--idle-timeout`; a request failing on such a connection was never
    /// received, so it is safe to retry it once on a new one.
    fresh: bool,
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(path: &Path) -> io::Result<Conn> {
        let stream = UnixStream::connect(path)?;
        Ok(Conn {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one line and reads one response line.
    fn round_trip(&mut self, line: &str) -> io::Result<String> {
        let mut request = Vec::with_capacity(line.len() + 1);
        request.extend_from_slice(line.as_bytes());
        request.push(b'\n');
        self.writer.write_all(&request)?;
        self.read_line()
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut response = String::new();
        if self.reader.read_line(&mut response)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        if response.ends_with('\n') {
            response.pop();
        }
        Ok(response)
    }
}

impl Client {
    /// Connects to the server's socket.
    ///
    /// # Errors
    /// [`Error::Io`] when the socket cannot be reached.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        let path = path.as_ref().to_owned();
        Ok(Client {
            conn: Conn::open(&path)?,
            path,
            fresh: true,
        })
    }

    /// Sends one request line as is and returns the response line as is (without `\n`).
    ///
    /// # Errors
    /// [`Error::Io`] when the connection fails.
    pub fn raw(&mut self, line: &str) -> Result<String, Error> {
        let result = match self.conn.round_trip(line) {
            Err(e) if self.fresh && is_disconnect(&e) => {
                self.conn = Conn::open(&self.path)?;
                self.conn.round_trip(line)
            }
            other => other,
        };
        self.fresh = false;
        Ok(result?)
    }

    /// Sends a JSON-form request; returns the fields of a successful response.
    fn call(&mut self, request: &Value) -> Result<Map<String, Value>, Error> {
        let line = self.raw(&request.to_string())?;
        parse_response(&line)
    }

    /// A key's value, or `None` when there is no such key.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn get(&mut self, key: &str) -> Result<Option<Value>, Error> {
        Ok(self.get_entry(key)?.map(|e| e.value))
    }

    /// A key's value and revision, or `None` when there is no such key.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn get_entry(&mut self, key: &str) -> Result<Option<Entry>, Error> {
        match self.call(&json!({"op": "get", "key": key})) {
            Ok(mut fields) => Ok(Some(Entry {
                value: fields.remove("value").unwrap_or(Value::Null),
                rev: rev_of(&fields)?,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every key matching `pattern` (`*` or `prefix.*`) with its value.
    ///
    /// # Errors
    /// An invalid pattern, or a connection or server failure.
    pub fn get_matching(&mut self, pattern: &str) -> Result<BTreeMap<String, Value>, Error> {
        let mut fields = self.call(&json!({"op": "get", "key": pattern}))?;
        match fields.remove("values") {
            Some(Value::Object(values)) => Ok(values.into_iter().collect()),
            _ => Err(Error::Protocol(
                "a wildcard GET response without values".into(),
            )),
        }
    }

    /// Stores `value` under `key`; returns the change's revision.
    ///
    /// # Errors
    /// An invalid key, a value over the server's limit, or a connection or server failure.
    pub fn put<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<u64, Error> {
        let value = serde_json::to_value(value).map_err(|e| Error::Protocol(e.to_string()))?;
        let fields = self.call(&json!({"op": "put", "key": key, "value": value}))?;
        rev_of(&fields)
    }

    /// Deletes `key`; returns the delete's revision, or `None` when there was no such key.
    ///
    /// # Errors
    /// An invalid key, or a connection or server failure.
    pub fn delete(&mut self, key: &str) -> Result<Option<u64>, Error> {
        match self.call(&json!({"op": "del", "key": key})) {
            Ok(fields) => rev_of(&fields).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes every key matching `pattern`; returns how many were deleted.
    ///
    /// # Errors
    /// An invalid pattern, or a connection or server failure.
    pub fn delete_matching(&mut self, pattern: &str) -> Result<u64, Error> {
        let fields = self.call(&json!({"op": "del", "key": pattern}))?;
        number(&fields, "deleted")
    }

    /// The keys covered by `target` (a key and what is below it, or a pattern); all keys for
    /// `None`. Sorted.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure.
    pub fn keys(&mut self, target: Option<&str>) -> Result<Vec<String>, Error> {
        let request = match target {
            Some(t) => json!({"op": "keys", "key": t}),
            None => json!({"op": "keys"}),
        };
        let mut fields = self.call(&request)?;
        serde_json::from_value(fields.remove("keys").unwrap_or_default())
            .map_err(|e| Error::Protocol(format!("keys: {e}")))
    }

    /// Checks the server answers.
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn health(&mut self) -> Result<(), Error> {
        self.call(&json!({"op": "health"})).map(drop)
    }

    /// The server's version.
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn version(&mut self) -> Result<String, Error> {
        let mut fields = self.call(&json!({"op": "version"}))?;
        match fields.remove("version") {
            Some(Value::String(v)) => Ok(v),
            _ => Err(Error::Protocol(
                "a VERSION response without a version".into(),
            )),
        }
    }

    /// The server's counters (`connections`, `subscribers`, `keys`, `rev`, `events`,
    /// `coalesced`).
    ///
    /// # Errors
    /// A connection or server failure.
    pub fn stats(&mut self) -> Result<BTreeMap<String, u64>, Error> {
        let fields = self.call(&json!({"op": "stats"}))?;
        Ok(fields
            .into_iter()
            .filter_map(|(k, v)| v.as_u64().map(|n| (k, n)))
            .collect())
    }

    /// Subscribes to `target` on a new, dedicated connection (this client stays usable).
    /// The subscription yields the initial values, a [`Event::Ready`] marker, then changes.
    ///
    /// # Errors
    /// An invalid target, or a connection or server failure.
    pub fn subscribe(&self, target: &str) -> Result<Subscription, Error> {
        let mut sub = Subscription {
            conn: Conn::open(&self.path)?,
        };
        let line = sub
            .conn
            .round_trip(&json!({"op": "sub", "key": target}).to_string())?;
        parse_response(&line)?;
        Ok(sub)
    }
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

/// Parses a response line; an error response becomes [`Error::Server`].
fn parse_response(line: &str) -> Result<Map<String, Value>, Error> {
    let mut fields: Map<String, Value> =
        serde_json::from_str(line).map_err(|e| Error::Protocol(format!("{e}: {line:?}")))?;
    match fields.get("ok") {
        Some(Value::Bool(true)) => Ok(fields),
        Some(Value::Bool(false)) => {
            let text = |v: Option<Value>| match v {
                Some(Value::String(s)) => s,
                _ => String::new(),
            };
            let raw_code = text(fields.remove("error"));
            Err(Error::Server {
                code: ErrorCode::from_wire(&raw_code),
                raw_code,
                message: text(fields.remove("message")),
            })
        }
        _ => Err(Error::Protocol(format!("no \"ok\" field: {line:?}"))),
    }
}

fn number(fields: &Map<String, Value>, name: &str) -> Result<u64, Error> {
    fields
        .get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::Protocol(format!("response without {name:?}")))
}

fn rev_of(fields: &Map<String, Value>) -> Result<u64, Error> {
    number(fields, "rev")
}

/// An event on a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A key's value when the subscription started.
    Init {
        key: String,
        value: Value,
        rev: u64,
    },
    /// All initial values of subscription `sub` have been sent.
    Ready {
        sub: String,
        count: u64,
    },
    Put {
        key: String,
        value: Value,
        rev: u64,
    },
    Del {
        key: String,
        rev: u64,
    },
    /// The server is stopping; no more events follow.
    Shutdown,
}

impl Event {
    /// Parses an event line. Response lines (`{"ok":true}` after `subscribe`/`unsubscribe`)
    /// give `Ok(None)`; error responses give [`Error::Server`].
    ///
    /// # Errors
    /// An error response, or a line that is neither an event nor a response.
    pub fn parse(line: &str) -> Result<Option<Event>, Error> {
        let mut fields: Map<String, Value> =
            serde_json::from_str(line).map_err(|e| Error::Protocol(format!("{e}: {line:?}")))?;
        if fields.contains_key("ok") {
            return parse_response(line).map(|_| None);
        }
        let text = |fields: &mut Map<String, Value>, name: &str| match fields.remove(name) {
            Some(Value::String(s)) => Ok(s),
            _ => Err(Error::Protocol(format!("event without {name:?}: {line:?}"))),
        };
        let kind = text(&mut fields, "event")?;
        Ok(Some(match kind.as_str() {
            "init" | "put" => {
                let key = text(&mut fields, "key")?;
                let rev = rev_of(&fields)?;
                let value = fields.remove("value").unwrap_or(Value::Null);
                if kind == "init" {
                    Event::Init { key, value, rev }
                } else {
                    Event::Put { key, value, rev }
                }
            }
            "del" => Event::Del {
                key: text(&mut fields, "key")?,
                rev: rev_of(&fields)?,
            },
            "ready" => Event::Ready {
                sub: text(&mut fields, "sub")?,
                count: number(&fields, "count")?,
            },
            "shutdown" => Event::Shutdown,
            other => return Err(Error::Protocol(format!("unknown event {other:?}"))),
        }))
    }
}

/// A dedicated subscriber connection; iterate it for events. Ends after [`Event::Shutdown`] or
/// when the server closes the connection.
pub struct Subscription {
    conn: Conn,
}

impl Subscription {
    /// Adds another subscription on this connection; its initial values and marker follow in
    /// the event stream.
    ///
    /// # Errors
    /// The connection failed (a server error arrives in the stream).
    pub fn subscribe(&mut self, target: &str) -> Result<(), Error> {
        self.send(json!({"op": "sub", "key": target}))
    }

    /// Drops a subscription of this connection.
    ///
    /// # Errors
    /// The connection failed (a server error arrives in the stream).
    pub fn unsubscribe(&mut self, target: &str) -> Result<(), Error> {
        self.send(json!({"op": "unsub", "key": target}))
    }

    fn send(&mut self, request: Value) -> Result<(), Error> {
        let mut line = request.to_string();
        line.push('\n');
        self.conn.writer.write_all(line.as_bytes())?;
        Ok(())
    }

    /// The next line from the server as is, or `None` when the connection is closed.
    ///
    /// # Errors
    /// The connection failed.
    pub fn next_line(&mut self) -> Result<Option<String>, Error> {
        match self.conn.read_line() {
            Ok(line) => Ok(Some(line)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Iterator for Subscription {
    type Item = Result<Event, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let line = match self.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            };
            match Event::parse(&line) {
                Ok(Some(event)) => return Some(Ok(event)),
                Ok(None) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}
