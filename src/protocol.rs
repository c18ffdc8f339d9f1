//! The wire format, and the only module that knows it: a request line is parsed into a
//! [`Request`] here, and every [`Response`] and [`Event`] line is written here.
//!
//! The shapes of the lines are [`crate::wire`]'s types, shared with the client; this module
//! maps the server's own types onto them. Values travel as JSON text and are kept as received
//! ([`Value`]): a GET copies the stored text into the response without re-serialising it.

use std::fmt;

use serde::ser::{Serialize, SerializeMap, Serializer};

use crate::class::Class;
use crate::disk::Epoch;
use crate::error::ErrorCode;
use crate::key::{Key, KeyError, Target};
use crate::value::Value;
use crate::wire::{self, JsonRequest, Op, Raw, Reply};

pub use crate::wire::{Stats, Subscriber as SubscriberInfo};

/// One parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Put {
        key: Key,
        value: Value,
        /// Compare-and-set: store only if the key is at this revision (0: absent). `PUTIF`, or
        /// JSON `"if_rev"`.
        if_rev: Option<u64>,
        /// JSON `"session":true`: a session key owned by this connection.
        session: bool,
    },
    Get(Target),
    Del(Target),
    /// Delete a key only at this revision: `DELIF`, or JSON `del` with `"if_rev"`.
    DelIf {
        key: Key,
        rev: u64,
    },
    /// Keys covered by the target (a key covers itself and what is below it); `None` = all.
    Keys(Option<Target>),
    Sub(Target),
    /// Resume: only what changed after the revision (`SUB <target> FROM <rev> [EPOCH <id>]`,
    /// JSON `"from_rev"` and `"epoch"`).
    SubFrom(Target, Resume),
    Unsub(Target),
    Hello(String),
    Trace(Key),
    Stats,
    Health,
    Version,
    Help,
    Quit,
}

impl Request {
    /// Whether the request runs in a short, bounded time that waits on nothing: no disk
    /// write (a put may wait for an fsync, or in the revision turnstile behind one), no
    /// pattern over the whole store. The accepting thread runs only these itself; before any
    /// other it passes accepting on (`server::accept`), so a one-shot `DEL big.*` or a put on
    /// a slow disk does not hold every new connection up (found by the issue-11 adversary).
    pub fn is_quick(&self) -> bool {
        matches!(
            self,
            Request::Get(Target::Key(_))
                | Request::Hello(_)
                | Request::Trace(_)
                | Request::Stats
                | Request::Health
                | Request::Version
                | Request::Help
                | Request::Quit
        )
    }
}

/// Where a resume starts: the revision, and the history (`epoch` of the `ready` it came
/// from) it belongs to, when the client names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    pub rev: u64,
    pub epoch: Option<Epoch>,
}

impl fmt::Display for Resume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.epoch {
            Some(epoch) => write!(f, "{} epoch {epoch}", self.rev),
            None => write!(f, "{}", self.rev),
        }
    }
}

/// An epoch named by a resume: the 32 hex digits a `ready` carries.
fn parse_epoch(text: &str) -> Result<Epoch, RequestError> {
    Epoch::parse(text).ok_or_else(|| {
        RequestError::bad(format!(
            "{:?} is not an epoch (the 32 hex digits of a ready's \"epoch\")",
            truncate(text, 40)
        ))
    })
}

/// A request with its optional JSON-form `id`, kept as raw JSON text to echo back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub request: Request,
    pub id: Option<Box<str>>,
}

/// A request that could not be parsed: the error response to send, with the `id` if one was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<Box<str>>,
}

impl RequestError {
    fn bad(message: impl Into<String>) -> RequestError {
        RequestError {
            code: ErrorCode::BadRequest,
            message: message.into(),
            id: None,
        }
    }

    fn with_id(mut self, id: Option<Box<str>>) -> RequestError {
        self.id = id;
        self
    }

    pub fn into_response(self) -> (Response, Option<Box<str>>) {
        (Response::Error(self.code, self.message), self.id)
    }
}

impl From<KeyError> for RequestError {
    fn from(err: KeyError) -> RequestError {
        RequestError {
            code: ErrorCode::InvalidKey,
            message: err.to_string(),
            id: None,
        }
    }
}

pub const HELP: &str = "commands: PUT <key> <value> | PUTIF <key> <rev> <value> | DELIF <key> <rev> | SUB <key> FROM <rev> [EPOCH <id>] | GET <key>|<prefix>.*|* | DEL <key>|<prefix>.*|* | KEYS [<prefix>.*] | SUB <key>|<prefix>.*|* | UNSUB <key> | HELLO <name> | TRACE <key> | STATS | HEALTH | VERSION | HELP | QUIT; or one JSON object per line: {\"op\":\"put\",\"key\":\"a.b\",\"value\":1,\"id\":7}; see docs/PROTOCOL.md";

/// Parses one request line (without its `\n`; a trailing `\r` is ignored).
///
/// `max_value` is the largest value accepted, in bytes of JSON text.
///
/// # Errors
/// The error response for a malformed line, an invalid key or an oversized value.
pub fn parse_request(line: &[u8], max_value: usize) -> Result<Envelope, RequestError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).map_err(|err| {
        RequestError::bad(format!(
            "line is not valid UTF-8 (at byte {})",
            err.valid_up_to()
        ))
    })?;
    if let Some(pos) = line.find('\0') {
        return Err(RequestError::bad(format!(
            "line contains a NUL byte (at byte {pos})"
        )));
    }
    if line.trim().is_empty() {
        return Err(RequestError::bad(
            "empty line; send a command such as GET <key>, or HELP",
        ));
    }
    if line.starts_with('{') {
        parse_json(line, max_value)
    } else {
        parse_text(line, max_value).map(|request| Envelope { request, id: None })
    }
}

fn parse_text(line: &str, max_value: usize) -> Result<Request, RequestError> {
    let (verb, rest) = match line.split_once(' ') {
        Some((verb, rest)) => (verb, Some(rest)),
        None => (line, None),
    };
    let Some(op) = Op::parse(verb) else {
        return Err(RequestError::bad(format!(
            "unknown command {:?}; send HELP for the list",
            truncate(verb, 40)
        )));
    };
    let upper = op.as_str().to_ascii_uppercase();
    let mut args = Args {
        verb: &upper,
        rest,
        used: 0,
    };
    let request = match op {
        Op::Put => {
            let key = Key::parse(args.next("a key")?)?;
            let text = args
                .rest
                .take()
                .ok_or_else(|| RequestError::bad("PUT needs a value after the key"))?;
            return Ok(Request::Put {
                key,
                value: text_value(text, max_value)?,
                if_rev: None,
                session: false,
            });
        }
        Op::PutIf => {
            let key = Key::parse(args.next("a key")?)?;
            let rev = parse_rev(args.next("a revision")?)?;
            let text = args
                .rest
                .take()
                .ok_or_else(|| RequestError::bad("PUTIF needs a value after the revision"))?;
            return Ok(Request::Put {
                key,
                value: text_value(text, max_value)?,
                if_rev: Some(rev),
                session: false,
            });
        }
        Op::DelIf => Request::DelIf {
            key: Key::parse(args.next("a key")?)?,
            rev: parse_rev(args.next("a revision")?)?,
        },
        Op::Get => Request::Get(Target::parse(args.next("a key or pattern")?)?),
        Op::Del => Request::Del(Target::parse(args.next("a key or pattern")?)?),
        Op::Keys => Request::Keys(args.optional().map(Target::parse).transpose()?),
        Op::Sub => {
            let target = Target::parse(args.next("a key or pattern")?)?;
            match args.optional() {
                None => Request::Sub(target),
                Some(word) if word.eq_ignore_ascii_case("FROM") => {
                    let rev = parse_rev(args.next("a revision after FROM")?)?;
                    let epoch = match args.optional() {
                        None => None,
                        Some(word) if word.eq_ignore_ascii_case("EPOCH") => {
                            Some(parse_epoch(args.next("an epoch after EPOCH")?)?)
                        }
                        Some(other) => {
                            return Err(RequestError::bad(format!(
                                "SUB <target> FROM <rev> may be followed by EPOCH <id>; unexpected {:?}",
                                truncate(other, 40)
                            )))
                        }
                    };
                    Request::SubFrom(target, Resume { rev, epoch })
                }
                Some(other) => {
                    return Err(RequestError::bad(format!(
                        "SUB takes a key or pattern, optionally followed by FROM <rev>; unexpected {:?}",
                        truncate(other, 40)
                    )))
                }
            }
        }
        Op::Unsub => Request::Unsub(Target::parse(args.next("a key or pattern")?)?),
        Op::Hello => Request::Hello(parse_name(args.next("a name")?)?),
        Op::Trace => Request::Trace(Key::parse(args.next("a key")?)?),
        Op::Stats => Request::Stats,
        Op::Health => Request::Health,
        Op::Version => Request::Version,
        Op::Help => Request::Help,
        Op::Quit => Request::Quit,
    };
    args.finish()?;
    Ok(request)
}

/// The space-separated arguments of a text request.
struct Args<'a> {
    verb: &'a str,
    rest: Option<&'a str>,
    used: usize,
}

impl<'a> Args<'a> {
    fn next(&mut self, what: &str) -> Result<&'a str, RequestError> {
        self.optional()
            .ok_or_else(|| RequestError::bad(format!("{} needs {what}", self.verb)))
    }

    fn optional(&mut self) -> Option<&'a str> {
        let rest = self.rest.take()?;
        self.used += 1;
        match rest.split_once(' ') {
            Some((arg, rest)) => {
                self.rest = Some(rest);
                Some(arg)
            }
            None => Some(rest),
        }
    }

    fn finish(self) -> Result<(), RequestError> {
        match self.rest {
            None => Ok(()),
            Some(extra) => Err(RequestError::bad(format!(
                "{} takes {} argument{}; unexpected {:?}",
                self.verb,
                self.used,
                if self.used == 1 { "" } else { "s" },
                truncate(extra, 40)
            ))),
        }
    }
}

/// A revision argument: decimal digits only (`u64::from_str` also takes a `+`), up to 2^63-1.
fn parse_rev(text: &str) -> Result<u64, RequestError> {
    Some(text)
        .filter(|t| t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u64>().ok())
        .filter(|&r| r <= crate::disk::MAX_REV)
        .ok_or_else(|| {
            RequestError::bad(format!(
                "{:?} is not a revision (a whole number from 0 to 2^63-1)",
                truncate(text, 40)
            ))
        })
}

/// The text-form value: stored as the JSON it spells if it is JSON, else as a JSON string.
fn text_value(text: &str, max_value: usize) -> Result<Value, RequestError> {
    let trimmed = text.trim_matches(|c| matches!(c, ' ' | '\t' | '\r' | '\n'));
    // One copy, into the shared value: a put holds its line and its value, nothing more.
    if !trimmed.is_empty() && readable_json(trimmed).is_ok() {
        check_size(trimmed, max_value)?;
        return Ok(Value::from(trimmed));
    }
    let json = serde_json::to_string(text).map_err(|err| RequestError::bad(err.to_string()))?;
    check_size(&json, max_value)?;
    Ok(Value::from(json))
}

fn check_size(json: &str, max_value: usize) -> Result<(), RequestError> {
    if json.len() > max_value {
        return Err(RequestError {
            code: ErrorCode::TooLarge,
            message: format!(
                "value is {} bytes, the limit is {max_value} (--max-value-bytes)",
                json.len()
            ),
            id: None,
        });
    }
    Ok(())
}

/// Whether `json` is JSON that every client can read back (nesting at most 128 deep, numbers
/// within `f64`, no lone UTF-16 surrogates), checked without building a tree: see
/// [`crate::json::validate`].
fn readable_json(json: &str) -> Result<(), serde_json::Error> {
    crate::json::validate(json)
}

fn parse_name(name: &str) -> Result<String, RequestError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@#".contains(&b));
    if valid {
        Ok(name.to_owned())
    } else {
        Err(RequestError::bad(
            "a name is 1 to 64 ASCII letters, digits or _ - . : @ #",
        ))
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((pos, _)) => &text[..pos],
        None => text,
    }
}

fn parse_json(line: &str, max_value: usize) -> Result<Envelope, RequestError> {
    let req: JsonRequest = serde_json::from_str(line).map_err(|err| {
        let id = JsonRequest::id_of(line)
            .filter(|raw| readable_json(raw.get()).is_ok())
            .map(|raw| Box::from(raw.get()));
        RequestError::bad(format!("invalid JSON request: {err}")).with_id(id)
    })?;
    if let Some(raw) = req.id {
        readable_json(raw.get())
            .map_err(|e| RequestError::bad(format!("invalid JSON request: id: {e}")))?;
    }
    let id: Option<Box<str>> = req.id.map(|raw| Box::from(raw.get()));
    json_request(&req, max_value)
        .map(|request| Envelope {
            request,
            id: id.clone(),
        })
        .map_err(|err| err.with_id(id))
}

fn json_request(req: &JsonRequest, max_value: usize) -> Result<Request, RequestError> {
    let Some(parsed) = Op::parse(&req.op) else {
        return Err(RequestError::bad(format!(
            "unknown op {:?}; send HELP for the list",
            truncate(&req.op, 40)
        )));
    };
    let op = req.op.to_ascii_lowercase();
    let key = || {
        req.key
            .as_deref()
            .ok_or_else(|| RequestError::bad(format!("op {op:?} needs a \"key\"")))
    };
    let unexpected = |field: &str, present: bool| {
        if present {
            Err(RequestError::bad(format!(
                "op {op:?} does not take a {field:?} field"
            )))
        } else {
            Ok(())
        }
    };
    if parsed != Op::Put {
        unexpected("value", req.value.is_some())?;
    }
    if parsed != Op::Hello {
        unexpected("name", req.name.is_some())?;
    }
    if !matches!(op.as_str(), "put" | "del" | "delete") {
        unexpected("if_rev", req.if_rev.is_some())?;
    }
    if op != "put" {
        unexpected("session", req.session.is_some())?;
    }
    if !matches!(op.as_str(), "sub" | "subscribe") {
        unexpected("from_rev", req.from_rev.is_some())?;
    }
    if req.from_rev.is_none() && req.epoch.is_some() {
        return Err(RequestError::bad(
            "\"epoch\" names the history of a \"from_rev\"; it goes only with one",
        ));
    }
    for rev in [req.if_rev, req.from_rev].into_iter().flatten() {
        if rev > crate::disk::MAX_REV {
            return Err(RequestError::bad(format!(
                "{rev} is not a revision (a whole number from 0 to 2^63-1)"
            )));
        }
    }
    let takes_key = matches!(
        parsed,
        Op::Put | Op::Get | Op::Del | Op::Keys | Op::Sub | Op::Unsub | Op::Trace
    );
    unexpected("key", !takes_key && req.key.is_some())?;
    Ok(match parsed {
        Op::Put => {
            let key = Key::parse(key()?)?;
            let raw = req
                .value
                .ok_or_else(|| RequestError::bad("op \"put\" needs a \"value\""))?;
            check_size(raw.get(), max_value)?;
            readable_json(raw.get())
                .map_err(|e| RequestError::bad(format!("invalid JSON request: value: {e}")))?;
            Request::Put {
                key,
                value: Value::from(raw.get()),
                if_rev: req.if_rev,
                session: req.session.unwrap_or(false),
            }
        }
        Op::Get => Request::Get(Target::parse(key()?)?),
        Op::Del => match (Target::parse(key()?)?, req.if_rev) {
            (target, None) => Request::Del(target),
            (Target::Key(key), Some(rev)) => Request::DelIf { key, rev },
            (Target::Pattern(_), Some(_)) => {
                return Err(RequestError::bad(
                    "\"if_rev\" applies to one key, not a pattern",
                ))
            }
        },
        Op::Keys => Request::Keys(req.key.as_deref().map(Target::parse).transpose()?),
        Op::Sub => match req.from_rev {
            None => Request::Sub(Target::parse(key()?)?),
            Some(rev) => Request::SubFrom(
                Target::parse(key()?)?,
                Resume {
                    rev,
                    epoch: req.epoch.as_deref().map(parse_epoch).transpose()?,
                },
            ),
        },
        Op::Unsub => Request::Unsub(Target::parse(key()?)?),
        Op::Trace => Request::Trace(Key::parse(key()?)?),
        Op::PutIf | Op::DelIf => {
            return Err(RequestError::bad(format!(
                "op {op:?} is the text form; in JSON use \"put\" or \"del\" with \"if_rev\""
            )))
        }
        Op::Hello => Request::Hello(parse_name(
            req.name
                .as_deref()
                .ok_or_else(|| RequestError::bad("op \"hello\" needs a \"name\""))?,
        )?),
        Op::Stats => Request::Stats,
        Op::Health => Request::Health,
        Op::Version => Request::Version,
        Op::Help => Request::Help,
        Op::Quit => Request::Quit,
    })
}

/// One response line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Ok,
    Rev(u64),
    Value {
        key: Key,
        value: Value,
        rev: u64,
        class: Class,
    },
    Values(Vec<(Key, Value)>),
    Keys(Vec<Key>),
    Deleted(usize),
    Trace(Key, Vec<SubscriberInfo>),
    Stats(Stats),
    Health,
    Version,
    Help,
    Error(ErrorCode, String),
    /// A compare-and-set that did not match: the message and the key's current revision.
    Conflict(String, u64),
}

impl Response {
    pub fn error(code: ErrorCode, message: impl fmt::Display) -> Response {
        Response::Error(code, message.to_string())
    }

    /// Appends the response line, `\n` included, echoing `id` (raw JSON text) when given.
    pub fn write(&self, id: Option<&str>, out: &mut Vec<u8>) {
        fn ok<B: Serialize>(body: B, id: Option<&str>, out: &mut Vec<u8>) {
            let reply = Reply {
                ok: true,
                body,
                id: id.map(Raw),
            };
            wire::write_line(&reply, out);
        }
        match self {
            Response::Ok => ok(wire::Done {}, id, out),
            Response::Rev(rev) => ok(wire::Rev { rev: *rev }, id, out),
            Response::Value {
                key,
                value,
                rev,
                class,
            } => ok(
                wire::Got {
                    key: key.as_str(),
                    value: Raw(value),
                    rev: *rev,
                    class: class.as_str(),
                },
                id,
                out,
            ),
            Response::Values(values) => ok(
                wire::Values {
                    values: RawMap(values),
                },
                id,
                out,
            ),
            Response::Keys(keys) => ok(wire::KeyList { keys: KeySeq(keys) }, id, out),
            Response::Deleted(n) => ok(wire::Deleted { deleted: *n as u64 }, id, out),
            Response::Trace(key, subscribers) => ok(
                wire::Traced {
                    key: key.as_str(),
                    subscribers,
                },
                id,
                out,
            ),
            Response::Stats(stats) => ok(stats, id, out),
            Response::Health => ok(wire::Health { status: "ok" }, id, out),
            Response::Version => ok(
                wire::Version {
                    version: env!("CARGO_PKG_VERSION"),
                },
                id,
                out,
            ),
            Response::Help => ok(wire::Help { help: HELP }, id, out),
            Response::Error(code, message) => {
                let reply = Reply {
                    ok: false,
                    body: wire::Failure {
                        error: code.as_str(),
                        message: message.as_str(),
                    },
                    id: id.map(Raw),
                };
                wire::write_line(&reply, out);
            }
            Response::Conflict(message, rev) => {
                let reply = Reply {
                    ok: false,
                    body: wire::Conflict {
                        error: ErrorCode::Conflict.as_str(),
                        message: message.as_str(),
                        rev: *rev,
                    },
                    id: id.map(Raw),
                };
                wire::write_line(&reply, out);
            }
        }
    }
}

impl Response {
    /// Writes the response like [`Response::write`], but hands `out` to `flush` whenever it
    /// holds `limit` bytes or more, so a large reply (`GET *`) is never built in one buffer: the
    /// values are shared with the map, only `limit` bytes are formatted at a time.
    ///
    /// # Errors
    /// What `flush` returns.
    pub fn write_in_parts(
        &self,
        id: Option<&str>,
        out: &mut Vec<u8>,
        limit: usize,
        flush: &mut dyn FnMut(&mut Vec<u8>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let Response::Values(values) = self else {
            self.write(id, out);
            return if out.len() >= limit {
                flush(out)
            } else {
                Ok(())
            };
        };
        out.extend_from_slice(b"{\"ok\":true,\"values\":{");
        for (i, (key, value)) in values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'"');
            out.extend_from_slice(key.as_str().as_bytes());
            out.extend_from_slice(b"\":");
            if out.len() + value.len() > limit && !out.is_empty() {
                flush(out)?;
            }
            out.extend_from_slice(value.as_bytes());
            if out.len() >= limit {
                flush(out)?;
            }
        }
        out.push(b'}');
        if let Some(id) = id {
            out.extend_from_slice(b",\"id\":");
            out.extend_from_slice(id.as_bytes());
        }
        out.extend_from_slice(b"}\n");
        Ok(())
    }
}

/// A GET pattern's matches as a JSON object, the stored values written as they are.
struct RawMap<'a>(&'a [(Key, Value)]);

impl Serialize for RawMap<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            map.serialize_entry(key.as_str(), &Raw(value))?;
        }
        map.end()
    }
}

/// Keys as a JSON array of strings.
struct KeySeq<'a>(&'a [Key]);

impl Serialize for KeySeq<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(Key::as_str))
    }
}

/// What happened to a key, as a subscriber is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The key's value when the subscription started.
    Init,
    Put,
    Del,
}

/// One change (or initial value) of one key, sent to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub key: Key,
    /// `None` for a delete.
    pub value: Option<Value>,
    pub rev: u64,
}

impl Event {
    /// Appends the event line, `\n` included.
    pub fn write(&self, out: &mut Vec<u8>) {
        let key = self.key.as_str();
        let rev = self.rev;
        let value = self.value.as_deref().map(Raw);
        let event: wire::Event<&str, Raw> = match (&self.kind, value) {
            (EventKind::Init, Some(value)) => wire::Event::Init { key, value, rev },
            (EventKind::Put, Some(value)) => wire::Event::Put { key, value, rev },
            // An init or put always has a value; without one the key is gone, as for a delete.
            (EventKind::Del, _) | (_, None) => wire::Event::Del { key, rev },
        };
        wire::write_line(&event, out);
    }
}

/// The marker after a subscription's initial values: `rev` is the revision the snapshot was
/// taken at (every change up to it is in the snapshot, every later one follows).
pub fn write_ready(sub: &Target, count: usize, rev: u64, epoch: Epoch, out: &mut Vec<u8>) {
    let sub = sub.to_string();
    let epoch = epoch.to_string();
    let event: wire::Event<&str, Raw> = wire::Event::Ready {
        sub: &sub,
        count: count as u64,
        rev,
        epoch: Some(&epoch),
    };
    wire::write_line(&event, out);
}

/// A resume the server could not answer from its history: the full snapshot follows.
pub fn write_reset(sub: &Target, out: &mut Vec<u8>) {
    let sub = sub.to_string();
    let event: wire::Event<&str, Raw> = wire::Event::Reset { sub: &sub };
    wire::write_line(&event, out);
}

/// The last line a subscriber gets when the server stops (`wire::Event::Shutdown`; a test
/// checks they agree).
pub const SHUTDOWN_EVENT: &[u8] = b"{\"event\":\"shutdown\"}\n";

impl Request {
    /// The request's operation, for logs.
    pub fn op(&self) -> Op {
        match self {
            Request::Put { .. } => Op::Put,
            Request::Get(_) => Op::Get,
            Request::Del(_) => Op::Del,
            Request::DelIf { .. } => Op::DelIf,
            Request::SubFrom(..) => Op::Sub,
            Request::Keys(_) => Op::Keys,
            Request::Sub(_) => Op::Sub,
            Request::Unsub(_) => Op::Unsub,
            Request::Hello(_) => Op::Hello,
            Request::Trace(_) => Op::Trace,
            Request::Stats => Op::Stats,
            Request::Health => Op::Health,
            Request::Version => Op::Version,
            Request::Help => Op::Help,
            Request::Quit => Op::Quit,
        }
    }

    /// What a log line may say about the request: its verb and key, never a value.
    pub fn summary(&self) -> String {
        match self {
            Request::Put { key, .. } | Request::Trace(key) => {
                format!("{} {key}", self.op().as_str())
            }
            Request::Get(t) | Request::Del(t) | Request::Sub(t) | Request::Unsub(t) => {
                format!("{} {t}", self.op().as_str())
            }
            Request::Keys(Some(t)) => format!("keys {t}"),
            Request::Hello(name) => format!("hello {name}"),
            _ => self.op().as_str().to_owned(),
        }
    }
}

impl Response {
    /// The outcome, for logs: `ok` or the error code.
    pub fn outcome(&self) -> &'static str {
        match self {
            Response::Error(code, _) => code.as_str(),
            _ => "ok",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Pattern;

    const MAX: usize = 1024;

    fn check(line: &str, expected: Result<Request, (ErrorCode, &str)>) {
        let got = parse_request(line.as_bytes(), MAX)
            .map(|e| e.request)
            .map_err(|e| (e.code, e.message));
        match (&got, &expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "line {line:?}"),
            (Err((code, message)), Err((want_code, want_part))) => {
                assert_eq!(code, want_code, "line {line:?}: {message}");
                assert!(
                    message.contains(want_part),
                    "line {line:?}: {message:?} lacks {want_part:?}"
                );
            }
            _ => panic!("line {line:?}: got {got:?}, want {expected:?}"),
        }
    }

    fn key(text: &str) -> Key {
        Key::parse(text).unwrap()
    }

    const EPOCH: &str = "0123456789abcdef0123456789abcdef";

    fn from(rev: u64, epoch: Option<&str>) -> Resume {
        Resume {
            rev,
            epoch: epoch.map(|e| Epoch::parse(e).unwrap()),
        }
    }

    fn put(k: &str, v: &str) -> Result<Request, (ErrorCode, &'static str)> {
        Ok(Request::Put {
            key: key(k),
            value: Value::from(v),
            if_rev: None,
            session: false,
        })
    }

    #[test]
    fn text_put_stores_json_or_a_string() {
        check("PUT a.b 42", put("a.b", "42"));
        check("put a.b {\"x\": [1, 2]}", put("a.b", "{\"x\": [1, 2]}"));
        check("PUT a.b hello world", put("a.b", "\"hello world\""));
        check("PUT a.b \"quoted\"", put("a.b", "\"quoted\""));
        check("PUT a.b say \"hi\"\\", put("a.b", r#""say \"hi\"\\""#));
        check("PUT a.b ", put("a.b", "\"\""));
        check("PUT a.b 1\r", put("a.b", "1"));
        check("PUT a.b", Err((ErrorCode::BadRequest, "needs a value")));
        check("PUT", Err((ErrorCode::BadRequest, "needs a key")));
    }

    #[test]
    fn text_reads_and_patterns() {
        check("get a.b", Ok(Request::Get(Target::Key(key("a.b")))));
        check("GET *", Ok(Request::Get(Target::Pattern(Pattern::All))));
        check(
            "Del a.*",
            Ok(Request::Del(Target::Pattern(Pattern::Below(key("a"))))),
        );
        check("KEYS", Ok(Request::Keys(None)));
        check(
            "KEYS a.*",
            Ok(Request::Keys(Some(Target::parse("a.*").unwrap()))),
        );
        check("QUIT", Ok(Request::Quit));
        check("SUB a", Ok(Request::Sub(Target::Key(key("a")))));
        check("HELLO svc-1", Ok(Request::Hello("svc-1".into())));
    }

    #[test]
    fn text_errors_name_the_problem() {
        check("", Err((ErrorCode::BadRequest, "empty line")));
        check("   ", Err((ErrorCode::BadRequest, "empty line")));
        check(
            "FROB x",
            Err((ErrorCode::BadRequest, "unknown command \"FROB\"")),
        );
        check("GET", Err((ErrorCode::BadRequest, "GET needs a key")));
        check("GET a b", Err((ErrorCode::BadRequest, "unexpected \"b\"")));
        check("HEALTH now", Err((ErrorCode::BadRequest, "unexpected")));
        check("GET ../x", Err((ErrorCode::InvalidKey, "empty segment")));
        check("GET a/b", Err((ErrorCode::InvalidKey, "'/'")));
        check("PUT a.* 1", Err((ErrorCode::InvalidKey, "'*'")));
        check("GET a\0", Err((ErrorCode::BadRequest, "NUL")));
        check("HELLO bad/name", Err((ErrorCode::BadRequest, "name")));
        check(
            &format!("PUT a {}", "x".repeat(MAX)),
            Err((ErrorCode::TooLarge, "limit is 1024")),
        );
        let err = parse_request(b"GET \xff", MAX).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert!(err.message.contains("UTF-8"));
    }

    #[test]
    fn json_form_and_id_echo() {
        let env =
            parse_request(br#"{"op":"put","key":"a.b","value":{"x":1},"id":7}"#, MAX).unwrap();
        assert_eq!(env.request, put("a.b", "{\"x\":1}").unwrap());
        assert_eq!(env.id.as_deref(), Some("7"));
        check(r#"{"op":"put","key":"a","value":null}"#, put("a", "null"));
        check(
            r#"{"op":"put","key":"a","value":"two\nlines"}"#,
            put("a", r#""two\nlines""#),
        );
        check(r#"{"op":"KEYS"}"#, Ok(Request::Keys(None)));
        check(
            r#"{"op":"put","key":"a"}"#,
            Err((ErrorCode::BadRequest, "needs a \"value\"")),
        );
        check(
            r#"{"op":"get"}"#,
            Err((ErrorCode::BadRequest, "needs a \"key\"")),
        );
        check(
            r#"{"op":"get","key":5}"#,
            Err((ErrorCode::BadRequest, "invalid JSON")),
        );
        check(
            r#"{"op":"get","key":"a","x":1}"#,
            Err((ErrorCode::BadRequest, "unknown field")),
        );
        check(
            r#"{"op":"health","key":"a"}"#,
            Err((ErrorCode::BadRequest, "does not take")),
        );
        check(
            r#"{"op":"nope"}"#,
            Err((ErrorCode::BadRequest, "unknown op")),
        );
        check(
            r#"{"op":"get""#,
            Err((ErrorCode::BadRequest, "invalid JSON")),
        );
        let deep = format!(
            "{{\"op\":\"put\",\"key\":\"a\",\"value\":{}",
            "[".repeat(10_000)
        );
        check(&deep, Err((ErrorCode::BadRequest, "invalid JSON")));
        let err = parse_request(br#"{"op":"get","key":"../x","id":"r1"}"#, MAX).unwrap_err();
        assert_eq!(
            (err.code, err.id.as_deref()),
            (ErrorCode::InvalidKey, Some("\"r1\""))
        );
        let err = parse_request(br#"{"op":"get","bogus":1,"id":3}"#, MAX).unwrap_err();
        assert_eq!(err.id.as_deref(), Some("3"));
    }

    #[test]
    fn compare_and_set_sessions_and_resume_parse() {
        let cas = |k: &str, rev, v: &str| {
            Ok(Request::Put {
                key: key(k),
                value: Value::from(v),
                if_rev: Some(rev),
                session: false,
            })
        };
        check("PUTIF a.b 3 {\"x\":1}", cas("a.b", 3, "{\"x\":1}"));
        check("putif a 0 hello world", cas("a", 0, "\"hello world\""));
        check(
            "PUTIF a x 1",
            Err((ErrorCode::BadRequest, "not a revision")),
        );
        check("PUTIF a 1", Err((ErrorCode::BadRequest, "needs a value")));
        check(
            "PUTIF a 9223372036854775808 1",
            Err((ErrorCode::BadRequest, "not a revision")),
        );
        check(
            "DELIF a 7",
            Ok(Request::DelIf {
                key: key("a"),
                rev: 7,
            }),
        );
        check("DELIF a", Err((ErrorCode::BadRequest, "needs a revision")));
        check("DELIF a.* 1", Err((ErrorCode::InvalidKey, "'*'")));
        check(
            "SUB a FROM 12",
            Ok(Request::SubFrom(Target::Key(key("a")), from(12, None))),
        );
        check(
            "SUB a FROM 12 epoch 0123456789abcdef0123456789ABCDEF",
            Ok(Request::SubFrom(
                Target::Key(key("a")),
                from(12, Some(EPOCH)),
            )),
        );
        check(
            "SUB a FROM 1 EPOCH",
            Err((ErrorCode::BadRequest, "after EPOCH")),
        );
        check(
            "SUB a FROM 1 EPOCH 12g",
            Err((ErrorCode::BadRequest, "not an epoch")),
        );
        check(
            "SUB a FROM 1 EPOCH 0123456789abcdef0123456789abcdef0",
            Err((ErrorCode::BadRequest, "not an epoch")),
        );
        check(
            "SUB a FROM 1 SINCE 2",
            Err((ErrorCode::BadRequest, "EPOCH <id>")),
        );
        check(
            "SUB a FROM 1 EPOCH 0123456789abcdef0123456789abcdef x",
            Err((ErrorCode::BadRequest, "unexpected")),
        );
        check(
            "SUB * from 0",
            Ok(Request::SubFrom(
                Target::Pattern(Pattern::All),
                from(0, None),
            )),
        );
        check("SUB a FROM", Err((ErrorCode::BadRequest, "after FROM")));
        check(
            "SUB a FROM +3",
            Err((ErrorCode::BadRequest, "not a revision")),
        );
        check(
            "PUTIF a +1 v",
            Err((ErrorCode::BadRequest, "not a revision")),
        );
        check("DELIF a +0", Err((ErrorCode::BadRequest, "not a revision")));
        check("SUB a SINCE 3", Err((ErrorCode::BadRequest, "FROM <rev>")));
        check("SUB a FROM 3 4", Err((ErrorCode::BadRequest, "unexpected")));
        check(
            r#"{"op":"put","key":"a","value":1,"if_rev":0,"session":true}"#,
            Ok(Request::Put {
                key: key("a"),
                value: Value::from("1"),
                if_rev: Some(0),
                session: true,
            }),
        );
        check(
            r#"{"op":"del","key":"a","if_rev":5}"#,
            Ok(Request::DelIf {
                key: key("a"),
                rev: 5,
            }),
        );
        check(
            r#"{"op":"del","key":"a.*","if_rev":5}"#,
            Err((ErrorCode::BadRequest, "not a pattern")),
        );
        check(
            r#"{"op":"sub","key":"a","from_rev":9}"#,
            Ok(Request::SubFrom(Target::Key(key("a")), from(9, None))),
        );
        check(
            r#"{"op":"sub","key":"a","from_rev":9,"epoch":"0123456789abcdef0123456789abcdef"}"#,
            Ok(Request::SubFrom(
                Target::Key(key("a")),
                from(9, Some(EPOCH)),
            )),
        );
        check(
            r#"{"op":"sub","key":"a","from_rev":9,"epoch":"x"}"#,
            Err((ErrorCode::BadRequest, "not an epoch")),
        );
        check(
            r#"{"op":"sub","key":"a","epoch":"0123456789abcdef0123456789abcdef"}"#,
            Err((ErrorCode::BadRequest, "goes only with")),
        );
        check(
            r#"{"op":"sub","key":"a","from_rev":9,"epoch":7}"#,
            Err((ErrorCode::BadRequest, "")),
        );
        check(
            r#"{"op":"get","key":"a","if_rev":1}"#,
            Err((ErrorCode::BadRequest, "does not take")),
        );
        check(
            r#"{"op":"del","key":"a","session":true}"#,
            Err((ErrorCode::BadRequest, "does not take")),
        );
        check(
            r#"{"op":"put","key":"a","value":1,"from_rev":1}"#,
            Err((ErrorCode::BadRequest, "does not take")),
        );
        check(
            r#"{"op":"put","key":"a","value":1,"if_rev":-1}"#,
            Err((ErrorCode::BadRequest, "invalid JSON")),
        );
        check(
            r#"{"op":"put","key":"a","value":1,"session":"yes"}"#,
            Err((ErrorCode::BadRequest, "invalid JSON")),
        );
    }

    #[test]
    fn responses_are_one_json_line() {
        let cases = [
            (Response::Rev(3), Some("7"), r#"{"ok":true,"rev":3,"id":7}"#),
            (
                Response::Value {
                    key: key("a.b"),
                    value: Value::from("{\"x\":1}"),
                    rev: 2,
                    class: Class::Memory,
                },
                None,
                r#"{"ok":true,"key":"a.b","value":{"x":1},"rev":2,"class":"memory"}"#,
            ),
            (Response::Values(vec![]), None, r#"{"ok":true,"values":{}}"#),
            (
                Response::Keys(vec![key("a"), key("b")]),
                None,
                r#"{"ok":true,"keys":["a","b"]}"#,
            ),
            (
                Response::error(ErrorCode::NotFound, "no key \"a\""),
                None,
                r#"{"ok":false,"error":"not_found","message":"no key \"a\""}"#,
            ),
            (
                Response::Conflict("the key is at rev 4, not 3".into(), 4),
                Some("1"),
                r#"{"ok":false,"error":"conflict","message":"the key is at rev 4, not 3","rev":4,"id":1}"#,
            ),
        ];
        for (response, id, want) in cases {
            let mut out = Vec::new();
            response.write(id, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{want}\n"));
        }
    }

    #[test]
    fn shutdown_event_is_the_wire_shape() {
        let mut out = Vec::new();
        wire::write_line(&wire::Event::<&str, Raw>::Shutdown, &mut out);
        assert_eq!(out, SHUTDOWN_EVENT);
    }
}
