//! The Markdown report: one table per section, built from the medians in `Results`.

use crate::opts::Plan;
use crate::results::{mib, num, ops, ratio, size_label, times, Results, Table};

/// Which data-directory filesystems the PUT tables name.
pub struct Fs<'a> {
    pub disk: &'a str,
    pub shm: &'a str,
}

/// The three figures every load cell reports: ops/s, p50 and p99 latency.
fn load_cells(res: &Results, key: &str) -> [String; 3] {
    [
        ops(res.get(key, "ops_per_s")),
        num(res.get(key, "p50_us")),
        num(res.get(key, "p99_us")),
    ]
}

/// `numerator / denominator` of one metric of two cells, as `1.23×`.
fn cell_ratio(res: &Results, numerator: &str, denominator: &str, metric: &str) -> String {
    times(ratio(
        res.get(numerator, metric),
        res.get(denominator, metric),
    ))
}

pub fn tables(res: &Results, plan: &Plan, fs: &Fs) -> Vec<Table> {
    let mut out = Vec::new();
    let has = |prefix: &str| res.get_any(prefix);

    if has("get/") {
        let mut t = Table::new(
            "GET (ops/s; latency µs)",
            &[
                "clients",
                "value",
                "nkv ops/s",
                "p50",
                "p99",
                "Redis ops/s",
                "p50",
                "p99",
                "nkv/Redis ops/s",
                "echo p50",
                "nkv p50/echo p50",
            ],
        );
        for &c in &plan.clients {
            for &v in &plan.value_sizes {
                let n = format!("get/nkv/c{c}/v{v}");
                let r = format!("get/redis/c{c}/v{v}");
                let e = format!("echo/c{c}");
                t.row(
                    [
                        &[c.to_string(), size_label(v)][..],
                        &load_cells(res, &n),
                        &load_cells(res, &r),
                        &[
                            cell_ratio(res, &n, &r, "ops_per_s"),
                            num(res.get(&e, "p50_us")),
                            cell_ratio(res, &n, &e, "p50_us"),
                        ],
                    ]
                    .concat(),
                );
            }
        }
        out.push(t);
    }

    if has("connect/") {
        let mut t = Table::new(
            "Connect + GET + close, a new connection per request (ops/s; latency µs)",
            &[
                "clients",
                "nkv ops/s",
                "p50",
                "p99",
                "Redis ops/s",
                "p50",
                "p99",
                "nkv/Redis ops/s",
            ],
        );
        for c in plan.clients.iter().copied().filter(|c| *c == 1 || *c == 8) {
            let n = format!("connect/nkv/c{c}");
            let r = format!("connect/redis/c{c}");
            t.row(
                [
                    &[c.to_string()][..],
                    &load_cells(res, &n),
                    &load_cells(res, &r),
                    &[cell_ratio(res, &n, &r, "ops_per_s")],
                ]
                .concat(),
            );
        }
        out.push(t);
    }

    if has("put-disk/") {
        let mut t = Table::new(
            format!("PUT, data dir on disk ({})", fs.disk),
            &[
                "clients",
                "value",
                "nkv ops/s",
                "p50",
                "p99",
                "temp+rename floor ops/s",
                "p50",
                "p99",
                "nkv/floor",
            ],
        );
        for &c in &plan.clients {
            for &v in &plan.value_sizes {
                let n = format!("put-disk/nkv/c{c}/v{v}");
                let f = format!("put-disk/floor/c{c}/v{v}");
                t.row(
                    [
                        &[c.to_string(), size_label(v)][..],
                        &load_cells(res, &n),
                        &load_cells(res, &f),
                        &[cell_ratio(res, &n, &f, "ops_per_s")],
                    ]
                    .concat(),
                );
            }
        }
        out.push(t);
    }

    if has("put-mem/") {
        let mut t = Table::new(
            "PUT of memory-class keys (runtime.*, no file) vs Redis SET (AOF everysec)".to_string(),
            &[
                "clients",
                "value",
                "nkv ops/s",
                "p50",
                "p99",
                "Redis SET ops/s",
                "p50",
                "p99",
                "nkv/Redis",
            ],
        );
        for &c in &plan.clients {
            for &v in &plan.value_sizes {
                let n = format!("put-mem/nkv/c{c}/v{v}");
                let r = format!("put/redis/c{c}/v{v}");
                t.row(
                    [
                        &[c.to_string(), size_label(v)][..],
                        &load_cells(res, &n),
                        &load_cells(res, &r),
                        &[cell_ratio(res, &n, &r, "ops_per_s")],
                    ]
                    .concat(),
                );
            }
        }
        out.push(t);
    }

    if has("put-shm/") || has("put/redis") {
        let mut t = Table::new(
            format!(
                "PUT, data dir on tmpfs ({}), vs Redis SET (AOF everysec, dir on disk)",
                fs.shm
            ),
            &[
                "clients",
                "value",
                "nkv ops/s",
                "p50",
                "p99",
                "Redis SET ops/s",
                "p50",
                "p99",
                "nkv/Redis",
                "floor ops/s",
                "nkv/floor",
            ],
        );
        for &c in &plan.clients {
            for &v in &plan.value_sizes {
                let n = format!("put-shm/nkv/c{c}/v{v}");
                let r = format!("put/redis/c{c}/v{v}");
                let f = format!("put-shm/floor/c{c}/v{v}");
                t.row(
                    [
                        &[c.to_string(), size_label(v)][..],
                        &load_cells(res, &n),
                        &load_cells(res, &r),
                        &[
                            cell_ratio(res, &n, &r, "ops_per_s"),
                            ops(res.get(&f, "ops_per_s")),
                            cell_ratio(res, &n, &f, "ops_per_s"),
                        ],
                    ]
                    .concat(),
                );
            }
        }
        out.push(t);
    }

    if has("echo/") {
        let mut t = Table::new(
            "Floor: bare Unix-socket echo round trip (same load generator)",
            &["clients", "ops/s", "p50 µs", "p99 µs"],
        );
        for &c in &plan.clients {
            let e = format!("echo/c{c}");
            t.row([&[c.to_string()][..], &load_cells(res, &e)].concat());
        }
        out.push(t);
    }

    if has("wildcard/") {
        let mut t = Table::new(
            format!(
                "Wildcard GET bench.* over {} keys (100 B values)",
                plan.wildcard_keys
            ),
            &[
                "clients",
                "ops/s",
                "p50 µs",
                "p99 µs",
                "reply KiB",
                "keys/s",
            ],
        );
        for &c in &plan.wildcard_clients {
            let w = format!("wildcard/nkv/c{c}");
            let rate = res.get(&w, "ops_per_s");
            t.row(vec![
                c.to_string(),
                ops(rate),
                num(res.get(&w, "p50_us")),
                num(res.get(&w, "p99_us")),
                num(res.get(&w, "reply_bytes").map(|b| b / 1024.0)),
                ops(rate.map(|r| r * plan.wildcard_keys as f64)),
            ]);
        }
        out.push(t);
    }

    if has("notify/") {
        let mut t = Table::new(
            "Notifications: put acknowledged → event received (µs); fan-out events/s",
            &[
                "subscribers",
                "nkv p50",
                "p99",
                "max",
                "Redis p50",
                "p99",
                "max",
                "nkv/Redis p99",
                "nkv events/s",
                "Redis events/s",
                "nkv delivered",
                "lost (nkv/Redis)",
            ],
        );
        for &s in &plan.subscribers {
            let n = format!("notify/nkv/s{s}");
            let r = format!("notify/redis/s{s}");
            let lost = |k: &str| {
                res.get(k, "lost")
                    .map_or("–".to_string(), |v| format!("{v:.0}"))
            };
            t.row(vec![
                s.to_string(),
                num(res.get(&n, "p50_us")),
                num(res.get(&n, "p99_us")),
                num(res.get(&n, "max_us")),
                num(res.get(&r, "p50_us")),
                num(res.get(&r, "p99_us")),
                num(res.get(&r, "max_us")),
                cell_ratio(res, &n, &r, "p99_us"),
                ops(res.get(&n, "events_per_s")),
                ops(res.get(&r, "events_per_s")),
                res.get(&n, "delivered")
                    .map_or("–".into(), |d| format!("{:.0}%", d * 100.0)),
                format!("{}/{}", lost(&n), lost(&r)),
            ]);
        }
        t.footer = Some(format!(
            "An event that arrives before the writer's ack counts as 0 here: see the next table. \
             Paced: {} puts, each waiting for every subscriber's event; burst: {} puts back to back \
             (\"delivered\": burst events received / puts × subscribers; nkv may coalesce a slow subscriber's backlog).",
            plan.notify_paced,
            plan.notify_burst
        ));
        out.push(t);
    }

    if has("notify/") {
        let mut t = Table::new(
            "Notifications measured from the put being sent (µs), and the writer's own put → ack",
            &[
                "subscribers",
                "nkv p50",
                "p99",
                "Redis p50",
                "p99",
                "nkv/Redis p99",
                "nkv put→ack p50",
                "p99",
                "Redis SET→ack p50",
                "p99",
            ],
        );
        for &s in &plan.subscribers {
            let n = format!("notify/nkv/s{s}");
            let r = format!("notify/redis/s{s}");
            t.row(vec![
                s.to_string(),
                num(res.get(&n, "send_p50_us")),
                num(res.get(&n, "send_p99_us")),
                num(res.get(&r, "send_p50_us")),
                num(res.get(&r, "send_p99_us")),
                times(ratio(
                    res.get(&n, "send_p99_us"),
                    res.get(&r, "send_p99_us"),
                )),
                num(res.get(&n, "ack_p50_us")),
                num(res.get(&n, "ack_p99_us")),
                num(res.get(&r, "ack_p50_us")),
                num(res.get(&r, "ack_p99_us")),
            ]);
        }
        t.footer = Some("nkv's disk data dir: the put's own file write is inside both figures; Redis's AOF write is too.".into());
        out.push(t);
    }

    if has("putmem/") {
        let mut t = Table::new(
            format!(
                "Put peak memory ({} clients each putting a {} JSON array at once)",
                crate::putmem::CLIENTS,
                size_label(crate::putmem::VALUE_BYTES)
            ),
            &[
                "system",
                "peak RSS growth",
                "values in flight",
                "growth per value byte",
            ],
        );
        for sys in ["nkv", "redis"] {
            let k = format!("putmem/{sys}");
            t.row(vec![
                sys.to_string(),
                mib(res.get(&k, "peak_growth_kib")),
                mib(res.get(&k, "in_flight_kib")),
                times(res.get(&k, "per_value_byte")),
            ]);
        }
        out.push(t);
    }

    if has("notify/") {
        let mut t = Table::new(
            "Fan-out: changes/s until every subscriber holds the final value (one key, sequential puts)",
            &[
                "subscribers",
                "nkv (tmpfs) changes/s",
                "nkv (disk)",
                "Redis changes/s",
                "nkv tmpfs/Redis",
                "nkv disk/Redis",
            ],
        );
        for &s in &plan.subscribers {
            let shm = format!("fanout/nkv-shm/s{s}");
            let n = format!("notify/nkv/s{s}");
            let r = format!("notify/redis/s{s}");
            t.row(vec![
                s.to_string(),
                ops(res.get(&shm, "changes_per_s")),
                ops(res.get(&n, "changes_per_s")),
                ops(res.get(&r, "changes_per_s")),
                cell_ratio(res, &shm, &r, "changes_per_s"),
                cell_ratio(res, &n, &r, "changes_per_s"),
            ]);
        }
        t.footer = Some(format!(
            "Up to {} sequential puts (at most 400,000 events over all subscribers); time from the first put until \
             the last subscriber has the last value (nkv may coalesce; Redis keyspace notifications carry no value and may not).",
            plan.notify_burst
        ));
        out.push(t);
    }

    if has("footprint/") {
        let per_sub = |sys: &str, state: &str| {
            let subs = res.get(&format!("footprint/{sys}/{state}"), "rss_kib");
            let idle = res.get(&format!("footprint/{sys}/idle"), "rss_kib");
            match (subs, idle) {
                (Some(s), Some(i)) => {
                    format!(
                        "{:.1} KiB",
                        (s - i) / crate::footprint::IDLE_SUBSCRIBERS as f64
                    )
                }
                _ => "–".into(),
            }
        };
        let mut t = Table::new(
            "Idle subscriber cost: (RSS with the idle subscribers − idle RSS) / subscribers",
            &["nkv", "Redis", "target (nkv)"],
        );
        t.row(vec![
            per_sub("nkv", "subs"),
            per_sub("redis", "subs"),
            "≤ 32 KiB".into(),
        ]);
        out.push(t);
        let mut t = Table::new(
            "Idle subscriber cost after each read a 1,000-key snapshot (same formula; nkv only)",
            &["nkv", "target (nkv)"],
        );
        t.row(vec![
            per_sub("nkv", "subs_after_snapshot"),
            "≤ 32 KiB".into(),
        ]);
        out.push(t);
        let mut t = Table::new(
            "Footprint (VmRSS and Threads from /proc/PID/status)",
            &[
                "state",
                "nkv RSS",
                "nkv threads",
                "Redis RSS",
                "Redis threads",
            ],
        );
        let states = [
            ("idle".to_string(), "idle"),
            (
                format!("{} idle connections", plan.idle_connections),
                "conns",
            ),
            (
                format!("{} idle subscribers", crate::footprint::IDLE_SUBSCRIBERS),
                "subs",
            ),
            (
                format!("{} keys (100 B values)", plan.footprint_keys),
                "keys",
            ),
        ];
        for (label, state) in states {
            let n = format!("footprint/nkv/{state}");
            let r = format!("footprint/redis/{state}");
            t.row(vec![
                label,
                mib(res.get(&n, "rss_kib")),
                num(res.get(&n, "threads")),
                mib(res.get(&r, "rss_kib")),
                num(res.get(&r, "threads")),
            ]);
        }
        for name in ["nkv-server", "nkv-client"] {
            let b = format!("binary/{name}");
            let stripped = match res.get(&b, "stripped") {
                Some(s) if s > 0.5 => "stripped",
                Some(_) => "NOT stripped",
                None => "?",
            };
            t.row(vec![
                format!("binary {name} ({stripped})"),
                mib(res.get(&b, "bytes").map(|b| b / 1024.0)),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        out.push(t);
    }

    if has("startup/") {
        let mut t = Table::new(
            "Start-up (spawn → socket accepts / first reply), beside reading the same files",
            &[
                "keys",
                "connect ms",
                "first reply ms",
                "read files ms",
                "first reply/read",
                "files",
                "RSS after load",
                "SIGTERM → exit ms",
            ],
        );
        for &k in &plan.startup_keys {
            let n = format!("startup/nkv/k{k}");
            let f = format!("startup/floor/k{k}");
            t.row(vec![
                ops(Some(k as f64)),
                num(res.get(&n, "connect_ms")),
                num(res.get(&n, "reply_ms")),
                num(res.get(&f, "read_ms")),
                times(ratio(res.get(&n, "reply_ms"), res.get(&f, "read_ms"))),
                ops(res.get(&f, "files")),
                mib(res.get(&n, "rss_kib")),
                num(res.get(&n, "stop_ms")),
            ]);
        }
        t.footer = Some("Page cache warm for both (the files were just written); nothing is dropped from cache.".into());
        out.push(t);
    }
    out
}
