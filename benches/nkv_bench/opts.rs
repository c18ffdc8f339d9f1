//! Command-line options and the plan they imply (how many clients, ops, keys, rounds).

use std::path::PathBuf;
use std::time::Duration;

pub const USAGE: &str = "\
usage: cargo bench --bench nkv_bench [-- OPTIONS]

options:
  --quick            small op counts, one round, every section once (a few seconds, for CI)
  --rounds N         A/B rounds (nkv and Redis interleaved); medians are reported [5; quick 1]
  --out DIR          where results.md and results.json go [target/nkv-bench]
  --only LIST        comma-separated sections: get,put,wildcard,notify,footprint,startup,floors,framed,connect
  --fsync            start nkv with --fsync and fsync the temp+rename floor too
  --subscribers LIST comma-separated subscriber counts for the notify section [1,10,100,300,1000]
  --cpus LIST        run everything (load generator and servers) on these CPUs, via taskset
                     (e.g. 0: one core, so no cross-CPU wake-ups; see docs/PERFORMANCE.md)
  --no-redis         skip the Redis comparison even when redis-server is on PATH
  -h, --help         this text

environment:
  NKV_BENCH_SERVER   run this nkv-server binary instead of the one cargo built";

/// One part of the benchmark, selectable with `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Get,
    Put,
    Wildcard,
    Notify,
    Footprint,
    Startup,
    Floors,
    /// The framed protocol beside the line protocol, a connection per request.
    Framed,
    Connect,
}

impl Section {
    pub const ALL: [Section; 9] = [
        Section::Get,
        Section::Put,
        Section::Wildcard,
        Section::Notify,
        Section::Footprint,
        Section::Startup,
        Section::Floors,
        Section::Framed,
        Section::Connect,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::Get => "get",
            Section::Put => "put",
            Section::Wildcard => "wildcard",
            Section::Notify => "notify",
            Section::Footprint => "footprint",
            Section::Startup => "startup",
            Section::Floors => "floors",
            Section::Framed => "framed",
            Section::Connect => "connect",
        }
    }

    fn parse(s: &str) -> Option<Section> {
        Section::ALL.into_iter().find(|x| x.name() == s)
    }
}

#[derive(Debug)]
pub struct Opts {
    pub quick: bool,
    pub rounds: usize,
    pub out: Option<PathBuf>,
    pub only: Option<Vec<Section>>,
    pub fsync: bool,
    pub no_redis: bool,
    /// A taskset CPU list the whole run is confined to.
    pub cpus: Option<String>,
    /// Subscriber counts for the notify section, instead of the plan's.
    pub subscribers: Option<Vec<usize>>,
}

impl Opts {
    /// Parses the arguments after the program name. `Ok(None)` means `--help` was asked for.
    ///
    /// `cargo bench` passes `--bench` to every harness-less bench; it is accepted and ignored.
    pub fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Opts>, String> {
        let mut opts = Opts {
            quick: false,
            rounds: 0,
            out: None,
            only: None,
            fsync: false,
            no_redis: false,
            cpus: None,
            subscribers: None,
        };
        while let Some(arg) = args.next() {
            let mut value = |name: &str| {
                args.next()
                    .ok_or(format!("{name} needs a value\n\n{USAGE}"))
            };
            match arg.as_str() {
                "--bench" => {}
                "--quick" => opts.quick = true,
                "--fsync" => opts.fsync = true,
                "--no-redis" => opts.no_redis = true,
                "--rounds" => {
                    let v = value("--rounds")?;
                    opts.rounds = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or(format!("--rounds takes a number from 1 to 100, not {v:?}"))?;
                }
                "--cpus" => {
                    let v = value("--cpus")?;
                    if v.is_empty()
                        || !v
                            .chars()
                            .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
                    {
                        return Err(format!(
                            "--cpus takes a CPU list like 0 or 0,1 or 0-3, not {v:?}"
                        ));
                    }
                    opts.cpus = Some(v);
                }
                "--subscribers" => {
                    let v = value("--subscribers")?;
                    let counts: Option<Vec<usize>> = v
                        .split(',')
                        .map(|n| n.parse().ok().filter(|&n| (1..=10_000).contains(&n)))
                        .collect();
                    opts.subscribers = Some(counts.ok_or(format!(
                        "--subscribers takes counts from 1 to 10000 like 1,10,100, not {v:?}"
                    ))?);
                }
                "--out" => opts.out = Some(PathBuf::from(value("--out")?)),
                "--only" => {
                    let v = value("--only")?;
                    let mut list = Vec::new();
                    for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        let names: Vec<_> = Section::ALL.iter().map(|s| s.name()).collect();
                        let s = Section::parse(name).ok_or(format!(
                            "unknown section {name:?}; sections are {}",
                            names.join(",")
                        ))?;
                        list.push(s);
                    }
                    if list.is_empty() {
                        return Err("--only needs at least one section".into());
                    }
                    opts.only = Some(list);
                }
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
            }
        }
        if opts.rounds == 0 {
            opts.rounds = if opts.quick { 1 } else { 5 };
        }
        Ok(Some(opts))
    }

    pub fn runs(&self, s: Section) -> bool {
        self.only.as_ref().is_none_or(|l| l.contains(&s))
    }
}

/// The sizes of everything, fixed by `--quick`. Every loop of the benchmark is bounded both by
/// a count from here and by a time limit.
#[derive(Debug)]
pub struct Plan {
    pub clients: Vec<usize>,
    pub value_sizes: Vec<usize>,
    /// Ops per measurement, shared among the clients (each client does at least `MIN_PER_CLIENT`).
    pub ops_per_cell: usize,
    /// A measurement stops at this time even when its ops are not done.
    pub cell_time: Duration,
    /// Distinct keys read by the GET benchmark (and cycled through by each PUT client).
    pub get_keys: usize,
    pub wildcard_keys: usize,
    pub wildcard_clients: Vec<usize>,
    pub subscribers: Vec<usize>,
    /// Puts in the paced notification run: each waits until every subscriber has the event.
    pub notify_paced: usize,
    /// Puts sent back to back to measure the fan-out rate.
    pub notify_burst: usize,
    pub idle_connections: usize,
    pub footprint_keys: usize,
    pub startup_keys: Vec<usize>,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                clients: vec![1, 8],
                value_sizes: vec![100, 4096],
                ops_per_cell: 2_000,
                cell_time: Duration::from_millis(150),
                get_keys: 1_000,
                wildcard_keys: 1_000,
                wildcard_clients: vec![1],
                subscribers: vec![1, 100],
                notify_paced: 40,
                notify_burst: 100,
                idle_connections: 300,
                footprint_keys: 10_000,
                startup_keys: vec![10_000],
            }
        } else {
            Plan {
                clients: vec![1, 8, 64],
                value_sizes: vec![100, 4096],
                ops_per_cell: 30_000,
                cell_time: Duration::from_millis(800),
                get_keys: 1_000,
                wildcard_keys: 1_000,
                wildcard_clients: vec![1, 8],
                subscribers: vec![1, 10, 100, 300, 1000],
                notify_paced: 400,
                notify_burst: 2_000,
                idle_connections: 300,
                footprint_keys: 100_000,
                startup_keys: vec![10_000, 100_000],
            }
        }
    }
}
