//! Compare-and-set and session keys on a [`Client`]: `put_if`/`delete_if` with their [`Cas`]
//! outcome, and `put_session` with what keeps a session key alive (the client's connection).

use serde::Serialize;
use serde_json::value::RawValue;

use super::{parse_reply, Client, Interrupter};
use crate::error::{Error, ErrorCode};
use crate::wire::{self, JsonRequest, Op};

impl Client {
    /// Stores `value` under `key` only if the key is at revision `rev` (`0`: only if it does
    /// not exist). A conflict is an outcome, not an error: it carries the key's current
    /// revision, so the caller can read again and retry.
    ///
    /// # Errors
    /// An invalid key, a value over the server's limit, or a connection or server failure.
    pub fn put_if<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
        rev: u64,
    ) -> Result<Cas, Error> {
        let value: Box<RawValue> =
            serde_json::value::to_raw_value(value).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut request = JsonRequest::new(Op::Put).key(key);
        request.value = Some(&value);
        request.if_rev = Some(rev);
        self.compare_and_set(&request)
    }

    /// Deletes `key` only if it is at revision `rev`; a conflict carries the current revision
    /// (0 when the key does not exist).
    ///
    /// # Errors
    /// An invalid key, a connection or server failure; `not_found` for `rev` 0 of a missing
    /// key (there is nothing to delete and nothing conflicts).
    pub fn delete_if(&mut self, key: &str, rev: u64) -> Result<Cas, Error> {
        let mut request = JsonRequest::new(Op::Del).key(key);
        request.if_rev = Some(rev);
        self.compare_and_set(&request)
    }

    fn compare_and_set(&mut self, request: &JsonRequest) -> Result<Cas, Error> {
        let text = serde_json::to_string(request).map_err(|e| Error::Protocol(e.to_string()))?;
        let line = self.round_trip(&text, false)?;
        cas_outcome(&line)
    }

    /// Stores `value` under `key` as a session key of this client's connection: kept in
    /// memory only, and deleted by the server (subscribers get a `del`) when the connection
    /// closes — this client dropped, the process dying, the server stopping. Keep the client
    /// (and use it, or [`Client::wait_closed`]) for as long as the key should live. If the
    /// connection is lost, the key is gone with it, and the next request opens a new one:
    /// put the key again ([`Client::connections`] tells that it happened).
    ///
    /// # Errors
    /// An invalid key, a value over the server's limit, or a connection or server failure.
    pub fn put_session<T: Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
    ) -> Result<u64, Error> {
        let value: Box<RawValue> =
            serde_json::value::to_raw_value(value).map_err(|e| Error::Protocol(e.to_string()))?;
        let mut request = JsonRequest::new(Op::Put).key(key);
        request.value = Some(&value);
        request.session = Some(true);
        let rev: wire::Rev = self.call(&request)?;
        Ok(rev.rev)
    }

    /// How many connections this client has opened so far: a session key put on an earlier
    /// one is gone.
    pub fn connections(&self) -> u64 {
        self.opened
    }

    /// Blocks until the server closes this client's connection (a server stopping or
    /// restarting, or dropping the connection); returns at once when none is open. What a
    /// holder of session keys waits on: when this returns, they are gone. The next request
    /// opens a new connection.
    ///
    /// # Errors
    /// The socket refused the setting.
    pub fn wait_closed(&mut self) -> Result<(), Error> {
        let Some(conn) = &mut self.conn else {
            return Ok(());
        };
        conn.reader.get_ref().set_read_timeout(None)?;
        // The server sends nothing unasked on a request connection: any line is its last
        // word (an idle-timeout or shutdown notice) before it closes.
        let _ = conn.read_line();
        self.conn = None;
        Ok(())
    }

    /// A handle that closes this client's current connection from another thread (so that a
    /// [`Client::wait_closed`] returns), `None` when none is open.
    ///
    /// # Errors
    /// No descriptor was free to make it.
    pub fn interrupter(&self) -> Result<Option<Interrupter>, Error> {
        match &self.conn {
            Some(conn) => Ok(Some(Interrupter::stream(
                conn.reader.get_ref().try_clone()?,
            ))),
            None => Ok(None),
        }
    }
}

/// A compare-and-set's outcome: applied, or refused because the key is at another revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Cas {
    /// The change was applied at this revision.
    Done(u64),
    /// Nothing changed: the key is at this revision (0: it does not exist).
    Conflict(u64),
}

impl Cas {
    /// The new revision when applied.
    pub fn done(self) -> Option<u64> {
        match self {
            Cas::Done(rev) => Some(rev),
            Cas::Conflict(_) => None,
        }
    }
}

/// Decodes a compare-and-set's response line: a conflict is an outcome, any other failure an
/// error.
///
/// # Errors
/// A failure response other than `conflict`, or a line of another shape.
pub fn cas_outcome(line: &str) -> Result<Cas, Error> {
    match parse_reply::<wire::Rev>(line) {
        Ok(rev) => Ok(Cas::Done(rev.rev)),
        Err(e) if e.code() == Some(ErrorCode::Conflict) => {
            let conflict: wire::Conflict<String> = serde_json::from_str(line).map_err(|e| {
                Error::Protocol(format!("a conflict without its rev ({e}): {line:?}"))
            })?;
            Ok(Cas::Conflict(conflict.rev))
        }
        Err(e) => Err(e),
    }
}
