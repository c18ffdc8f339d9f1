//! Keys and patterns: the only place a key is validated.
//!
//! Every key that reaches the store, the disk or the subscription table has been through
//! [`Key::parse`], so nothing after the protocol boundary ever sees a raw key string. The
//! character set is chosen so that a key is also a safe file name (no `/`, no NUL, no empty
//! segment and hence no `.` or `..`) and needs no escaping inside a JSON string.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// The longest key, in bytes. Well under `NAME_MAX` (255) even with the file suffix.
pub const MAX_KEY_LEN: usize = 200;

/// Why a key or pattern was rejected. The `Display` text names the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Empty,
    TooLong(usize),
    EmptySegment,
    BadChar { ch: char, pos: usize },
    Wildcard,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => write!(f, "key is empty"),
            KeyError::TooLong(len) => {
                write!(f, "key is {len} bytes long, the limit is {MAX_KEY_LEN}")
            }
            KeyError::EmptySegment => write!(
                f,
                "key has an empty segment (a leading, trailing or doubled '.')"
            ),
            KeyError::BadChar { ch, pos } => write!(
                f,
                "key has {ch:?} at byte {pos}; allowed are ASCII letters, digits, '.' between segments and _ - + : @ #"
            ),
            KeyError::Wildcard => write!(
                f,
                "'*' is only allowed as the whole last segment of a pattern (GET, DEL, KEYS, SUB)"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'+' | b':' | b'@' | b'#')
}

/// A validated key such as `service.topicA.key1`.
///
/// Cheap to clone (shared string), ordered like its text, and `Borrow<str>` so maps keyed by
/// `Key` can be searched with a `&str`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Arc<str>);

impl Key {
    /// Validates `text` as a key.
    ///
    /// # Errors
    /// A [`KeyError`] naming the first rule `text` breaks.
    pub fn parse(text: &str) -> Result<Key, KeyError> {
        validate(text)?;
        Ok(Key(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` is `ancestor` itself or lies below it (`a.b` is below `a`, `ab` is not).
    pub fn is_within(&self, ancestor: &Key) -> bool {
        self.is_below(ancestor) || self == ancestor
    }

    /// Whether `self` lies strictly below `ancestor`.
    pub fn is_below(&self, ancestor: &Key) -> bool {
        let (me, anc) = (self.as_str(), ancestor.as_str());
        me.len() > anc.len() && me.starts_with(anc) && me.as_bytes()[anc.len()] == b'.'
    }
}

fn validate(text: &str) -> Result<(), KeyError> {
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    if text.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong(text.len()));
    }
    let mut segment_len = 0;
    for (pos, ch) in text.char_indices() {
        match ch {
            '.' if segment_len == 0 => return Err(KeyError::EmptySegment),
            '.' => segment_len = 0,
            '*' => return Err(KeyError::Wildcard),
            c if c.is_ascii() && is_segment_byte(c as u8) => segment_len += 1,
            ch => return Err(KeyError::BadChar { ch, pos }),
        }
    }
    if segment_len == 0 {
        return Err(KeyError::EmptySegment);
    }
    Ok(())
}

impl Borrow<str> for Key {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", &*self.0)
    }
}

/// A wildcard over keys: `*` (every key) or `a.b.*` (every key strictly below `a.b`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    All,
    Below(Key),
}

impl Pattern {
    pub fn matches(&self, key: &Key) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Below(parent) => key.is_below(parent),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::All => f.write_str("*"),
            Pattern::Below(parent) => write!(f, "{parent}.*"),
        }
    }
}

/// What a request names: one key, or a pattern over keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    Key(Key),
    Pattern(Pattern),
}

impl Target {
    /// Parses a key, `*` or `prefix.*`.
    ///
    /// # Errors
    /// A [`KeyError`] naming the first rule `text` breaks.
    pub fn parse(text: &str) -> Result<Target, KeyError> {
        if text == "*" {
            return Ok(Target::Pattern(Pattern::All));
        }
        match text.strip_suffix(".*") {
            Some(parent) => Ok(Target::Pattern(Pattern::Below(Key::parse(parent)?))),
            None => Ok(Target::Key(Key::parse(text)?)),
        }
    }

    /// The subscription meaning of a target: a key covers itself and everything below it, a
    /// pattern covers what it matches.
    pub fn covers(&self, key: &Key) -> bool {
        match self {
            Target::Key(root) => key.is_within(root),
            Target::Pattern(pattern) => pattern.matches(key),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Key(key) => key.fmt(f),
            Target::Pattern(pattern) => pattern.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<(), KeyError>) {
        assert_eq!(Key::parse(text).map(|_| ()), expected, "key {text:?}");
    }

    #[test]
    fn accepts_hierarchical_and_eve_style_keys() {
        for ok in [
            "a",
            "service.topicA.key1",
            "3f0c2b1e-1111-4a2b-9c3d-123456789abc.8a1d2b1e-2222-4a2b-9c3d-123456789abc",
            "dev:1.temp@room#2",
            "a+b_c",
        ] {
            check(ok, Ok(()));
        }
    }

    #[test]
    fn rejects_hostile_keys_naming_the_rule() {
        check("", Err(KeyError::Empty));
        check("../x", Err(KeyError::EmptySegment));
        check("a..b", Err(KeyError::EmptySegment));
        check(".a", Err(KeyError::EmptySegment));
        check("a.", Err(KeyError::EmptySegment));
        check("a/b", Err(KeyError::BadChar { ch: '/', pos: 1 }));
        check("/etc", Err(KeyError::BadChar { ch: '/', pos: 0 }));
        check("a b", Err(KeyError::BadChar { ch: ' ', pos: 1 }));
        check("a\0", Err(KeyError::BadChar { ch: '\0', pos: 1 }));
        check("é", Err(KeyError::BadChar { ch: 'é', pos: 0 }));
        check("a.*", Err(KeyError::Wildcard));
        check(&"k".repeat(201), Err(KeyError::TooLong(201)));
        check(&"k".repeat(200), Ok(()));
    }

    #[test]
    fn prefix_boundaries_follow_segments() {
        let a = Key::parse("a").unwrap();
        let ab = Key::parse("ab").unwrap();
        let a_b = Key::parse("a.b").unwrap();
        assert!(a_b.is_below(&a) && a_b.is_within(&a));
        assert!(a.is_within(&a) && !a.is_below(&a));
        assert!(!ab.is_within(&a));
    }

    #[test]
    fn targets_parse_keys_and_patterns() {
        assert_eq!(Target::parse("*"), Ok(Target::Pattern(Pattern::All)));
        let t = Target::parse("a.b.*").unwrap();
        assert_eq!(t.to_string(), "a.b.*");
        assert!(t.covers(&Key::parse("a.b.c").unwrap()));
        assert!(!t.covers(&Key::parse("a.b").unwrap()));
        let t = Target::parse("a").unwrap();
        assert!(t.covers(&Key::parse("a").unwrap()) && t.covers(&Key::parse("a.x.y").unwrap()));
        assert!(!t.covers(&Key::parse("ab").unwrap()));
        assert_eq!(Target::parse("*.a"), Err(KeyError::Wildcard));
        assert_eq!(Target::parse(".*"), Err(KeyError::Empty));
        assert_eq!(Target::parse("a*"), Err(KeyError::Wildcard));
    }
}
