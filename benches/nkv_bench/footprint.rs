//! Footprint: a fresh server's RSS and threads idle, with idle connections open, and holding
//! many keys; Redis the same way; the sizes of the stripped binaries.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use crate::kv;
use crate::opts::Plan;
use crate::results::Results;
use crate::servers::{Base, Env, Server};
use crate::startup::{Datasets, DATASET_PREFIX};
use crate::wire::Dialect;

/// Idle subscriber connections held for the "subs" state.
pub const IDLE_SUBSCRIBERS: usize = 1000;

/// Keys of the snapshot each subscriber reads in the "subs_after_snapshot" state.
const SNAPSHOT_KEYS: usize = 1000;

/// Time given to a server to settle (finish accepting, free buffers) before /proc is read.
const SETTLE: Duration = Duration::from_millis(300);

pub fn run(
    env: &Env,
    plan: &Plan,
    res: &mut Results,
    datasets: &mut Datasets,
) -> Result<(), String> {
    let dir = env.fresh_dir(Base::Disk, "footprint")?;
    let mut nkv = env.start_nkv("footprint", &dir)?;
    measure(&nkv, "nkv", plan, res)?;
    let keys = nkv.stats_keys()?;
    if keys != plan.footprint_keys as u64 {
        res.note(format!(
            "nkv STATS reports {keys} keys after {} distinct PUTs",
            plan.footprint_keys
        ));
    }
    crate::stop(&mut nkv, res);
    datasets.adopt(plan.footprint_keys, dir);

    if env.redis_bin.is_some() {
        let redis = env.start_redis("footprint-redis")?;
        measure(&redis, "redis", plan, res)?;
    }

    for (name, path) in [
        ("nkv-server", env.bin.as_path()),
        ("nkv-client", env.client_bin.as_path()),
    ] {
        match fs::metadata(path) {
            Ok(m) => {
                let stripped = if is_stripped(path) { 1.0 } else { 0.0 };
                res.add(
                    &format!("binary/{name}"),
                    &[("bytes", m.len() as f64), ("stripped", stripped)],
                );
            }
            Err(e) => res.note(format!("cannot stat {}: {e}", path.display())),
        }
    }
    Ok(())
}

fn measure(server: &Server, sys: &str, plan: &Plan, res: &mut Results) -> Result<(), String> {
    let record = |res: &mut Results, state: &str| -> Result<(), String> {
        thread::sleep(SETTLE);
        let st = server.proc.status()?;
        res.add(
            &format!("footprint/{sys}/{state}"),
            &[
                ("rss_kib", st.rss_kib as f64),
                ("threads", st.threads as f64),
            ],
        );
        Ok(())
    };
    record(res, "idle")?;

    let probe: &[u8] = if server.dialect == Dialect::Redis {
        b"PING\r\n"
    } else {
        b"HEALTH\n"
    };
    let mut conns = Vec::with_capacity(plan.idle_connections);
    for i in 0..plan.idle_connections {
        let mut c = server.connect()?;
        c.call(probe)
            .map_err(|e| format!("idle connection {i}: {e}"))?;
        conns.push(c);
    }
    record(res, "conns")?;
    drop(conns);

    // Idle subscribers: `SUB` (or `SUBSCRIBE`) and nothing else.
    let mut subs = Vec::with_capacity(IDLE_SUBSCRIBERS);
    for i in 0..IDLE_SUBSCRIBERS {
        subs.push(
            crate::notify::Sub::open(server).map_err(|e| format!("idle subscriber {i}: {e}"))?,
        );
    }
    record(res, "subs")?;
    drop(subs);
    if server.dialect != Dialect::Redis {
        subs_after_snapshot(server, res, &record)?;
    }

    server.populate(
        DATASET_PREFIX,
        plan.footprint_keys,
        &kv::value(server.dialect, 100),
    )?;
    record(res, "keys")
}

/// Idle subscribers that each read a snapshot of [`SNAPSHOT_KEYS`] small keys first: what an
/// idle subscriber costs after ordinary use (its queue, send buffer and the allocator's arenas
/// must have given the snapshot's memory back). The keys are deleted afterwards.
fn subs_after_snapshot(
    server: &Server,
    res: &mut Results,
    record: &dyn Fn(&mut Results, &str) -> Result<(), String>,
) -> Result<(), String> {
    server.populate("fp.k", SNAPSHOT_KEYS, &kv::value(server.dialect, 8))?;
    let mut subs = Vec::with_capacity(IDLE_SUBSCRIBERS);
    for i in 0..IDLE_SUBSCRIBERS {
        let ctx = |e: std::io::Error| format!("snapshot subscriber {i}: {e}");
        let mut c = server.connect()?;
        c.call(b"SUB fp\n").map_err(ctx)?;
        let mut ready = false;
        for _ in 0..=SNAPSHOT_KEYS {
            if c.read_line()
                .map_err(ctx)?
                .starts_with(b"{\"event\":\"ready\"")
            {
                ready = true;
                break;
            }
        }
        if !ready {
            return Err(format!("snapshot subscriber {i}: no ready marker"));
        }
        subs.push(c);
    }
    record(res, "subs_after_snapshot")?;
    drop(subs);
    let mut c = server.connect()?;
    c.call(b"DEL fp.*\n")
        .map_err(|e| format!("deleting fp.*: {e}"))?;
    Ok(())
}

/// Whether the ELF file at `path` has no symbol table section (SHT_SYMTAB), as `strip` leaves it.
fn is_stripped(path: &Path) -> bool {
    const SHT_SYMTAB: u32 = 2;
    let Ok(b) = fs::read(path) else { return false };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false; // not a 64-bit ELF: cannot tell
    }
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")) as usize)
    };
    let (Some(shoff), Some(shentsize), Some(shnum)) = (u64_at(0x28), u16_at(0x3A), u16_at(0x3C))
    else {
        return false;
    };
    !(0..shnum).any(|i| u32_at(shoff + i * shentsize + 4) == Some(SHT_SYMTAB))
}
