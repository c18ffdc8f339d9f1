//! Notification latency: put acknowledged → event received, for N subscriber connections.
//!
//! Paced phase: the writer sends one put (its value carries a sequence number), records the
//! ack time, and waits until every subscriber has the event before the next; so the figure is
//! the delivery latency itself, not a queue. Burst phase: puts back to back; events delivered
//! per second over the fan-out.
//!
//! nkv subscribers `SUB bench.n` and read up to the `ready` marker; Redis subscribers
//! `SUBSCRIBE __keyspace@0__:bench.n` (the event carries no value, so the k-th message is
//! taken as seq k — Redis pub/sub drops nothing to a reader that keeps up).

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use crate::loadgen::percentile;
use crate::servers::Server;
use crate::wire::{push_u64, Conn, Dialect, Resp};

/// How long the paced writer waits for every subscriber to have one event.
const PACE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the burst may take to drain to every subscriber.
const BURST_TIMEOUT: Duration = Duration::from_secs(20);
/// The whole measurement stops putting after this.
const RUN_LIMIT: Duration = Duration::from_secs(60);
/// The burst is cut to this many events over all subscribers (1,000 subscribers × 2,000 puts
/// would not drain within `BURST_TIMEOUT` for a system that cannot coalesce).
const MAX_BURST_EVENTS: usize = 400_000;
/// At most this many lines of snapshot before the `ready` marker.
const MAX_SNAPSHOT_LINES: usize = 10_000;

#[derive(Clone, Copy, Debug)]
pub struct NotifyStats {
    /// Burst puts over the time from the burst's start until every subscriber holds the final
    /// value (the fan-out figure: nkv may coalesce, Redis may not).
    pub changes_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The same, measured from when the put was sent (an event may arrive before the ack, and
    /// then counts as 0 above).
    pub send_p50_us: f64,
    pub send_p99_us: f64,
    /// The writer's own put: sent → acknowledged, paced phase.
    pub ack_p50_us: f64,
    pub ack_p99_us: f64,
    /// (subscriber, seq) pairs of the paced phase whose event never arrived.
    pub lost: usize,
    pub events_per_s: f64,
    /// Burst events received over burst events that a lossless fan-out would deliver.
    pub delivered: f64,
}

impl NotifyStats {
    pub fn metrics(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("p50_us", self.p50_us),
            ("p99_us", self.p99_us),
            ("max_us", self.max_us),
            ("send_p50_us", self.send_p50_us),
            ("send_p99_us", self.send_p99_us),
            ("ack_p50_us", self.ack_p50_us),
            ("ack_p99_us", self.ack_p99_us),
            ("lost", self.lost as f64),
            ("events_per_s", self.events_per_s),
            ("delivered", self.delivered),
            ("changes_per_s", self.changes_per_s),
        ]
    }
}

pub(crate) enum Sub {
    Nkv(Conn),
    /// The connection and the number of messages seen so far.
    Redis(Conn, u64),
}

impl Sub {
    pub(crate) fn open(server: &Server) -> Result<Sub, String> {
        let mut c = server.connect()?;
        let ctx = |e: io::Error| format!("subscribing on {}: {e}", server.proc.name());
        match server.dialect {
            Dialect::Redis => {
                c.send(b"SUBSCRIBE __keyspace@0__:bench.n\r\n")
                    .map_err(ctx)?;
                match c.read_resp().map_err(ctx)? {
                    Resp::Array(Some(items))
                        if items.first() == Some(&Resp::Bulk(Some(b"subscribe".to_vec()))) => {}
                    other => return Err(format!("SUBSCRIBE answered {other:?}")),
                }
                Ok(Sub::Redis(c, 0))
            }
            _ => {
                c.call(b"SUB bench.n\n").map_err(ctx)?;
                for _ in 0..MAX_SNAPSHOT_LINES {
                    if c.read_line()
                        .map_err(ctx)?
                        .starts_with(b"{\"event\":\"ready\"")
                    {
                        return Ok(Sub::Nkv(c));
                    }
                }
                Err(format!(
                    "no ready marker within {MAX_SNAPSHOT_LINES} lines after SUB bench.n"
                ))
            }
        }
    }

    fn stream(&self) -> &UnixStream {
        match self {
            Sub::Nkv(c) | Sub::Redis(c, _) => c.stream(),
        }
    }

    /// The sequence number of the next event, or `None` for an event that carries none.
    fn next_seq(&mut self) -> io::Result<Option<u64>> {
        match self {
            Sub::Nkv(c) => {
                let line = c.read_line()?;
                if line.starts_with(b"{\"event\":\"shutdown\"") {
                    return Err(io::Error::other("server sent shutdown"));
                }
                if !line.starts_with(b"{\"event\":\"put\"") {
                    return Ok(None);
                }
                Ok(seq_in(line))
            }
            Sub::Redis(c, seen) => match c.read_resp()? {
                Resp::Array(Some(items))
                    if items.first() == Some(&Resp::Bulk(Some(b"message".to_vec()))) =>
                {
                    *seen += 1;
                    Ok(Some(*seen - 1))
                }
                _ => Ok(None),
            },
        }
    }
}

/// The number after `"seq":` in an event line.
fn seq_in(line: &[u8]) -> Option<u64> {
    let at = line.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits =
        line[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(None, |acc: Option<u64>, &b| {
                Some(
                    acc.unwrap_or(0)
                        .saturating_mul(10)
                        .saturating_add(u64::from(b - b'0')),
                )
            });
    digits
}

/// State shared by the writer (this thread) and the subscriber threads.
struct Shared {
    /// The paced seq being waited for; `u64::MAX` during the burst.
    current: AtomicU64,
    /// Subscribers that still have to receive `current`.
    remaining: AtomicUsize,
    writer: thread::Thread,
    /// The last seq each subscriber received (`u64::MAX`: none yet).
    last_seen: Vec<AtomicU64>,
    burst_events: AtomicU64,
    /// Set by the writer before it shuts the sockets down: a read error is then the end.
    stop: AtomicBool,
    /// Set by a subscriber that failed, so the writer stops waiting.
    failed: AtomicBool,
}

pub fn measure(
    server: &Server,
    subscribers: usize,
    paced: usize,
    burst: usize,
) -> Result<NotifyStats, String> {
    let burst = burst.min(MAX_BURST_EVENTS / subscribers.max(1));
    let total = paced + burst;
    let mut subs = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        subs.push(Sub::open(server)?);
    }
    let streams: Vec<UnixStream> = subs
        .iter()
        .map(|s| s.stream().try_clone())
        .collect::<io::Result<_>>()
        .map_err(|e| e.to_string())?;
    let mut writer = server.connect()?;
    let shared = Shared {
        current: AtomicU64::new(u64::MAX),
        remaining: AtomicUsize::new(0),
        writer: thread::current(),
        last_seen: (0..subscribers).map(|_| AtomicU64::new(u64::MAX)).collect(),
        burst_events: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        failed: AtomicBool::new(false),
    };

    let (written, times) = thread::scope(|s| {
        let handles: Vec<_> = subs
            .into_iter()
            .enumerate()
            .map(|(j, sub)| {
                let shared = &shared;
                thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn_scoped(s, move || receive(j, sub, total, paced, shared))
                    .expect("spawning a subscriber thread")
            })
            .collect();
        let written = write(
            &mut writer,
            server.dialect,
            &shared,
            subscribers,
            paced,
            burst,
        );
        shared.stop.store(true, SeqCst);
        for st in &streams {
            let _ = st.shutdown(Shutdown::Both);
        }
        let times: Result<Vec<Vec<Option<Instant>>>, String> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("subscriber thread panicked".into()))
            })
            .collect();
        (written, times)
    });
    let (acks, burst_start) = written?;
    let times = times?;

    let mut lat = Vec::with_capacity(subscribers * paced);
    let mut from_send = Vec::with_capacity(subscribers * paced);
    let mut lost = 0;
    for t in &times {
        for (seq, ack) in acks.iter().enumerate().take(paced) {
            match (ack, t[seq]) {
                (Some((sent, acked)), Some(r)) => {
                    lat.push(r.saturating_duration_since(*acked).as_nanos() as u64);
                    from_send.push(r.saturating_duration_since(*sent).as_nanos() as u64);
                }
                (Some(_), None) => lost += 1,
                _ => {}
            }
        }
    }
    lat.sort_unstable();
    from_send.sort_unstable();
    let mut ack_lat: Vec<u64> = acks
        .iter()
        .take(paced)
        .flatten()
        .map(|(sent, acked)| (*acked - *sent).as_nanos() as u64)
        .collect();
    ack_lat.sort_unstable();
    let last_event = times
        .iter()
        .flat_map(|t| t[paced..].iter().flatten())
        .max()
        .copied();
    // Every subscriber holds the final value once it has the last seq.
    let converged = times
        .iter()
        .map(|t| t.last().copied().flatten())
        .collect::<Option<Vec<Instant>>>()
        .and_then(|ends| ends.into_iter().max());
    let changes_per_s = match converged {
        Some(end) if burst > 0 && end > burst_start => {
            burst as f64 / (end - burst_start).as_secs_f64()
        }
        _ => 0.0,
    };
    let events = shared.burst_events.load(SeqCst);
    let events_per_s = match last_event {
        Some(end) if end > burst_start => events as f64 / (end - burst_start).as_secs_f64(),
        _ => 0.0,
    };
    Ok(NotifyStats {
        changes_per_s,
        p50_us: percentile(&lat, 0.50) as f64 / 1e3,
        p99_us: percentile(&lat, 0.99) as f64 / 1e3,
        max_us: lat.last().copied().unwrap_or(0) as f64 / 1e3,
        send_p50_us: percentile(&from_send, 0.50) as f64 / 1e3,
        send_p99_us: percentile(&from_send, 0.99) as f64 / 1e3,
        ack_p50_us: percentile(&ack_lat, 0.50) as f64 / 1e3,
        ack_p99_us: percentile(&ack_lat, 0.99) as f64 / 1e3,
        lost,
        events_per_s,
        delivered: if burst > 0 {
            events as f64 / (burst * subscribers) as f64
        } else {
            1.0
        },
    })
}

/// A subscriber thread: records when each seq first arrives, until the writer shuts it down.
fn receive(
    j: usize,
    mut sub: Sub,
    total: usize,
    paced: usize,
    shared: &Shared,
) -> Result<Vec<Option<Instant>>, String> {
    let mut times = vec![None; total];
    loop {
        match sub.next_seq() {
            Ok(Some(seq)) => {
                let now = Instant::now();
                let Some(slot) = times.get_mut(seq as usize) else {
                    continue;
                };
                if slot.is_some() {
                    continue;
                }
                *slot = Some(now);
                if seq as usize >= paced {
                    shared.burst_events.fetch_add(1, SeqCst);
                }
                shared.last_seen[j].store(seq, SeqCst);
                if seq == shared.current.load(SeqCst) && shared.remaining.fetch_sub(1, SeqCst) == 1
                {
                    shared.writer.unpark();
                }
            }
            Ok(None) => {}
            Err(_) if shared.stop.load(SeqCst) => return Ok(times),
            Err(e) => {
                shared.failed.store(true, SeqCst);
                shared.writer.unpark();
                return Err(format!("subscriber {j}: {e}"));
            }
        }
    }
}

/// Each put's send and ack times.
type Acks = Vec<Option<(Instant, Instant)>>;

/// The writer: paced puts, then the burst. Returns each seq's send and ack times and the
/// burst's start.
fn write(
    conn: &mut Conn,
    dialect: Dialect,
    shared: &Shared,
    subscribers: usize,
    paced: usize,
    burst: usize,
) -> Result<(Acks, Instant), String> {
    let run_deadline = Instant::now() + RUN_LIMIT;
    let mut acks = vec![None; paced + burst];
    let mut req = Vec::with_capacity(64);
    let mut put = |conn: &mut Conn, seq: u64| -> Result<(Instant, Instant), String> {
        req.clear();
        match dialect {
            Dialect::Redis => {
                req.extend_from_slice(b"SET bench.n ");
                push_u64(&mut req, seq);
                req.extend_from_slice(b"\r\n");
            }
            _ => {
                req.extend_from_slice(b"PUT bench.n {\"seq\":");
                push_u64(&mut req, seq);
                req.extend_from_slice(b"}\n");
            }
        }
        let sent = Instant::now();
        conn.call(&req)
            .map_err(|e| format!("writer, seq {seq}: {e}"))?;
        Ok((sent, Instant::now()))
    };
    let check = || {
        if shared.failed.load(SeqCst) {
            Err("a subscriber failed".to_string())
        } else {
            Ok(())
        }
    };

    for (seq, ack) in acks.iter_mut().enumerate().take(paced) {
        check()?;
        if Instant::now() > run_deadline {
            break;
        }
        shared.remaining.store(subscribers, SeqCst);
        shared.current.store(seq as u64, SeqCst);
        *ack = Some(put(conn, seq as u64)?);
        let wait_until = Instant::now() + PACE_TIMEOUT;
        while shared.remaining.load(SeqCst) > 0
            && Instant::now() < wait_until
            && !shared.failed.load(SeqCst)
        {
            thread::park_timeout(Duration::from_millis(1));
        }
    }
    shared.current.store(u64::MAX, SeqCst);

    let burst_start = Instant::now();
    for (seq, ack) in acks.iter_mut().enumerate().skip(paced) {
        check()?;
        if Instant::now() > run_deadline {
            break;
        }
        *ack = Some(put(conn, seq as u64)?);
    }
    if burst > 0 {
        let last = (paced + burst - 1) as u64;
        let wait_until = Instant::now() + BURST_TIMEOUT;
        while Instant::now() < wait_until && !shared.failed.load(SeqCst) {
            if shared.last_seen.iter().all(|s| s.load(SeqCst) == last) {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
    check()?;
    Ok((acks, burst_start))
}
