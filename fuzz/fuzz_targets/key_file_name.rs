//! Arbitrary text as a key: a key is accepted exactly by the grammar of docs/PROTOCOL.md, its file
//! name is one safe path component inside the data directory, and the name maps back to the key.
//! Arbitrary text as a file name: `key_of` only recognises names that `file_name` produces.

#![no_main]

use std::ffi::OsStr;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use nkv::disk::{file_name, key_of};
use nkv::key::Key;

/// The key grammar, written independently of `nkv::key`.
fn is_key(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 200
        && text.split('.').all(|segment| {
            !segment.is_empty()
                && segment.chars().all(|c| {
                    matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' | '+' | ':' | '@' | '#')
                })
        })
}

fuzz_target!(|text: &str| {
    let parsed = Key::parse(text);
    assert_eq!(
        parsed.is_ok(),
        is_key(text),
        "Key::parse({text:?}) = {parsed:?}"
    );
    if let Ok(key) = parsed {
        let name = file_name(&key);
        assert!(
            !name.is_empty()
                && name.len() <= 255
                && !name.contains('/')
                && !name.contains('\0')
                && !name.starts_with('.'),
            "unsafe file name {name:?}"
        );
        let dir = Path::new("/var/lib/nkv/data");
        let path = dir.join(&name);
        assert_eq!(path.parent(), Some(dir), "{name:?} leaves the directory");
        assert_eq!(
            path.components().next_back(),
            Some(Component::Normal(OsStr::new(&name))),
            "{name:?} is not a plain name"
        );
        assert_eq!(key_of(&name), Some(key), "{name:?} does not round-trip");
    }
    if let Some(key) = key_of(text) {
        assert!(
            !text.starts_with('.'),
            "dot file {text:?} read as key {key:?}"
        );
        assert_eq!(file_name(&key), text, "two names for key {key:?}");
    }
});
