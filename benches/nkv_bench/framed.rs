//! The framed protocol (that of the nkv this project replaces) beside the line protocol, on
//! the same server and keys. Framed clients open a connection per request, as upstream's
//! client library does; so the line protocol is measured both that way and over one
//! persistent connection (the `get`/`put-disk` cells), to show what the connection costs and
//! what the protocol costs.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::kv::{self, get_prefix, PUT_KEYS_PER_CLIENT};
use crate::loadgen::{self, Stats};
use crate::opts::Plan;
use crate::results::{num, ops, ratio, size_label, times, Results, Table};
use crate::servers::Server;
use crate::wire::{push_u64, Dialect};

/// Client counts of the framed cells: a connection (and a server thread) per request makes
/// many clients measure thread creation more than anything else.
fn clients(plan: &Plan) -> Vec<usize> {
    plan.clients.iter().copied().filter(|&c| c <= 8).collect()
}

/// One round: framed GET and PUT, and line GET and PUT with a connection per request.
pub fn round(nkv: &Server, plan: &Plan, res: &mut Results) -> Result<(), String> {
    for c in clients(plan) {
        for &v in &plan.value_sizes {
            let cells: [(&str, Stats); 4] = [
                ("framed-get", get(&nkv.socket, Proto::Framed, c, v, plan)?),
                ("line1-get", get(&nkv.socket, Proto::Line, c, v, plan)?),
                ("framed-put", put(&nkv.socket, Proto::Framed, c, v, plan)?),
                ("line1-put", put(&nkv.socket, Proto::Line, c, v, plan)?),
            ];
            for (name, st) in cells {
                res.add(&format!("{name}/c{c}/v{v}"), &st.metrics());
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Framed,
    /// The line protocol, one request per connection.
    Line,
}

/// One request on a new connection; the reply (a frame's payload, or a line).
fn once(socket: &Path, proto: Proto, req: &[u8], reply: &mut Vec<u8>) -> io::Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    reply.clear();
    match proto {
        Proto::Framed => {
            let mut frame = Vec::with_capacity(req.len() + 4);
            frame.extend_from_slice(&(req.len() as u32).to_le_bytes());
            frame.extend_from_slice(req);
            stream.write_all(&frame)?;
            let mut len = [0u8; 4];
            stream.read_exact(&mut len)?;
            reply.resize(u32::from_le_bytes(len) as usize, 0);
            stream.read_exact(reply)?;
        }
        Proto::Line => {
            stream.write_all(req)?;
            BufReader::new(stream).read_until(b'\n', reply)?;
        }
    }
    Ok(())
}

fn check(ok: bool, what: &str, reply: &[u8]) -> io::Result<()> {
    if ok {
        return Ok(());
    }
    let shown: String = String::from_utf8_lossy(reply).chars().take(120).collect();
    Err(io::Error::other(format!(
        "unexpected reply to {what}: {shown:?}"
    )))
}

fn get(
    socket: &Path,
    proto: Proto,
    clients: usize,
    size: usize,
    plan: &Plan,
) -> Result<Stats, String> {
    let prefix = get_prefix(size);
    let keys = plan.get_keys;
    // A connection per op costs more: fewer ops keep the cell within its time.
    loadgen::run(clients, plan.ops_per_cell / 4, plan.cell_time, |c| {
        let (mut req, mut reply) = (Vec::with_capacity(128), Vec::with_capacity(size * 2));
        let prefix = prefix.as_bytes();
        Ok(move |i: usize| {
            req.clear();
            req.extend_from_slice(if proto == Proto::Framed {
                b"GET b1 bench "
            } else {
                b"GET "
            });
            req.extend_from_slice(prefix);
            push_u64(&mut req, ((c * 7919 + i) % keys) as u64);
            req.push(b'\n');
            once(socket, proto, &req, &mut reply)?;
            let ok = match proto {
                Proto::Framed => reply.starts_with(b"data b1 OK ") && reply.len() >= size,
                Proto::Line => reply.starts_with(b"{\"ok\":true") && reply.len() >= size,
            };
            check(ok, "GET", &reply)
        })
    })
}

fn put(
    socket: &Path,
    proto: Proto,
    clients: usize,
    size: usize,
    plan: &Plan,
) -> Result<Stats, String> {
    // The same stored value both ways: a JSON string of `size` bytes, quotes included.
    let json = kv::value(Dialect::Nkv, size);
    let payload: Vec<u8> = match proto {
        Proto::Line => json,
        Proto::Framed => base64(&json[1..json.len() - 1]),
    };
    loadgen::run(clients, plan.ops_per_cell / 4, plan.cell_time, |c| {
        let (mut req, mut reply) = (Vec::with_capacity(payload.len() + 128), Vec::new());
        let payload = &payload;
        Ok(move |i: usize| {
            req.clear();
            req.extend_from_slice(if proto == Proto::Framed {
                b"PUT b1 bench bench.f"
            } else {
                b"PUT bench.f"
            });
            push_u64(&mut req, size as u64);
            req.push(b'.');
            push_u64(&mut req, c as u64);
            req.push(b'.');
            push_u64(&mut req, (i % PUT_KEYS_PER_CLIENT) as u64);
            req.push(b' ');
            req.extend_from_slice(payload);
            req.push(b'\n');
            once(socket, proto, &req, &mut reply)?;
            let ok = match proto {
                Proto::Framed => reply == b"base b1 OK\n",
                Proto::Line => reply.starts_with(b"{\"ok\":true"),
            };
            check(ok, "PUT", &reply)
        })
    })
}

fn base64(bytes: &[u8]) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                A[(n >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
    }
    out
}

/// The table: framed and line-per-request beside the line protocol's persistent connection.
pub fn table(res: &Results, plan: &Plan) -> Option<Table> {
    if !res.get_any("framed-get/") {
        return None;
    }
    let mut t = Table::new(
        "Framed protocol (connection per request) beside the line protocol (ops/s; latency µs)",
        &[
            "op",
            "clients",
            "value",
            "framed ops/s",
            "p50",
            "p99",
            "line, conn/request ops/s",
            "p50",
            "line, persistent ops/s",
            "framed/line-per-request ops/s",
        ],
    );
    for (op, persistent) in [("get", "get/nkv"), ("put", "put-disk/nkv")] {
        for c in clients(plan) {
            for &v in &plan.value_sizes {
                let f = format!("framed-{op}/c{c}/v{v}");
                let l = format!("line1-{op}/c{c}/v{v}");
                let p = format!("{persistent}/c{c}/v{v}");
                t.row(vec![
                    op.to_uppercase(),
                    c.to_string(),
                    size_label(v),
                    ops(res.get(&f, "ops_per_s")),
                    num(res.get(&f, "p50_us")),
                    num(res.get(&f, "p99_us")),
                    ops(res.get(&l, "ops_per_s")),
                    num(res.get(&l, "p50_us")),
                    ops(res.get(&p, "ops_per_s")),
                    times(ratio(res.get(&f, "ops_per_s"), res.get(&l, "ops_per_s"))),
                ]);
            }
        }
    }
    t.footer = Some(
        "Framed clients (upstream's library and nkv-client) open a connection per request; the \
         line protocol's persistent figures are the GET and PUT (disk) tables' cells of the same \
         run (empty when those sections did not run)."
            .into(),
    );
    Some(t)
}
