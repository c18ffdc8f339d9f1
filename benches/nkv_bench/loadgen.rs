//! The one load generator: N client threads, each with its own state (a connection, or a file
//! loop for the disk floor), released together by a barrier; every op timed with `Instant`.

use std::io;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

/// Each client does at least this many ops, so 64 clients still give a usable p99.
pub const MIN_PER_CLIENT: usize = 20;

/// One client's start, end and per-op latencies (ns).
type ClientRun = (Instant, Instant, Vec<u64>);

/// The outcome of one measurement.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub ops: usize,
    pub ops_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Stats {
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("ops", self.ops as f64),
            ("ops_per_s", self.ops_per_s),
            ("p50_us", self.p50_us),
            ("p99_us", self.p99_us),
        ]
    }
}

/// Runs `clients` threads. `make(c)` builds client `c`'s state inside its thread (so it need
/// not be `Send`); the state is then called once per op with the op's index.
/// The run stops after `total_ops` ops (shared among the clients) or after `limit`.
///
/// ops/s is all completed ops over the time from the first client's start to the last one's end.
pub fn run<C, F>(
    clients: usize,
    total_ops: usize,
    limit: Duration,
    make: F,
) -> Result<Stats, String>
where
    F: Fn(usize) -> io::Result<C> + Sync,
    C: FnMut(usize) -> io::Result<()>,
{
    let per_client = total_ops.div_ceil(clients).max(MIN_PER_CLIENT);
    let barrier = Barrier::new(clients);
    let outcomes: Vec<Result<ClientRun, String>> = thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (barrier, make) = (&barrier, &make);
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || {
                        // Every thread must reach the barrier, even one that failed to set up.
                        let client = make(c);
                        barrier.wait();
                        let mut op = client.map_err(|e| format!("client {c}: setup: {e}"))?;
                        let mut lat = Vec::with_capacity(per_client);
                        let start = Instant::now();
                        let deadline = start + limit;
                        let mut now = start;
                        for i in 0..per_client {
                            if now >= deadline {
                                break;
                            }
                            let t0 = now;
                            op(i).map_err(|e| format!("client {c}, op {i}: {e}"))?;
                            now = Instant::now();
                            lat.push((now - t0).as_nanos() as u64);
                        }
                        Ok((start, now, lat))
                    })
                    .expect("spawning a load-generator thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("client thread panicked".into()))
            })
            .collect()
    });

    let mut lat = Vec::new();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for o in outcomes {
        let (start, end, l) = o?;
        first = Some(first.map_or(start, |f| f.min(start)));
        last = Some(last.map_or(end, |x| x.max(end)));
        lat.extend(l);
    }
    let wall = match (first, last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => return Err("no client ran".into()),
    };
    Ok(summarize(&mut lat, wall))
}

/// Sorts `lat_ns` and computes rate and percentiles.
pub fn summarize(lat_ns: &mut [u64], wall_s: f64) -> Stats {
    lat_ns.sort_unstable();
    Stats {
        ops: lat_ns.len(),
        ops_per_s: if wall_s > 0.0 {
            lat_ns.len() as f64 / wall_s
        } else {
            0.0
        },
        p50_us: percentile(lat_ns, 0.50) as f64 / 1e3,
        p99_us: percentile(lat_ns, 0.99) as f64 / 1e3,
    }
}

/// Nearest-rank percentile of sorted data (0 for no data).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of a set of per-round figures.
pub fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}
