//! The shape of every line on the wire, defined once.
//!
//! The server writes these types (in [`crate::protocol`]) and the client reads them (in
//! [`crate::client`] and `nkv-client`), so a renamed or retyped field fails to compile on both
//! sides at once. The types are generic over how a side holds text and values: the server
//! borrows its keys and writes stored JSON text as is ([`Raw`]); the client owns `String`s and
//! `serde_json::Value`s, or `Box<RawValue>`s to keep the exact text (`nkv-client` does). A body
//! holding a `RawValue` is read from the line directly, not through [`Reply`]'s flattened field.
//!
//! A leaf module: it imports nothing from the crate.

use std::borrow::Cow;

use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// JSON text that is written as is, not re-encoded: a stored value, a request's `id`.
///
/// The text must already be valid JSON; the server checks every value and id on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raw<'a>(pub &'a str);

/// serde_json writes a struct of this name as the text of its one field, unescaped; it is how
/// `serde_json::value::RawValue` serialises itself. Going through it spares re-parsing a value
/// on every GET and event. `raw_text_is_written_as_is` pins the behaviour.
const RAW_TOKEN: &str = "$serde_json::private::RawValue";

impl Serialize for Raw<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut raw = serializer.serialize_struct(RAW_TOKEN, 1)?;
        raw.serialize_field(RAW_TOKEN, self.0)?;
        raw.end()
    }
}

/// A request's operation. Each has one canonical name on the wire and a few accepted aliases;
/// the text form's verbs are the same words, in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    Get,
    Del,
    Keys,
    Sub,
    Unsub,
    Hello,
    Trace,
    Stats,
    Health,
    Version,
    Help,
    Quit,
    /// `PUTIF <key> <rev> <value>` (text form; the JSON form is `put` with `if_rev`).
    PutIf,
    /// `DELIF <key> <rev>` (text form; the JSON form is `del` with `if_rev`).
    DelIf,
}

impl Op {
    /// The canonical (JSON form) name.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Del => "del",
            Op::Keys => "keys",
            Op::Sub => "sub",
            Op::Unsub => "unsub",
            Op::Hello => "hello",
            Op::Trace => "trace",
            Op::Stats => "stats",
            Op::Health => "health",
            Op::Version => "version",
            Op::Help => "help",
            Op::Quit => "quit",
            Op::PutIf => "putif",
            Op::DelIf => "delif",
        }
    }

    /// The operation a verb or `op` names, in any case, aliases included.
    pub fn parse(word: &str) -> Option<Op> {
        const NAMES: &[(&str, Op)] = &[
            ("get", Op::Get),
            ("put", Op::Put),
            ("del", Op::Del),
            ("delete", Op::Del),
            ("keys", Op::Keys),
            ("sub", Op::Sub),
            ("subscribe", Op::Sub),
            ("unsub", Op::Unsub),
            ("unsubscribe", Op::Unsub),
            ("hello", Op::Hello),
            ("trace", Op::Trace),
            ("stats", Op::Stats),
            ("health", Op::Health),
            ("ping", Op::Health),
            ("version", Op::Version),
            ("help", Op::Help),
            ("quit", Op::Quit),
            ("putif", Op::PutIf),
            ("delif", Op::DelIf),
        ];
        NAMES
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(word))
            .map(|(_, op)| *op)
    }
}

/// The JSON request form: `{"op":"put","key":"a.b","value":1,"id":7}`. Unknown fields are an
/// error, so a typo is never silently ignored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRequest<'a> {
    #[serde(borrow)]
    pub op: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub value: Option<&'a RawValue>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Cow<'a, str>>,
    /// Compare-and-set on `put`/`del`: only at this revision (0: only if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_rev: Option<u64>,
    /// A `put` of a session key, owned by the connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<bool>,
    /// A `sub` that resumes after this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_rev: Option<u64>,
    /// With `from_rev`: the history it belongs to (the `epoch` of the `ready` it came from).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Cow<'a, str>>,
    #[serde(
        borrow,
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<&'a RawValue>,
}

impl<'a> JsonRequest<'a> {
    /// A request for `op` with no fields yet.
    pub fn new(op: Op) -> JsonRequest<'a> {
        JsonRequest {
            op: Cow::Borrowed(op.as_str()),
            key: None,
            value: None,
            name: None,
            if_rev: None,
            session: None,
            from_rev: None,
            epoch: None,
            id: None,
        }
    }

    pub fn key(mut self, key: &'a str) -> JsonRequest<'a> {
        self.key = Some(Cow::Borrowed(key));
        self
    }

    /// Only the `id`, to echo it even when the rest of the object is wrong.
    pub fn id_of(line: &'a str) -> Option<&'a RawValue> {
        #[derive(Deserialize)]
        struct JsonId<'a> {
            #[serde(borrow, default, deserialize_with = "present")]
            id: Option<&'a RawValue>,
        }
        serde_json::from_str::<JsonId>(line).ok().and_then(|j| j.id)
    }
}

/// A present field is `Some`, even when its value is JSON `null` (a valid value to store).
fn present<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(de).map(Some)
}

/// Every response line: `{"ok":<bool>, <body fields>, "id":<echoed>}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply<B, I> {
    pub ok: bool,
    #[serde(flatten)]
    pub body: B,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<I>,
}

/// Only whether a response succeeded, read before its body.
#[derive(Debug, Deserialize)]
pub struct Status {
    pub ok: bool,
}

/// `{"ok":true}`: SUB, UNSUB, HELLO, QUIT.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Done {}

/// A change's revision: PUT, DEL of one key.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rev {
    pub rev: u64,
}

/// GET of one key.
#[derive(Debug, Serialize, Deserialize)]
pub struct Got<S, V> {
    pub key: S,
    pub value: V,
    pub rev: u64,
    /// The key's storage class: `persistent`, `volatile` or `memory`.
    #[serde(default)]
    pub class: S,
}

/// GET of a pattern: `values` is an object of key → value.
#[derive(Debug, Serialize, Deserialize)]
pub struct Values<M> {
    pub values: M,
}

/// KEYS: a sorted list.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyList<L> {
    pub keys: L,
}

/// DEL of a pattern: how many keys went.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: u64,
}

/// TRACE: the subscribers a change to `key` would reach.
#[derive(Debug, Serialize, Deserialize)]
pub struct Traced<S, L> {
    pub key: S,
    pub subscribers: L,
}

/// One subscriber as TRACE reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscriber {
    pub id: u64,
    pub name: String,
    pub subscriptions: Vec<String>,
    /// Items waiting in its mailbox.
    #[serde(default)]
    pub pending: usize,
    /// Changes replaced by a later one of their key before they were sent, since it subscribed.
    #[serde(default)]
    pub coalesced: u64,
}

/// Keys per storage class (STATS `classes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCounts {
    pub persistent: usize,
    pub volatile: usize,
    pub memory: usize,
    /// Of the `memory` keys, those owned by a session (STATS `sessions`, beside `classes`).
    #[serde(skip)]
    pub sessions: usize,
}

/// Server counters as STATS reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub connections: usize,
    pub subscribers: usize,
    pub keys: usize,
    pub rev: u64,
    /// Events queued to subscribers since start.
    pub events: u64,
    /// Intermediate events replaced by a later one for the same key before they were sent.
    pub coalesced: u64,
    /// The names open connections gave with HELLO, sorted.
    #[serde(default)]
    pub names: Vec<String>,
    /// Threads serving clients (one per connection; a subscriber's thread also sends its
    /// events, there are no other writer threads).
    #[serde(default)]
    pub threads: usize,
    /// Subscribers that are behind: coalescing, or their socket is full.
    #[serde(default)]
    pub behind: usize,
    /// Subscribers disconnected because their socket accepted nothing for `--send-timeout`.
    #[serde(default)]
    pub dropped_slow: u64,
    /// Changes applied and announced whose fsync failed (answered `not_durable`).
    #[serde(default)]
    pub not_durable: u64,
    /// Keys per storage class.
    #[serde(default)]
    pub classes: ClassCounts,
    /// Session keys (memory keys owned by a connection).
    #[serde(default)]
    pub sessions: usize,
    /// Tombstones kept for resumes, and the revision the delete history reaches back to.
    #[serde(default)]
    pub tombstones: usize,
    #[serde(default)]
    pub horizon: u64,
    /// Every subscriber with its pending items and coalesced count.
    #[serde(default)]
    pub lag: Vec<Subscriber>,
}

/// HEALTH.
#[derive(Debug, Serialize, Deserialize)]
pub struct Health<S> {
    pub status: S,
}

/// VERSION.
#[derive(Debug, Serialize, Deserialize)]
pub struct Version<S> {
    pub version: S,
}

/// HELP.
#[derive(Debug, Serialize, Deserialize)]
pub struct Help<S> {
    pub help: S,
}

/// Any failed request (`"ok":false`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Failure<S> {
    pub error: S,
    pub message: S,
}

/// A compare-and-set that found another revision (`"error":"conflict"`): nothing changed;
/// `rev` is the key's current revision (0 if absent).
#[derive(Debug, Serialize, Deserialize)]
pub struct Conflict<S> {
    pub error: S,
    pub message: S,
    pub rev: u64,
}

/// One line of `nkv-client dump`, read back by `nkv-client restore`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dumped<S, V> {
    pub key: S,
    pub value: V,
}

/// An event on a subscriber connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event<S, V> {
    /// A key's value when the subscription started.
    Init {
        key: S,
        value: V,
        rev: u64,
    },
    /// All initial values of subscription `sub` have been sent.
    Ready {
        sub: S,
        count: u64,
        /// The revision the snapshot was taken at: resume from it with `SUB <sub> FROM <rev>`.
        #[serde(default)]
        rev: u64,
        /// The history `rev` belongs to: name it with `EPOCH <epoch>` when resuming, so a
        /// replaced data directory answers with a reset. Absent from servers before it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<S>,
    },
    /// A resume the server could not answer from its history: the full snapshot (as `init`
    /// events, then `ready`) follows.
    Reset {
        sub: S,
    },
    Put {
        key: S,
        value: V,
        rev: u64,
    },
    Del {
        key: S,
        rev: u64,
    },
    /// The server is stopping; no more events follow.
    Shutdown,
}

impl<S, V> Event<S, V> {
    /// The key an init, put or del event is about.
    pub fn key(&self) -> Option<&S> {
        match self {
            Event::Init { key, .. } | Event::Put { key, .. } | Event::Del { key, .. } => Some(key),
            Event::Ready { .. } | Event::Reset { .. } | Event::Shutdown => None,
        }
    }
}

/// Serialises `item` as one line (with `\n`) onto `out`. Writing these types into a `Vec`
/// cannot fail: they hold only strings, numbers and JSON text already validated.
pub fn write_line<T: Serialize>(item: &T, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, item);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<T: Serialize>(item: &T) -> String {
        let mut out = Vec::new();
        write_line(item, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn raw_text_is_written_as_is() {
        let got = Got {
            key: "a",
            value: Raw("{\"x\": [1,  2]}"),
            rev: 3,
            class: "persistent",
        };
        let reply = Reply {
            ok: true,
            body: got,
            id: Some(Raw("\"r\"")),
        };
        assert_eq!(
            line(&reply),
            "{\"ok\":true,\"key\":\"a\",\"value\":{\"x\": [1,  2]},\"rev\":3,\"class\":\"persistent\",\"id\":\"r\"}\n"
        );
        let event: Event<&str, Raw> = Event::Put {
            key: "k",
            value: Raw("7"),
            rev: 1,
        };
        assert_eq!(
            line(&event),
            "{\"event\":\"put\",\"key\":\"k\",\"value\":7,\"rev\":1}\n"
        );
    }

    #[test]
    fn events_read_back_as_written() {
        let events: Vec<Event<String, serde_json::Value>> = vec![
            Event::Init {
                key: "a".into(),
                value: serde_json::json!({"b": null}),
                rev: 1,
            },
            Event::Ready {
                sub: "a.*".into(),
                count: 1,
                rev: 1,
                epoch: Some("00ff".into()),
            },
            Event::Reset { sub: "a".into() },
            Event::Del {
                key: "a".into(),
                rev: 2,
            },
            Event::Shutdown,
        ];
        for event in events {
            let text = line(&event);
            let back: Event<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
            assert_eq!(back, event, "{text}");
        }
        assert_eq!(
            line(&Event::<&str, Raw>::Shutdown),
            "{\"event\":\"shutdown\"}\n"
        );
    }

    #[test]
    fn ops_parse_in_any_case_with_aliases() {
        for op in [Op::Put, Op::Get, Op::Del, Op::Keys, Op::Sub, Op::Quit] {
            assert_eq!(Op::parse(op.as_str()), Some(op));
            assert_eq!(Op::parse(&op.as_str().to_uppercase()), Some(op));
        }
        assert_eq!(Op::parse("Delete"), Some(Op::Del));
        assert_eq!(Op::parse("PING"), Some(Op::Health));
        assert_eq!(Op::parse("frob"), None);
    }

    #[test]
    fn a_request_serialises_to_the_form_the_server_parses() {
        let value = serde_json::value::to_raw_value(&serde_json::json!([1])).unwrap();
        let mut request = JsonRequest::new(Op::Put).key("a.b");
        request.value = Some(&value);
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"op":"put","key":"a.b","value":[1]}"#);
        let back: JsonRequest = serde_json::from_str(&text).unwrap();
        assert_eq!(back.value.map(RawValue::get), Some("[1]"));
    }
}
