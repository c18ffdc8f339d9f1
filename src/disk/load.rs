//! Reading the data directory at start, trusting nothing in it.
//!
//! Key files are meant to be read and edited by people, so anything a person (or a crash) can
//! leave there is handled: a symlink, FIFO, device or directory is never opened as a value; a
//! file larger than the value limit is not read; a record with an invalid revision or value,
//! or a name that is not ours (or not UTF-8), is moved to `.quarantine/` with a log line — and
//! a revision its first bytes still show counts, so revisions never go backwards. Something other than a directory at `.quarantine` is moved into a new
//! one. A valid record is served as one compact line however it was formatted.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
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
        if raw != b"." && raw != b".." {
            names.push((raw.to_vec(), entry.file_type()));
        }
    }
    drop(listing);
    for (raw, kind) in names {
        let path = dir.path().join(OsStr::from_bytes(&raw));
        let Ok(name) = std::str::from_utf8(&raw) else {
            if kind == Some(Type::Directory) {
                log::warn!("ignoring directory {}: not an nkv file", path.display());
                continue;
            }
            let why = Unusable::new("not a UTF-8 file name");
            quarantine_one(dir, &mut quarantine, &mut contents, &raw, why)?;
            continue;
        };
        let verdict = match classify(name) {
            Name::Temp | Name::LegacyTemp => {
                // Never renamed into place, so never acknowledged: its revision was seen by
                // no one and does not count (a junk temp file cannot raise revisions).
                match dir.unlink(name) {
                    Ok(()) => log::info!("removed stray temporary file {}", path.display()),
                    Err(e) => log::warn!("cannot remove stray file {}: {e}", path.display()),
                }
                continue;
            }
            Name::Reserve | Name::Tombstones | Name::Home | Name::TombstoneLog | Name::Epoch => {
                continue
            }
            Name::LegacyLock => continue,
            Name::Quarantine => {
                // Opened now, not only when needed: a blocker is moved aside and the folder
                // gets the data directory's access rule at every start.
                if quarantine.is_none() {
                    match open_quarantine(dir) {
                        Ok(q) => quarantine = Some(q),
                        Err(e) => log::warn!("cannot use {}: {e}", path.display()),
                    }
                }
                continue;
            }
            Name::RevFloor => match read_floor(dir, name) {
                Ok(rev) => {
                    contents.floor = Some(rev);
                    contents.max_rev = contents.max_rev.max(rev);
                    continue;
                }
                Err(why) => why,
            },
            Name::Key(key) => match read_record(dir, name, max_value) {
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
        quarantine_one(dir, &mut quarantine, &mut contents, &raw, verdict)?;
    }
    Ok(contents)
}

/// Moves one unusable file into the quarantine folder (opened on first use), counting the
/// revision it shows: found by the parse that failed, or else read from its first bytes
/// (a file over the limit, one that is not UTF-8, a record under a foreign name).
fn quarantine_one(
    dir: &Dir,
    quarantine: &mut Option<Dir>,
    contents: &mut Contents,
    raw: &[u8],
    mut verdict: Unusable,
) -> Result<(), DiskError> {
    let path = dir.path().join(OsStr::from_bytes(raw));
    if verdict.rev.is_none() {
        verdict.rev = prefix_rev(dir, raw);
    }
    if let Some(rev) = verdict.rev {
        contents.max_rev = contents.max_rev.max(rev);
    }
    let q = match quarantine {
        Some(q) => q,
        None => quarantine.insert(
            open_quarantine(dir)
                .map_err(|e| DiskError::new("create", dir.join(QUARANTINE_DIR), e))?,
        ),
    };
    match move_aside(dir, q, raw) {
        Ok(moved) => {
            contents.quarantined += 1;
            log::warn!(
                "moved {} to {}: {}{}",
                path.display(),
                q.path().join(OsStr::from_bytes(&moved)).display(),
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
    Ok(())
}

/// Opens `.quarantine/`, creating it if needed. Something else at that name (a person's
/// file, a symlink) would stop every start that has a file to quarantine, so it is moved
/// into the new folder itself, under its own name, with a log line; a symlink is never
/// followed, only moved.
fn open_quarantine(dir: &Dir) -> std::io::Result<Dir> {
    let blocked = dir
        .stat(QUARANTINE_DIR)
        .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT != nix::libc::S_IFDIR);
    if !blocked {
        return dir.subdir(QUARANTINE_DIR);
    }
    let aside = format!("{QUARANTINE_DIR}.in-the-way-{}", std::process::id());
    dir.rename_into(QUARANTINE_DIR, dir, aside.as_str())?;
    let q = dir.subdir(QUARANTINE_DIR)?;
    let moved = move_aside_as(dir, &q, &aside, QUARANTINE_DIR.as_bytes())?;
    log::warn!(
        "{} was in the way and not a directory: moved it to {}",
        dir.join(QUARANTINE_DIR).display(),
        q.path().join(OsStr::from_bytes(&moved)).display()
    );
    Ok(q)
}

/// Moves `name` into the quarantine folder under a name not yet taken there; returns it.
fn move_aside(dir: &Dir, quarantine: &Dir, name: &[u8]) -> std::io::Result<Vec<u8>> {
    move_aside_as(dir, quarantine, name, name)
}

/// Moves `from` into the quarantine folder as `name` (or `name.<n>` if taken).
fn move_aside_as(
    dir: &Dir,
    quarantine: &Dir,
    from: impl AsRef<[u8]>,
    name: &[u8],
) -> std::io::Result<Vec<u8>> {
    for n in 0..1000u32 {
        let mut target = name.to_vec();
        if n > 0 {
            target.extend_from_slice(format!(".{n}").as_bytes());
        }
        match quarantine.stat(target.as_slice()) {
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                dir.rename_into(from.as_ref(), quarantine, target.as_slice())?;
                return Ok(target);
            }
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "too many quarantined files of that name",
    ))
}

/// The revision a file's first bytes show, if it is a regular file that starts like a
/// record (`{"rev":N,`, any whitespace): a bounded read that needs neither valid UTF-8 nor
/// the whole file. A file that does not start like a record sets no revision.
fn prefix_rev(dir: &Dir, name: &[u8]) -> Option<u64> {
    let file = dir.open_read(name).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut head = Vec::with_capacity(PREFIX);
    file.take(PREFIX as u64).read_to_end(&mut head).ok()?;
    rev_hint(&String::from_utf8_lossy(&head))
}

/// How much of a file [`prefix_rev`] reads: room for a pretty-printed record's start.
const PREFIX: usize = 256;

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

/// The revision an unparsable record still shows (it starts `{"rev": N`), if valid.
fn rev_hint(text: &str) -> Option<u64> {
    let rest = text.trim_start().strip_prefix('{')?.trim_start();
    let rest = rest.strip_prefix("\"rev\"")?.trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
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
        assert_eq!(rev_hint("{\n  \"rev\": 40,\n"), Some(40));
        // As the server writes it: the field is padded to a fixed width.
        assert_eq!(
            rev_hint("{\"rev\":42                  ,\"value\":"),
            Some(42)
        );
        assert_eq!(rev_hint("{\"rev\":                    ,\"value\":"), None);
        assert_eq!(rev_hint("notes: {\"rev\":5,"), None, "not a record's start");
    }
}
