//! One persistent Unix-socket connection speaking plain text lines: a request line out, one
//! reply in. Three dialects share it, so every system is driven by the same code:
//! nkv (`GET k` / `PUT k v`, one JSON line back), Redis (inline `GET k` / `SET k v`, RESP back)
//! and the echo floor (the line comes back as sent).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Nkv,
    Redis,
    Echo,
}

/// A reply slower than this means the server is stuck: the run fails rather than hangs.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// RESP nesting deeper than this is not something a benchmark reply has.
const MAX_RESP_DEPTH: usize = 8;

pub struct Conn {
    dialect: Dialect,
    reader: BufReader<UnixStream>,
    /// The write side, and the handle `shutdown` goes through.
    stream: UnixStream,
    line: Vec<u8>,
    body: Vec<u8>,
}

/// A decoded RESP value (pub/sub messages are arrays of bulk strings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(Vec<u8>),
    Error(Vec<u8>),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Resp>>),
}

impl Conn {
    pub fn connect(path: &Path, dialect: Dialect) -> io::Result<Conn> {
        let stream = UnixStream::connect(path)
            .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        Ok(Conn {
            dialect,
            reader,
            stream,
            line: Vec::with_capacity(8192),
            body: Vec::with_capacity(8192),
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    pub fn send(&mut self, req: &[u8]) -> io::Result<()> {
        (&self.stream).write_all(req)
    }

    /// Sends one request line and returns the reply. An error reply (`{"ok":false...`, `-ERR`)
    /// or a nil reply (`$-1`) is an `Err`: every benchmark request is expected to succeed.
    pub fn call(&mut self, req: &[u8]) -> io::Result<&[u8]> {
        self.send(req)?;
        self.recv()
    }

    /// Reads one reply: a line for nkv and echo, a scalar RESP value for Redis.
    pub fn recv(&mut self) -> io::Result<&[u8]> {
        match self.dialect {
            Dialect::Echo => self.read_line(),
            Dialect::Nkv => {
                self.read_line()?;
                if !self.line.starts_with(b"{\"ok\":true") {
                    return Err(bad_reply(&self.line));
                }
                Ok(&self.line)
            }
            Dialect::Redis => {
                self.read_line()?;
                match self.line.first() {
                    Some(b'+') | Some(b':') => Ok(&self.line),
                    Some(b'$') => {
                        let len = parse_int(&self.line[1..])?;
                        if len < 0 {
                            return Err(io::Error::other("redis replied nil"));
                        }
                        self.read_body(len as usize)?;
                        Ok(&self.body)
                    }
                    _ => Err(bad_reply(&self.line)),
                }
            }
        }
    }

    /// Reads one `\n`-terminated line (kept with its terminator).
    pub fn read_line(&mut self) -> io::Result<&[u8]> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line)?;
        if n == 0 || self.line.last() != Some(&b'\n') {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(&self.line)
    }

    /// Reads one RESP value of any type.
    pub fn read_resp(&mut self) -> io::Result<Resp> {
        self.read_resp_at(0)
    }

    fn read_resp_at(&mut self, depth: usize) -> io::Result<Resp> {
        if depth > MAX_RESP_DEPTH {
            return Err(io::Error::other("RESP nested too deep"));
        }
        self.read_line()?;
        let payload = trim_crlf(&self.line[1..]).to_vec();
        match self.line[0] {
            b'+' => Ok(Resp::Simple(payload)),
            b'-' => Ok(Resp::Error(payload)),
            b':' => Ok(Resp::Int(parse_int(&payload)?)),
            b'$' => {
                let len = parse_int(&payload)?;
                if len < 0 {
                    return Ok(Resp::Bulk(None));
                }
                self.read_body(len as usize)?;
                Ok(Resp::Bulk(Some(self.body.clone())))
            }
            b'*' => {
                let n = parse_int(&payload)?;
                if n < 0 {
                    return Ok(Resp::Array(None));
                }
                let mut items = Vec::with_capacity((n as usize).min(64));
                for _ in 0..n {
                    items.push(self.read_resp_at(depth + 1)?);
                }
                Ok(Resp::Array(Some(items)))
            }
            _ => Err(bad_reply(&self.line)),
        }
    }

    /// Reads a bulk string body of `len` bytes plus its `\r\n` into `self.body` (without it).
    fn read_body(&mut self, len: usize) -> io::Result<()> {
        self.body.resize(len + 2, 0);
        self.reader.read_exact(&mut self.body)?;
        if &self.body[len..] != b"\r\n" {
            return Err(io::Error::other("RESP bulk string not terminated by CRLF"));
        }
        self.body.truncate(len);
        Ok(())
    }
}

fn trim_crlf(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

fn parse_int(b: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(trim_crlf(b))
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::other(format!("bad RESP length {:?}", String::from_utf8_lossy(b)))
        })
}

fn bad_reply(line: &[u8]) -> io::Error {
    let shown: String = String::from_utf8_lossy(line).chars().take(300).collect();
    io::Error::other(format!("unexpected reply {:?}", shown.trim_end()))
}

/// Appends `n` in decimal to `buf` without going through `fmt`.
pub fn push_u64(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}
