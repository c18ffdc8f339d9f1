//! Reading a framed connection's one request frame, bounded as a partial line is: the whole
//! frame, not each read, must arrive within the idle timeout. A frame that is cut short (the
//! client stalls or half-closes) is still answered, `FAILED` with what its start shows.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::wire::{self, BadRequest, MAX_FRAME, PREFIX_OF_OVERSIZED};

/// What the request frame turned out to be.
pub enum Incoming {
    Frame(Vec<u8>),
    /// Over [`MAX_FRAME`]: only the start (at most [`PREFIX_OF_OVERSIZED`] bytes) is read.
    TooLarge {
        len: usize,
        prefix: Vec<u8>,
    },
    /// The stream ended or the deadline passed before the frame was whole: what arrived of its
    /// payload, and the length its header announced (`None`: the header itself was cut).
    Cut {
        prefix: Vec<u8>,
        len: Option<usize>,
    },
}

/// Reads one frame, all of it by `deadline` (none: no limit).
///
/// # Errors
/// The socket failed (other than timing out, which is [`Incoming::Cut`]).
pub fn read_frame(stream: &UnixStream, deadline: Option<Instant>) -> io::Result<Incoming> {
    let _ = stream.set_read_timeout(None);
    let mut len = [0u8; 4];
    if read_by(stream, &mut len, deadline)? < len.len() {
        return Ok(Incoming::Cut {
            prefix: Vec::new(),
            len: None,
        });
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        let mut prefix = vec![0u8; PREFIX_OF_OVERSIZED];
        let got = read_by(stream, &mut prefix, deadline)?;
        prefix.truncate(got);
        return Ok(Incoming::TooLarge { len, prefix });
    }
    let mut payload = vec![0u8; len];
    let got = read_by(stream, &mut payload, deadline)?;
    if got < len {
        payload.truncate(got);
        return Ok(Incoming::Cut {
            prefix: payload,
            len: Some(len),
        });
    }
    Ok(Incoming::Frame(payload))
}

/// Fills `buf` until it is full, the stream ends or `deadline` passes; how many bytes came.
fn read_by(stream: &UnixStream, buf: &mut [u8], deadline: Option<Instant>) -> io::Result<usize> {
    let mut reader = stream;
    let mut got = 0;
    while got < buf.len() {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            stream.set_read_timeout(Some(left))?;
        }
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The `FAILED` reply for a request known only by its start: the kind of its command and its
/// id when the start shows them. When the start is not the whole request (`whole` false), only
/// its complete fields count, so a cut id is not echoed as if it were the client's.
pub fn failed_start(start: &[u8], whole: bool, reason: String) -> BadRequest {
    let start = if whole {
        start
    } else {
        match start.iter().rposition(|&b| b == b' ' || b == b'\n') {
            Some(end) => &start[..end],
            None => &[],
        }
    };
    let mut err = match wire::parse_request(start) {
        Ok(req) => BadRequest {
            kind: req.command.reply_kind(),
            id: req.id.to_owned(),
            reason: String::new(),
        },
        Err(err) => err,
    };
    err.reason = reason;
    err
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::framed::wire::ReplyKind;

    #[test]
    fn a_cut_start_gives_only_its_whole_fields() {
        let got = |start: &[u8], whole| {
            let err = failed_start(start, whole, String::new());
            (err.kind, err.id)
        };
        assert_eq!(got(b"HEALTH 5 c\n", false), (ReplyKind::Base, "5".into()));
        assert_eq!(
            got(b"GET r12 c a.b", false),
            (ReplyKind::Data, "r12".into())
        );
        assert_eq!(got(b"GET r1", false), (ReplyKind::Data, "-".into()));
        assert_eq!(got(b"TRACE r1 ", false), (ReplyKind::Trace, "r1".into()));
        assert_eq!(got(b"", false), (ReplyKind::Base, "-".into()));
        assert_eq!(
            got(b"PUT 4 c k AAAA\n", true),
            (ReplyKind::Base, "4".into())
        );
    }
}
