//! The data directory's history identity (its epoch): a random id chosen when the directory
//! is first used and kept in [`EPOCH_FILE`], so that a revision can be told apart from the
//! same number in another history. A wiped or replaced directory has no `.epoch` (or another
//! one): a client resuming with the old epoch gets a reset instead of "nothing changed".

use std::fmt;
use std::io::{self, Read};

use super::layout::EPOCH_FILE;
use super::Disk;

/// A history identity: 128 random bits, written as 32 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epoch(u128);

/// Width of an epoch in hex digits.
pub const EPOCH_HEX: usize = 32;

impl Epoch {
    /// A new random epoch: from `/dev/urandom`, or (if it cannot be read) from std's
    /// randomly keyed hasher mixed with the time and the pid.
    pub fn random() -> Epoch {
        let mut bytes = [0u8; 16];
        let urandom =
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        if urandom.is_ok() && bytes != [0; 16] {
            return Epoch(u128::from_le_bytes(bytes));
        }
        use std::hash::BuildHasher;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mix = |salt: u64| {
            std::collections::hash_map::RandomState::new().hash_one((now, std::process::id(), salt))
        };
        Epoch((u128::from(mix(1)) << 64) | u128::from(mix(2)))
    }

    /// Parses exactly [`EPOCH_HEX`] hex digits (either case); anything else is not an epoch.
    pub fn parse(text: &str) -> Option<Epoch> {
        if text.len() != EPOCH_HEX || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(text, 16).ok().map(Epoch)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// The most of [`EPOCH_FILE`] ever read: one epoch and a newline, with room to spare.
const MAX_EPOCH_FILE: u64 = 64;

impl Disk {
    /// The directory's epoch: the one in [`EPOCH_FILE`] when it holds a valid one; otherwise
    /// (missing, unreadable, not a plain file, malformed) a new random one, written through a
    /// temporary file renamed into place. Replacing a bad file only costs resuming clients a
    /// reset. When the new file cannot be written the new epoch is still used (and the next
    /// start picks another): resumes then always get a reset, never a stale answer.
    pub fn epoch(&self) -> Epoch {
        if let Some(epoch) = self.read_epoch() {
            return epoch;
        }
        let epoch = Epoch::random();
        let line = format!("{epoch}\n");
        match self.replace_server_file(EPOCH_FILE, line.as_bytes()) {
            Ok(()) => log::info!(
                "new history epoch {epoch} in {}",
                self.dir.join(EPOCH_FILE).display()
            ),
            Err(e) => log::warn!(
                "cannot save the history epoch ({e}): every resume after the next start gets a reset"
            ),
        }
        epoch
    }

    fn read_epoch(&self) -> Option<Epoch> {
        let read = || -> io::Result<Vec<u8>> {
            let file = self.dir.open_read(EPOCH_FILE)?;
            let meta = file.metadata()?;
            if !meta.is_file() || meta.len() > MAX_EPOCH_FILE {
                return Err(io::Error::other("not a small plain file"));
            }
            // Kept as found, so it gets the mode of the server's files here (a hard link to
            // someone else's file is left alone, and not trusted below either).
            if std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
                return Err(io::Error::other("a hard link"));
            }
            if let Err(e) = self.dir.conform(&file) {
                log::warn!("cannot set the mode of {EPOCH_FILE}: {e}");
            }
            let mut bytes = Vec::new();
            file.take(MAX_EPOCH_FILE).read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        let path = self.dir.join(EPOCH_FILE);
        let bytes = match read() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                log::warn!("cannot read {}: {e}; choosing a new epoch", path.display());
                return None;
            }
        };
        let epoch = std::str::from_utf8(&bytes)
            .ok()
            .map(|t| t.strip_suffix('\n').unwrap_or(t))
            .and_then(Epoch::parse);
        if epoch.is_none() {
            log::warn!("{} is malformed; choosing a new epoch", path.display());
        }
        epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{Disk, Options};

    #[test]
    fn an_epoch_is_32_hex_digits_and_reads_back() {
        let a = Epoch::random();
        assert_ne!(a, Epoch::random());
        let text = a.to_string();
        assert_eq!(text.len(), EPOCH_HEX);
        assert_eq!(Epoch::parse(&text), Some(a));
        assert_eq!(Epoch::parse(&text.to_uppercase()), Some(a));
        for bad in [
            "",
            "0",
            &text[1..],
            &format!("{text}0"),
            "+0123456789abcdef0123456789abcde",
        ] {
            assert_eq!(Epoch::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_epoch_file_is_kept_and_a_bad_one_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data");
        let open = || Disk::open(&path, &Options::new(false)).unwrap().0;
        let first = open().epoch();
        assert_eq!(open().epoch(), first, "kept across opens");
        let file = path.join(EPOCH_FILE);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let mut last = first;
        for bad in [&b"nonsense\n"[..], b"", &[0xff; 33], &[b'a'; 4096]] {
            std::fs::write(&file, bad).unwrap();
            let again = open().epoch();
            assert_ne!(again, last, "{bad:?} replaced");
            assert_eq!(open().epoch(), again, "and the replacement kept");
            last = again;
        }
        std::fs::remove_file(&file).unwrap();
        assert_ne!(open().epoch(), last);
    }
}
