//! One measurement ("cell") of GET, PUT, wildcard GET or a floor, driven by the shared load
//! generator with one persistent connection (or file loop) per client thread.

use std::io;
use std::path::Path;

use crate::floors;
use crate::loadgen::{self, Stats};
use crate::opts::Plan;
use crate::servers::Server;
use crate::wire::{push_u64, Conn, Dialect};

/// Distinct keys each PUT client (and each rename-floor client) cycles through.
pub const PUT_KEYS_PER_CLIENT: usize = 256;

/// A value of `size` bytes on the wire: a JSON string for nkv (quotes included), plain bytes
/// for Redis.
pub fn value(dialect: Dialect, size: usize) -> Vec<u8> {
    match dialect {
        Dialect::Nkv => {
            let mut v = vec![b'"'];
            v.resize(size.max(2) - 1, b'x');
            v.push(b'"');
            v
        }
        _ => vec![b'x'; size],
    }
}

/// Keys read by the GET cells with values of `size` bytes: `<prefix><i>`.
pub fn get_prefix(size: usize) -> String {
    format!("bench.g{size}.")
}

fn terminator(d: Dialect) -> &'static [u8] {
    if d == Dialect::Redis {
        b"\r\n"
    } else {
        b"\n"
    }
}

/// Loads the keys the GET cells read.
pub fn load_get_keys(server: &Server, plan: &Plan) -> Result<(), String> {
    for &size in &plan.value_sizes {
        server.populate(
            &get_prefix(size),
            plan.get_keys,
            &value(server.dialect, size),
        )?;
    }
    Ok(())
}

/// `GET <key>` against nkv or Redis, or the same line against the echo floor.
pub fn get(
    socket: &Path,
    dialect: Dialect,
    clients: usize,
    size: usize,
    plan: &Plan,
) -> Result<Stats, String> {
    let prefix = get_prefix(size);
    let keys = plan.get_keys;
    loadgen::run(clients, plan.ops_per_cell, plan.cell_time, |c| {
        let mut conn = Conn::connect(socket, dialect)?;
        let mut req = Vec::with_capacity(128);
        let prefix = prefix.as_bytes();
        Ok(move |i: usize| {
            req.clear();
            req.extend_from_slice(b"GET ");
            req.extend_from_slice(prefix);
            push_u64(&mut req, ((c * 7919 + i) % keys) as u64);
            req.extend_from_slice(terminator(dialect));
            let reply = conn.call(&req)?;
            let ok = match dialect {
                Dialect::Echo => reply == req.as_slice(),
                _ => reply.len() >= size,
            };
            if !ok {
                return Err(io::Error::other(format!(
                    "short reply to GET: {:?}",
                    String::from_utf8_lossy(reply)
                )));
            }
            Ok(())
        })
    })
}

/// `PUT <key> <value>` (nkv) or `SET <key> <value>` (Redis), each client cycling its own keys.
pub fn put(server: &Server, clients: usize, size: usize, plan: &Plan) -> Result<Stats, String> {
    put_under(server, clients, size, plan, b"bench.p")
}

/// `put` of `memory`-class keys: `runtime.*` is `memory` by default, so no file is written.
pub fn put_memory(
    server: &Server,
    clients: usize,
    size: usize,
    plan: &Plan,
) -> Result<Stats, String> {
    put_under(server, clients, size, plan, b"runtime.bench.p")
}

fn put_under(
    server: &Server,
    clients: usize,
    size: usize,
    plan: &Plan,
    prefix: &'static [u8],
) -> Result<Stats, String> {
    let dialect = server.dialect;
    let val = value(dialect, size);
    let verb: &[u8] = if dialect == Dialect::Redis {
        b"SET "
    } else {
        b"PUT "
    };
    loadgen::run(clients, plan.ops_per_cell, plan.cell_time, |c| {
        let mut conn = Conn::connect(&server.socket, dialect)?;
        let mut req = Vec::with_capacity(val.len() + 128);
        let val = &val;
        Ok(move |i: usize| {
            req.clear();
            req.extend_from_slice(verb);
            req.extend_from_slice(prefix);
            push_u64(&mut req, size as u64);
            req.push(b'.');
            push_u64(&mut req, c as u64);
            req.push(b'.');
            push_u64(&mut req, (i % PUT_KEYS_PER_CLIENT) as u64);
            req.push(b' ');
            req.extend_from_slice(val);
            req.extend_from_slice(terminator(dialect));
            conn.call(&req)?;
            Ok(())
        })
    })
}

/// The temp-file-and-rename floor in `dir`, same value size and key cycling as `put`.
pub fn rename_floor(
    dir: &Path,
    clients: usize,
    size: usize,
    plan: &Plan,
    fsync: bool,
) -> Result<Stats, String> {
    let val = value(Dialect::Nkv, size);
    // The files stay until the end of the run: deleting them here would add inode churn that
    // nkv's PUTs do not cause (ext4 skips recently freed inodes when allocating, at a cost
    // that grows with their number), and charge it to whichever cell comes next.
    loadgen::run(clients, plan.ops_per_cell, plan.cell_time, |c| {
        Ok(floors::rename_op(
            dir,
            c,
            PUT_KEYS_PER_CLIENT,
            val.clone(),
            fsync,
        ))
    })
}

/// Loads the wildcard keys: exactly `n` keys under `bench`, on a server holding nothing else.
pub fn load_wildcard_keys(server: &Server, n: usize) -> Result<(), String> {
    server.populate("bench.w", n, &value(Dialect::Nkv, 100))?;
    let reply = server.ask("GET bench.*\n")?;
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| format!("GET bench.* reply: {e}"))?;
    let got = v["values"].as_object().map_or(0, |m| m.len());
    if got != n {
        return Err(format!("GET bench.* returned {got} keys, expected {n}"));
    }
    Ok(())
}

/// `GET bench.*`; every reply must be at least `min_len` bytes (all the keys, not an error).
pub fn wildcard(
    server: &Server,
    clients: usize,
    min_len: usize,
    plan: &Plan,
) -> Result<Stats, String> {
    let ops = (plan.ops_per_cell / 10).max(100);
    loadgen::run(clients, ops, plan.cell_time, |_| {
        let mut conn = Conn::connect(&server.socket, Dialect::Nkv)?;
        Ok(move |_| {
            let n = conn.call(b"GET bench.*\n")?.len();
            if n < min_len {
                return Err(io::Error::other(format!(
                    "wildcard reply of {n} bytes, expected at least {min_len}"
                )));
            }
            Ok(())
        })
    })
}

/// What a shell one-liner (`echo 'GET k' | socat - UNIX-CONNECT:...`) costs: connect, one
/// `GET`, close, every op on a new connection. The GET keys of the smallest value size.
pub fn connect_get(
    socket: &Path,
    dialect: Dialect,
    clients: usize,
    plan: &Plan,
) -> Result<Stats, String> {
    let size = plan.value_sizes[0];
    let prefix = get_prefix(size);
    let keys = plan.get_keys;
    loadgen::run(clients, plan.ops_per_cell, plan.cell_time, |c| {
        let mut req = Vec::with_capacity(128);
        let prefix = prefix.as_bytes();
        Ok(move |i: usize| {
            req.clear();
            req.extend_from_slice(b"GET ");
            req.extend_from_slice(prefix);
            push_u64(&mut req, ((c * 7919 + i) % keys) as u64);
            req.extend_from_slice(terminator(dialect));
            let mut conn = Conn::connect(socket, dialect)?;
            let reply = conn.call(&req)?;
            if reply.len() < size {
                return Err(io::Error::other(format!(
                    "short reply to GET: {:?}",
                    String::from_utf8_lossy(reply)
                )));
            }
            Ok(())
        })
    })
}
