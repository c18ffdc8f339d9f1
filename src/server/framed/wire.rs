//! The framed protocol's wire format, and the only place that knows it: a request frame is
//! parsed into a [`FramedRequest`] here, and every reply and stream message is written here.
//!
//! A frame is a little-endian `u32` length and that many bytes of UTF-8 text ending in `\n`.
//! Requests are `CMD REQ-ID CLIENT-ID KEY [BASE64]`; replies are `base|data|trace|version
//! REQ-ID OK|FAILED [DATA]`; a subscription streams `HELLO`, `UPDATE <key> <b64>` and
//! `CLOSE <key>`.

use std::fmt;

/// The largest frame payload either side sends or accepts: what the framed clients' codec
/// (tokio's `LengthDelimitedCodec` default) refuses beyond.
pub const MAX_FRAME: usize = 8 << 20;

/// Bytes of an oversized request read to find its command and id for the `FAILED` reply.
pub const PREFIX_OF_OVERSIZED: usize = 512;

/// The id used in a reply when a request was too broken to carry one.
pub const NO_ID: &str = "-";

/// A framed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Put,
    Get,
    Del,
    Sub,
    Unsub,
    Trace,
    Health,
    Version,
}

impl Command {
    fn parse(word: &str) -> Option<Command> {
        Some(match word {
            "PUT" => Command::Put,
            "GET" => Command::Get,
            "DEL" => Command::Del,
            "SUB" => Command::Sub,
            "UNSUB" => Command::Unsub,
            "TRACE" => Command::Trace,
            "HEALTH" => Command::Health,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// The reply kind this command is answered with, `FAILED` included.
    pub fn reply_kind(self) -> ReplyKind {
        match self {
            Command::Get => ReplyKind::Data,
            Command::Trace => ReplyKind::Trace,
            Command::Version => ReplyKind::Version,
            Command::Put | Command::Del | Command::Sub | Command::Unsub | Command::Health => {
                ReplyKind::Base
            }
        }
    }
}

/// The first word of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Base,
    Data,
    Trace,
    Version,
}

impl ReplyKind {
    fn as_str(self) -> &'static str {
        match self {
            ReplyKind::Base => "base",
            ReplyKind::Data => "data",
            ReplyKind::Trace => "trace",
            ReplyKind::Version => "version",
        }
    }
}

/// One parsed request frame. Fields borrow from the frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramedRequest<'a> {
    pub command: Command,
    pub id: &'a str,
    pub client: &'a str,
    /// Empty for `HEALTH` and `VERSION` sent without one (they ignore it).
    pub key: &'a str,
    /// The decoded value of a `PUT`.
    pub value: Vec<u8>,
}

/// A request that cannot be served: the `FAILED` reply to send (with the id, when one was
/// found) and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest {
    pub kind: ReplyKind,
    pub id: String,
    pub reason: String,
}

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request {}: {}", self.id, self.reason)
    }
}

/// Parses a request frame's payload.
///
/// # Errors
/// A [`BadRequest`] for text that is not UTF-8, an unknown command, missing or extra fields,
/// or a value that is not base64.
pub fn parse_request(payload: &[u8]) -> Result<FramedRequest<'_>, BadRequest> {
    let text = match std::str::from_utf8(payload) {
        Ok(text) => text,
        Err(e) => {
            // The command and id are ASCII in every client; find them for the reply anyway.
            let valid = std::str::from_utf8(&payload[..e.valid_up_to()]).unwrap_or_default();
            return Err(bad(
                valid,
                format!("frame is not UTF-8 (at byte {})", e.valid_up_to()),
            ));
        }
    };
    let text = text.trim_end();
    let mut fields = text.split(' ');
    let word = fields.next().unwrap_or_default();
    let Some(command) = Command::parse(word) else {
        return Err(bad(
            text,
            format!("unknown command {:?}", truncate(word, 40)),
        ));
    };
    let kind = command.reply_kind();
    let fail = |id: &str, reason: String| BadRequest {
        kind,
        id: sanitize_id(id),
        reason,
    };
    let id = fields.next().unwrap_or_default();
    if id.is_empty() {
        return Err(fail(NO_ID, "request has no id".into()));
    }
    let client = fields.next().unwrap_or_default();
    let key = fields.next().unwrap_or_default();
    let takes_key = !matches!(command, Command::Health | Command::Version);
    if client.is_empty() || (takes_key && key.is_empty()) {
        return Err(fail(id, format!("{word} needs a client id and a key")));
    }
    let value = match command {
        Command::Put => decode_base64(fields.next().unwrap_or_default())
            .map_err(|reason| fail(id, format!("value: {reason}")))?,
        _ => Vec::new(),
    };
    if let Some(extra) = fields.next() {
        return Err(fail(
            id,
            format!("unexpected field {:?} after the key", truncate(extra, 40)),
        ));
    }
    Ok(FramedRequest {
        command,
        id,
        client,
        key,
        value,
    })
}

/// The `FAILED` reply for an unparsable request: its command's kind if known, else `base`.
fn bad(text: &str, reason: String) -> BadRequest {
    let mut fields = text.split(' ');
    let kind = fields
        .next()
        .and_then(Command::parse)
        .map_or(ReplyKind::Base, Command::reply_kind);
    BadRequest {
        kind,
        id: sanitize_id(fields.next().unwrap_or(NO_ID)),
        reason,
    }
}

/// An id echoed in a reply cannot hold what would break the reply's fields.
fn sanitize_id(id: &str) -> String {
    let id = truncate(id, 128);
    if id.is_empty() || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        NO_ID.to_owned()
    } else {
        id.to_owned()
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((pos, _)) => &text[..pos],
        None => text,
    }
}

/// A frame being built: reserves the length prefix, fills it in at [`Frame::finish`].
pub struct Frame(Vec<u8>);

impl Frame {
    /// A reply frame: `<kind> <id> OK|FAILED`.
    pub fn reply(kind: ReplyKind, id: &str, ok: bool) -> Frame {
        let mut frame = Frame::start();
        frame.text(kind.as_str());
        frame.text(" ");
        frame.text(id);
        frame.text(if ok { " OK" } else { " FAILED" });
        frame
    }

    /// A stream message frame: `HELLO`, `UPDATE <key> <b64>` or `CLOSE <key>`.
    pub fn message(word: &str, key: Option<&str>, value: Option<&[u8]>) -> Frame {
        let mut frame = Frame::start();
        frame.text(word);
        if let Some(key) = key {
            frame.field(key);
        }
        if let Some(value) = value {
            frame.base64_field(value);
        }
        frame
    }

    fn start() -> Frame {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&[0; 4]);
        Frame(bytes)
    }

    fn text(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    /// Appends ` <text>`.
    pub fn field(&mut self, text: &str) {
        self.0.push(b' ');
        self.text(text);
    }

    /// Appends ` <base64 of bytes>`.
    pub fn base64_field(&mut self, bytes: &[u8]) {
        self.0.push(b' ');
        encode_base64(bytes, &mut self.0);
    }

    /// The payload so far, without the length prefix and the final `\n`.
    pub fn payload_len(&self) -> usize {
        self.0.len() - 4 + 1
    }

    /// Ends the payload with `\n` and fills in the length; `None` when the payload is over
    /// [`MAX_FRAME`] (the receiver would refuse it).
    pub fn finish(mut self) -> Option<Vec<u8>> {
        self.0.push(b'\n');
        let len = self.0.len() - 4;
        if len > MAX_FRAME {
            return None;
        }
        // MAX_FRAME fits in a u32.
        self.0[..4].copy_from_slice(&(len as u32).to_le_bytes());
        Some(self.0)
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4), as the framed clients use.
pub fn encode_base64(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len().div_ceil(3) * 4);
    let mut chunks = bytes.chunks_exact(3);
    for c in &mut chunks {
        let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
        for shift in [18, 12, 6, 0] {
            out.push(ALPHABET[(n >> shift) as usize & 63]);
        }
    }
    match *chunks.remainder() {
        [a] => {
            let n = u32::from(a) << 16;
            out.extend_from_slice(&[
                ALPHABET[(n >> 18) as usize],
                ALPHABET[(n >> 12) as usize & 63],
            ]);
            out.extend_from_slice(b"==");
        }
        [a, b] => {
            let n = (u32::from(a) << 16) | (u32::from(b) << 8);
            out.extend_from_slice(&[
                ALPHABET[(n >> 18) as usize],
                ALPHABET[(n >> 12) as usize & 63],
                ALPHABET[(n >> 6) as usize & 63],
            ]);
            out.push(b'=');
        }
        _ => {}
    }
}

/// Decodes standard base64; padding may be present or left off.
///
/// # Errors
/// A character outside the alphabet, misplaced padding or a dangling bit group.
pub fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let unpadded = bytes
        .strip_suffix(b"==")
        .or_else(|| bytes.strip_suffix(b"="))
        .unwrap_or(bytes);
    if unpadded.len() != bytes.len() && !bytes.len().is_multiple_of(4) {
        return Err("misplaced base64 padding".into());
    }
    if unpadded.len() % 4 == 1 {
        return Err("base64 text has a dangling character".into());
    }
    let mut out = Vec::with_capacity(unpadded.len() / 4 * 3 + 2);
    let mut acc = 0u32;
    let mut bits = 0;
    for (pos, &b) in unpadded.iter().enumerate() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return Err(format!("{:?} at byte {pos} is not base64", b as char)),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        encode_base64(bytes, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn base64_matches_the_rfc_vectors_and_round_trips() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64(plain.as_bytes()), coded);
            assert_eq!(decode_base64(coded).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_base64(&b64(&all)).unwrap(), all);
        assert_eq!(
            decode_base64("Zm8").unwrap(),
            b"fo",
            "padding may be left off"
        );
        assert!(decode_base64("Zm9v!").is_err());
        assert!(decode_base64("Z").is_err());
        assert!(decode_base64("Zg=a").is_err());
    }

    /// (command, id, client, key, value) or the failed reply's (kind, id).
    type Expected<'a> =
        Result<(Command, &'a str, &'a str, &'a str, &'a [u8]), (ReplyKind, &'a str)>;

    fn check(payload: &str, expected: Expected<'_>) {
        let got = parse_request(payload.as_bytes());
        match (got, expected) {
            (Ok(r), Ok((command, id, client, key, value))) => {
                assert_eq!(
                    (r.command, r.id, r.client, r.key),
                    (command, id, client, key)
                );
                assert_eq!(r.value, value, "{payload:?}");
            }
            (Err(e), Err((kind, id))) => assert_eq!(
                (e.kind, e.id.as_str()),
                (kind, id),
                "{payload:?}: {}",
                e.reason
            ),
            (got, want) => panic!("{payload:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn requests_parse_as_upstream_clients_send_them() {
        use Command::*;
        check(
            "PUT r1 c1 a.b eyJvbiI6dHJ1ZX0=\n",
            Ok((Put, "r1", "c1", "a.b", b"{\"on\":true}")),
        );
        check("PUT r1 c1 a.b \n", Ok((Put, "r1", "c1", "a.b", b"")));
        check("GET r2 c1 a.*\n", Ok((Get, "r2", "c1", "a.*", b"")));
        check("DEL r3 c1 a\n", Ok((Del, "r3", "c1", "a", b"")));
        check("SUB c1 c1 a\n", Ok((Sub, "c1", "c1", "a", b"")));
        check("UNSUB r4 c1 a\n", Ok((Unsub, "r4", "c1", "a", b"")));
        check("TRACE r5 c1 a\n", Ok((Trace, "r5", "c1", "a", b"")));
        check("HEALTH r6 c1 HK\n", Ok((Health, "r6", "c1", "HK", b"")));
        check(
            "VERSION c1 c1 DISCARDME\n",
            Ok((Version, "c1", "c1", "DISCARDME", b"")),
        );
        check("HEALTH r6 c1\n", Ok((Health, "r6", "c1", "", b"")));
    }

    #[test]
    fn bad_requests_get_the_failed_reply_of_their_command() {
        check("NOPE r1 c1 a\n", Err((ReplyKind::Base, "r1")));
        check("GET r1 c1\n", Err((ReplyKind::Data, "r1")));
        check("TRACE\n", Err((ReplyKind::Trace, NO_ID)));
        check("PUT r1 c1 a %%%\n", Err((ReplyKind::Base, "r1")));
        check("GET r1 c1 a extra\n", Err((ReplyKind::Data, "r1")));
        let err = parse_request(b"GET r9 c1 \xff\n").unwrap_err();
        assert_eq!((err.kind, err.id.as_str()), (ReplyKind::Data, "r9"));
    }

    proptest::proptest! {
        #[test]
        fn any_frame_parses_or_fails_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Err(err) = parse_request(&bytes) {
                proptest::prop_assert!(!err.id.contains(' ') && !err.id.is_empty());
            }
        }

        #[test]
        fn base64_round_trips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..100)) {
            proptest::prop_assert_eq!(decode_base64(&b64(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn frames_carry_their_length_and_refuse_to_exceed_the_limit() {
        let frame = Frame::reply(ReplyKind::Base, "r1", true).finish().unwrap();
        assert_eq!(&frame[..4], &11u32.to_le_bytes());
        assert_eq!(&frame[4..], b"base r1 OK\n");
        let mut update = Frame::message("UPDATE", Some("a"), Some(b"hi"));
        assert_eq!(update.payload_len(), "UPDATE a aGk=\n".len());
        update.field("x");
        assert_eq!(&update.finish().unwrap()[4..], b"UPDATE a aGk= x\n");
        let big = vec![0u8; MAX_FRAME];
        assert!(Frame::message("UPDATE", Some("a"), Some(&big))
            .finish()
            .is_none());
    }
}
