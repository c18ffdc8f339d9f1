//! Put peak memory (part of the footprint section): how much a server's peak RSS grows while
//! several clients each put one large JSON array at once, per byte of value in flight. A
//! server that builds a JSON tree to validate a value pays ~16× its size; nkv should hold its
//! line buffer and one copy of the value (≤ ~2×). Redis the same way (a SET of the same bytes).

use std::fs;
use std::thread;

use crate::results::Results;
use crate::servers::{Base, Env, Server};
use crate::wire::Dialect;

/// Clients putting at once, and the size of each one's value.
pub const CLIENTS: usize = 4;
pub const VALUE_BYTES: usize = 15 << 20;

pub fn run(env: &Env, res: &mut Results) -> Result<(), String> {
    let value = array(VALUE_BYTES);
    let dir = env.fresh_dir(Base::Disk, "putmem")?;
    let mut nkv = env.start_nkv("putmem", &dir)?;
    measure(&nkv, "nkv", &value, res)?;
    crate::stop(&mut nkv, res);
    if env.redis_bin.is_some() {
        let redis = env.start_redis("putmem-redis")?;
        measure(&redis, "redis", &value, res)?;
    }
    Ok(())
}

/// `[1,1,...,1]` of about `bytes` bytes: many small elements, the worst case for a tree.
fn array(bytes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes + 2);
    v.push(b'[');
    while v.len() < bytes {
        v.extend_from_slice(b"1,");
    }
    v.extend_from_slice(b"1]");
    v
}

fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or(format!("{path} has no {field}"))
}

fn measure(server: &Server, sys: &str, value: &[u8], res: &mut Results) -> Result<(), String> {
    let pid = server.proc.pid();
    // Writing 5 to clear_refs resets the peak (VmHWM) to the current RSS.
    fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .map_err(|e| format!("reset the peak RSS of {sys}: {e}"))?;
    let before = status_kib(pid, "VmRSS:")?;
    let requests: Vec<Vec<u8>> = (0..CLIENTS)
        .map(|i| request(server.dialect, &format!("putmem.{i}"), value))
        .collect();
    let mut conns = Vec::new();
    for _ in 0..CLIENTS {
        conns.push(server.connect()?);
    }
    let results: Vec<Result<(), String>> = thread::scope(|scope| {
        let handles: Vec<_> = conns
            .iter_mut()
            .zip(&requests)
            .map(|(c, req)| {
                scope.spawn(move || {
                    let reply = c.call(req).map_err(|e| format!("{sys} put: {e}"))?;
                    let text = String::from_utf8_lossy(reply);
                    if text.contains("\"ok\":true") || text.starts_with("+OK") {
                        Ok(())
                    } else {
                        Err(format!(
                            "{sys} put failed: {}",
                            &text[..text.len().min(200)]
                        ))
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err("client thread panicked".into())))
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    let peak = status_kib(pid, "VmHWM:")?;
    let in_flight_kib = (CLIENTS * value.len()) as f64 / 1024.0;
    let grown = peak.saturating_sub(before) as f64;
    res.add(
        &format!("putmem/{sys}"),
        &[
            ("peak_growth_kib", grown),
            ("in_flight_kib", in_flight_kib),
            ("per_value_byte", grown / in_flight_kib),
        ],
    );
    Ok(())
}

fn request(dialect: Dialect, key: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 64);
    match dialect {
        Dialect::Redis => {
            out.extend_from_slice(
                format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n",
                    key.len(),
                    value.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        _ => {
            out.extend_from_slice(format!("PUT {key} ").as_bytes());
            out.extend_from_slice(value);
            out.push(b'\n');
        }
    }
    out
}
