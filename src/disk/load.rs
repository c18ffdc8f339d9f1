//! Reading the data directory at start, trusting nothing in it.
//!
//! Key files are meant to be read and edited by people, so anything a person (or a crash) can
//! leave there is handled: a symlink, FIFO, device or directory is never opened as a value; a
//! file larger than the value limit is not read; a record with an invalid revision or value,
//! or a name that is not ours, is moved to `.quarantine/` with a log line — and a revision it
//! still shows counts, so revisions never go backwards. A valid record is served as one
//! compact line however it was formatted.

use std::io::Read;
use std::os::unix::fs::MetadataExt;

use nix::dir::Type;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::unistd::Uid;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::dir::Dir;
use super::layout::{classify, Name, QUARANTINE_DIR, REV_WIDTH};
use super::MAX_REV;
use crate::error::DiskError;
use crate::json;
use crate::key::Key;
use crate::store::Value;

/// A key as it was found on disk at start.
pub struct Loaded {
    pub key: Key,
    pub value: Value,
    pub rev: u64,
}

/// What was found on disk at start.
#[derive(Default)]
pub struct Contents {
    pub entries: Vec<Loaded>,
    /// The highest revision the directory has seen (key files, quarantined files, `.rev`).
    pub max_rev: u64,
    /// The revision floor file's value, if it had a valid one.
    pub floor: Option<u64>,
    /// The largest key file, in bytes (sizes the reserve).
    pub largest: u64,
    /// Files moved to `.quarantine/`.
    pub quarantined: usize,
}

#[derive(Deserialize)]
struct Record<'a> {
    rev: u64,
    #[serde(borrow)]
    value: &'a RawValue,
}

/// Why a file was not loaded, and the revision it still shows (if any).
struct Unusable {
    why: String,
    rev: Option<u64>,
}

impl Unusable {
    fn new(why: impl Into<String>) -> Unusable {
        Unusable {
            why: why.into(),
            rev: None,
        }
    }
}

/// Lists and loads `dir`: key files into `Contents`, stray temporary files removed, anything
/// else quarantined. `max_value` bounds what is read.
///
/// # Errors
/// The directory cannot be listed, or the quarantine folder cannot be created when needed.
pub fn load(dir: &Dir, max_value: usize) -> Result<Contents, DiskError> {
    let mut contents = Contents::default();
    let mut quarantine: Option<Dir> = None;
    let list_err = |e: nix::Error| DiskError::new("list", dir.path(), e.into());
    let mut listing = nix::dir::Dir::openat(
        Some(dir.fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .map_err(list_err)?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(list_err)?;
        let raw = entry.file_name().to_bytes();
        if raw == b"." || raw == b".." {
            continue;
        }
        let Ok(name) = std::str::from_utf8(raw) else {
            log::warn!(
                "ignoring {}: not a UTF-8 file name",
                dir.path()
                    .join(String::from_utf8_lossy(raw).as_ref())
                    .display()
            );
            continue;
        };
        names.push((name.to_owned(), entry.file_type()));
    }
    drop(listing);
    for (name, kind) in names {
        let path = dir.join(&name);
        let verdict = match classify(&name) {
            Name::Temp | Name::LegacyTemp => {
                match dir.unlink(&name) {
                    Ok(()) => log::info!("removed stray temporary file {}", path.display()),
                    Err(e) => log::warn!("cannot remove stray file {}: {e}", path.display()),
                }
                continue;
            }
            Name::LegacyLock | Name::Reserve | Name::Quarantine | Name::Tombstones => continue,
            Name::RevFloor => match read_floor(dir, &name) {
                Ok(rev) => {
                    contents.floor = Some(rev);
                    contents.max_rev = contents.max_rev.max(rev);
                    continue;
                }
                Err(why) => why,
            },
            Name::Key(key) => match read_record(dir, &name, max_value) {
                Ok((value, rev, size)) => {
                    contents.max_rev = contents.max_rev.max(rev);
                    contents.largest = contents.largest.max(size);
                    contents.entries.push(Loaded { key, value, rev });
                    continue;
                }
                Err(why) => why,
            },
            Name::Foreign if kind == Some(Type::Directory) => {
                log::warn!("ignoring directory {}: not an nkv file", path.display());
                continue;
            }
            Name::Foreign => Unusable::new("not a key file name (<key>.json)"),
        };
        if let Some(rev) = verdict.rev {
            contents.max_rev = contents.max_rev.max(rev);
        }
        let q = match &quarantine {
            Some(q) => q,
            None => quarantine.insert(
                dir.subdir(QUARANTINE_DIR)
                    .map_err(|e| DiskError::new("create", dir.join(QUARANTINE_DIR), e))?,
            ),
        };
        match move_aside(dir, q, &name) {
            Ok(moved) => {
                contents.quarantined += 1;
                log::warn!(
                    "moved {} to {}: {}{}",
                    path.display(),
                    q.join(&moved).display(),
                    verdict.why,
                    verdict
                        .rev
                        .map(|r| format!(" (its revision {r} still counts)"))
                        .unwrap_or_default()
                );
            }
            Err(e) => log::warn!(
                "cannot quarantine {} ({}): {e}",
                path.display(),
                verdict.why
            ),
        }
    }
    Ok(contents)
}

/// Moves `name` into the quarantine folder under a name not yet taken there.
fn move_aside(dir: &Dir, quarantine: &Dir, name: &str) -> std::io::Result<String> {
    for n in 0..1000u32 {
        let target = if n == 0 {
            name.to_owned()
        } else {
            format!("{name}.{n}")
        };
        match quarantine.stat(&target) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                dir.rename_into(name, quarantine, &target)?;
                return Ok(target);
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "too many quarantined files of that name",
    ))
}

/// Reads a regular file of at most `limit` bytes, never through a symlink and never blocking.
/// Tightens its mode to the server's if it is ours alone and more open.
fn read_bounded(dir: &Dir, name: &str, limit: u64) -> Result<String, Unusable> {
    let file = dir.open_read(name).map_err(|e| match e.raw_os_error() {
        Some(nix::libc::ELOOP) => Unusable::new("a symlink (never followed)"),
        _ => Unusable::new(format!("cannot open: {e}")),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Unusable::new(format!("cannot inspect: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(Unusable::new("not a regular file"));
    }
    if meta.len() > limit {
        return Err(Unusable::new(format!(
            "{} bytes, more than the value limit allows ({limit})",
            meta.len()
        )));
    }
    let wanted = dir.access().file_mode;
    if meta.mode() & 0o777 & !wanted != 0
        && meta.nlink() == 1
        && meta.uid() == Uid::effective().as_raw()
    {
        use std::os::fd::AsRawFd;
        let _ = nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(wanted as _));
    }
    let mut text = String::with_capacity(meta.len() as usize);
    // `take` bounds the read even if the file grows meanwhile.
    file.take(limit + 1)
        .read_to_string(&mut text)
        .map_err(|e| Unusable::new(format!("cannot read: {e}")))?;
    if text.len() as u64 > limit {
        return Err(Unusable::new("grew past the value limit while read"));
    }
    Ok(text)
}

fn read_record(dir: &Dir, name: &str, max_value: usize) -> Result<(Value, u64, u64), Unusable> {
    let limit = max_value as u64 + 64 * 1024;
    let text = read_bounded(dir, name, limit)?;
    let size = text.len() as u64;
    let record: Record = serde_json::from_str(&text).map_err(|e| Unusable {
        why: format!("not a record {{\"rev\":N,\"value\":...}}: {e}"),
        rev: rev_hint(&text),
    })?;
    let rev = record.rev;
    if rev == 0 || rev > MAX_REV {
        return Err(Unusable::new(format!(
            "revision {rev} is outside 1..={MAX_REV}"
        )));
    }
    let raw = record.value.get();
    json::validate(raw).map_err(|e| Unusable {
        why: format!("value is not JSON every client can read: {e}"),
        rev: Some(rev),
    })?;
    let value = json::compact(raw);
    if value.len() > max_value {
        return Err(Unusable {
            why: format!("value is {} bytes, the limit is {max_value}", value.len()),
            rev: Some(rev),
        });
    }
    Ok((Value::from(value.as_ref()), rev, size))
}

/// The revision an unparsable record still shows (`"rev": N` near its start), if valid.
fn rev_hint(text: &str) -> Option<u64> {
    let at = text.find("\"rev\"")? + "\"rev\"".len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    let digits: &str = &rest[..rest.bytes().take_while(u8::is_ascii_digit).count()];
    digits
        .parse::<u64>()
        .ok()
        .filter(|r| (1..=MAX_REV).contains(r))
}

fn read_floor(dir: &Dir, name: &str) -> Result<u64, Unusable> {
    let text = read_bounded(dir, name, REV_WIDTH as u64 + 64)?;
    match text.trim().parse::<u64>() {
        Ok(rev) if rev <= MAX_REV => Ok(rev),
        _ => Err(Unusable::new(format!(
            "not a revision number in 0..={MAX_REV}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::rev_hint;

    #[test]
    fn a_torn_record_still_shows_its_revision() {
        assert_eq!(rev_hint("{\"rev\":42,\"value\":{\"a\":"), Some(42));
        assert_eq!(rev_hint("{ \"rev\" : 7 , \"val"), Some(7));
        assert_eq!(rev_hint("{\"rev\":18446744073709551615,"), None);
        assert_eq!(rev_hint("garbage"), None);
    }
}
