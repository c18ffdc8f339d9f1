//! The performance targets of docs/PERFORMANCE.md, checked against the medians of this run.

use serde_json::{json, Value};

use crate::opts::Plan;
use crate::results::{ratio, size_label, Results, Table};

pub struct Target {
    pub name: String,
    pub measured: String,
    /// The figure compared with `limit` (a ratio, or a value in the limit's unit).
    pub value: Option<f64>,
    pub limit: f64,
    /// `true`: the value must be at least `limit`; `false`: at most `limit`.
    pub at_least: bool,
}

impl Target {
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_least {
                v >= self.limit
            } else {
                v <= self.limit
            }
        })
    }

    fn rule(&self) -> String {
        format!(
            "{} {}",
            if self.at_least { "≥" } else { "≤" },
            trim(self.limit)
        )
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn evaluate(res: &Results, plan: &Plan) -> Vec<Target> {
    let mut out = Vec::new();
    let mut push =
        |name: String, measured: String, value: Option<f64>, limit: f64, at_least: bool| {
            out.push(Target {
                name,
                measured,
                value,
                limit,
                at_least,
            });
        };
    let low: Vec<usize> = plan
        .clients
        .iter()
        .copied()
        .filter(|c| *c == 1 || *c == 8)
        .collect();
    let f = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1}"));
    let k = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.0}", v));

    for &c in &low {
        for &v in &plan.value_sizes {
            let (n, r) = (
                res.get(&format!("get/nkv/c{c}/v{v}"), "ops_per_s"),
                res.get(&format!("get/redis/c{c}/v{v}"), "ops_per_s"),
            );
            if n.is_some() && r.is_some() {
                push(
                    format!("GET ops/s ≥ Redis, {c} client(s), {}", size_label(v)),
                    format!("{} vs {} ops/s", k(n), k(r)),
                    ratio(n, r),
                    1.0,
                    true,
                );
            }
        }
    }
    for &c in &low {
        let (n, r) = (
            res.get(&format!("connect/nkv/c{c}"), "ops_per_s"),
            res.get(&format!("connect/redis/c{c}"), "ops_per_s"),
        );
        if n.is_some() && r.is_some() {
            push(
                format!("connect + GET + close ops/s ≥ Redis, {c} client(s)"),
                format!("{} vs {} ops/s", k(n), k(r)),
                ratio(n, r),
                1.0,
                true,
            );
        }
    }
    for &c in &low {
        for &v in &plan.value_sizes {
            let (n, e) = (
                res.get(&format!("get/nkv/c{c}/v{v}"), "p50_us"),
                res.get(&format!("echo/c{c}"), "p50_us"),
            );
            if n.is_some() && e.is_some() {
                push(
                    format!("GET p50 ≤ 2× echo p50, {c} client(s), {}", size_label(v)),
                    format!("{} vs {} µs", f(n), f(e)),
                    ratio(n, e),
                    2.0,
                    false,
                );
            }
        }
    }
    for &c in &low {
        for &v in &plan.value_sizes {
            let (n, fl) = (
                res.get(&format!("put-disk/nkv/c{c}/v{v}"), "ops_per_s"),
                res.get(&format!("put-disk/floor/c{c}/v{v}"), "ops_per_s"),
            );
            if n.is_some() && fl.is_some() {
                push(
                    format!(
                        "PUT on disk ≥ 0.8× temp+rename floor, {c} client(s), {}",
                        size_label(v)
                    ),
                    format!("{} vs {} ops/s", k(n), k(fl)),
                    ratio(n, fl),
                    0.8,
                    true,
                );
            }
        }
    }
    for &c in &plan.clients {
        for &v in &plan.value_sizes {
            let (n, r) = (
                res.get(&format!("put-shm/nkv/c{c}/v{v}"), "ops_per_s"),
                res.get(&format!("put/redis/c{c}/v{v}"), "ops_per_s"),
            );
            if n.is_some() && r.is_some() {
                push(
                    format!(
                        "PUT on tmpfs ≥ 0.7× Redis SET, {c} client(s), {}",
                        size_label(v)
                    ),
                    format!("{} vs {} ops/s", k(n), k(r)),
                    ratio(n, r),
                    0.7,
                    true,
                );
            }
        }
    }
    for &c in &plan.clients {
        for &v in &plan.value_sizes {
            let (n, r) = (
                res.get(&format!("put-mem/nkv/c{c}/v{v}"), "ops_per_s"),
                res.get(&format!("put/redis/c{c}/v{v}"), "ops_per_s"),
            );
            if n.is_some() && r.is_some() {
                push(
                    format!(
                        "memory-class PUT ≥ 1.5× Redis SET (AOF everysec), {c} client(s), {}",
                        size_label(v)
                    ),
                    format!("{} vs {} ops/s", k(n), k(r)),
                    ratio(n, r),
                    1.5,
                    true,
                );
            }
        }
    }
    if let Some(p99) = res.get("notify/nkv/s100", "p99_us") {
        push(
            "notify p99 < 1 ms, 100 subscribers, from the ack (value: p99/1 ms)".into(),
            format!("{p99:.1} µs"),
            Some(p99 / 1000.0),
            1.0,
            false,
        );
    }
    if let Some(p99) = res.get("notify/nkv/s100", "send_p99_us") {
        push(
            "notify p99 < 1 ms, 100 subscribers, from the put being sent (value: p99/1 ms)".into(),
            format!("{p99:.1} µs"),
            Some(p99 / 1000.0),
            1.0,
            false,
        );
    }
    for &s in &plan.subscribers {
        let key = |sys: &str, m: &str| res.get(&format!("notify/{sys}/s{s}"), m);
        let (n50, r50, n99, r99) = (
            key("nkv", "send_p50_us"),
            key("redis", "send_p50_us"),
            key("nkv", "send_p99_us"),
            key("redis", "send_p99_us"),
        );
        if n99.is_some() && r99.is_some() {
            let worst = match (ratio(n50, r50), ratio(n99, r99)) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            push(
                format!("notify not behind Redis from send, {s} subscriber(s) (worse of p50, p99 ratio)"),
                format!("p50 {} vs {}, p99 {} vs {} µs", f(n50), f(r50), f(n99), f(r99)),
                worst,
                1.0,
                false,
            );
        }
    }
    for &s in &plan.subscribers {
        let key = |sys: &str, m: &str| res.get(&format!("notify/{sys}/s{s}"), m);
        let (n50, r50, n99, r99) = (
            key("nkv", "p50_us"),
            key("redis", "p50_us"),
            key("nkv", "p99_us"),
            key("redis", "p99_us"),
        );
        if n99.is_some() && r99.is_some() {
            // Both percentiles must be no worse: the value is the worse of the two ratios.
            let worst = match (ratio(n50, r50), ratio(n99, r99)) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            push(
                format!("notify not behind Redis from the ack, {s} subscriber(s) (worse of p50, p99 ratio)"),
                format!(
                    "p50 {} vs {}, p99 {} vs {} µs",
                    f(n50),
                    f(r50),
                    f(n99),
                    f(r99)
                ),
                worst,
                1.0,
                false,
            );
        }
    }
    let mb = |kib: Option<f64>| kib.map_or("–".to_string(), |v| format!("{:.2} MiB", v / 1024.0));
    if let Some(idle) = res.get("footprint/nkv/idle", "rss_kib") {
        push(
            "idle RSS ≤ 4 MiB (value: MiB)".into(),
            mb(Some(idle)),
            Some(idle / 1024.0),
            4.0,
            false,
        );
    }
    if let Some(conns) = res.get("footprint/nkv/conns", "rss_kib") {
        push(
            format!(
                "RSS with {} idle connections ≤ 12 MiB (value: MiB)",
                plan.idle_connections
            ),
            mb(Some(conns)),
            Some(conns / 1024.0),
            12.0,
            false,
        );
    }
    for name in ["nkv-server", "nkv-client"] {
        if let Some(b) = res.get(&format!("binary/{name}"), "bytes") {
            push(
                format!("{name} stripped binary ≤ 2 MiB (value: MiB)"),
                mb(Some(b / 1024.0)),
                Some(b / 1024.0 / 1024.0),
                2.0,
                false,
            );
        }
    }
    // The "≤ ~2×": a put holds its line buffer (grown by doubling, so up to ~1.07× a
    // 15 MiB line) and one copy of the value; a tree would be ~16×.
    if let Some(per) = res.get("putmem/nkv", "per_value_byte") {
        push(
            "peak memory per in-flight put ≤ ~2× its value (line buffer + one copy)".to_string(),
            format!("{per:.2}× the value's bytes"),
            Some(per),
            2.2,
            false,
        );
    }
    if let Some(&n) = plan.startup_keys.last() {
        let (s, fl) = (
            res.get(&format!("startup/nkv/k{n}"), "reply_ms"),
            res.get(&format!("startup/floor/k{n}"), "read_ms"),
        );
        if s.is_some() && fl.is_some() {
            push(
                format!("start-up with {n} keys ≤ 1.5× reading the files"),
                format!("{} vs {} ms", f(s), f(fl)),
                ratio(s, fl),
                1.5,
                false,
            );
        }
    }
    out
}

pub fn table(targets: &[Target]) -> Table {
    let mut t = Table::new(
        "Targets",
        &["target", "measured", "value", "rule", "status"],
    );
    for x in targets {
        let status = match x.met() {
            Some(true) => "met".to_string(),
            Some(false) => "**MISSED**".to_string(),
            None => "n/a".to_string(),
        };
        t.row(vec![
            x.name.clone(),
            x.measured.clone(),
            x.value.map_or("–".into(), |v| format!("{v:.2}")),
            x.rule(),
            status,
        ]);
    }
    t
}

pub fn json(targets: &[Target]) -> Value {
    Value::Array(
        targets
            .iter()
            .map(|t| json!({ "target": t.name, "measured": t.measured, "value": t.value, "limit": t.limit, "at_least": t.at_least, "met": t.met() }))
            .collect(),
    )
}
