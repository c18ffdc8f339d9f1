//! nkv benchmark: the real server over its Unix socket, beside Redis and bare floors.
//!
//! ```text
//! cargo bench --bench nkv_bench                 # full: 5 interleaved rounds, medians
//! cargo bench --bench nkv_bench -- --quick      # every section once, small counts (CI)
//! cargo bench --bench nkv_bench -- --only get,notify --rounds 3 --out /tmp/r
//! ```
//!
//! # Layout
//! - `opts`      command line, and the `Plan` (counts, limits) it implies
//! - `wire`      one persistent connection: nkv lines, Redis inline commands + RESP, echo
//! - `loadgen`   the one load generator: N client threads, per-op latency, percentiles
//! - `procs`     child processes: start, wait until answering, /proc status, kill on drop/signal
//! - `servers`   temp dirs (disk, tmpfs), starting nkv and Redis, loading keys
//! - `floors`    the echo server, the temp+rename loop, reading a data directory
//! - `kv`        GET / PUT / wildcard / floor measurements
//! - `notify`    put-ack → event latency and fan-out rate
//! - `framed`    the framed protocol (connection per request) beside the line protocol
//! - `footprint` RSS, threads, binary sizes; peak RSS of concurrent large puts (`putmem`)
//! - `startup`   start-up time on N keys, beside reading the files
//! - `results`, `report`, `targets`   medians, Markdown tables, target checks, JSON
//!
//! nkv and Redis run in the same rounds, alternating which goes first; every figure reported is
//! the median over rounds. Every loop is bounded by a count and a time; every child process is
//! killed on exit, panic or signal.

#[path = "nkv_bench/floors.rs"]
mod floors;
#[path = "nkv_bench/footprint.rs"]
mod footprint;
#[path = "nkv_bench/framed.rs"]
mod framed;
#[path = "nkv_bench/kv.rs"]
mod kv;
#[path = "nkv_bench/loadgen.rs"]
mod loadgen;
#[path = "nkv_bench/machine.rs"]
mod machine;
#[path = "nkv_bench/notify.rs"]
mod notify;
#[path = "nkv_bench/opts.rs"]
mod opts;
#[path = "nkv_bench/procs.rs"]
mod procs;
#[path = "nkv_bench/putmem.rs"]
mod putmem;
#[path = "nkv_bench/report.rs"]
mod report;
#[path = "nkv_bench/results.rs"]
mod results;
#[path = "nkv_bench/servers.rs"]
mod servers;
#[path = "nkv_bench/startup.rs"]
mod startup;
#[path = "nkv_bench/targets.rs"]
mod targets;
#[path = "nkv_bench/wire.rs"]
mod wire;

use std::fs;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use floors::EchoServer;
use loadgen::Stats;
use opts::{Opts, Plan, Section};
use results::Results;
use servers::{Base, Env, Server};
use startup::Datasets;
use wire::Dialect;

const REDIS_MISSING: &str =
    "redis-server not found: skipping Redis comparison (apt-get install redis-server)";

fn main() -> ExitCode {
    let opts = match Opts::parse(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{}", opts::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("nkv_bench: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpus) = &opts.cpus {
        if std::env::var("NKV_BENCH_CPUS").ok().as_deref() != Some(cpus) {
            return reexec_on(cpus);
        }
    }
    procs::raise_fd_limit();
    if let Err(e) = procs::install_signal_cleanup() {
        eprintln!("nkv_bench: warning: no signal handler ({e}); an interrupted run may leave servers running");
    }
    let t0 = Instant::now();
    match run(&opts) {
        Ok(()) => {
            eprintln!("nkv_bench: done in {:.1} s", t0.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nkv_bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Replaces this process by itself under `taskset -c cpus`: every thread and child inherits the
/// CPU set. Returns only on failure.
fn reexec_on(cpus: &str) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some(taskset) = procs::find_on_path("taskset") else {
        eprintln!("nkv_bench: --cpus needs taskset (apt-get install util-linux)");
        return ExitCode::from(2);
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("nkv_bench: cannot find this program to re-run it: {e}");
            return ExitCode::FAILURE;
        }
    };
    let err = std::process::Command::new(taskset)
        .args(["-c", cpus])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("NKV_BENCH_CPUS", cpus)
        .exec();
    eprintln!("nkv_bench: cannot run under taskset -c {cpus}: {err}");
    ExitCode::FAILURE
}

/// The long-lived servers the rounds run against.
struct Rig {
    nkv: Option<Server>,
    nkv_shm: Option<Server>,
    redis: Option<Server>,
    wild: Option<Server>,
    echo: Option<EchoServer>,
    /// Where the rename floors write: the disk and tmpfs servers' data directories.
    floor_disk: Option<std::path::PathBuf>,
    floor_shm: Option<std::path::PathBuf>,
    wildcard_reply: usize,
}

fn run(opts: &Opts) -> Result<(), String> {
    let mut plan = Plan::new(opts.quick);
    if let Some(counts) = &opts.subscribers {
        plan.subscribers = counts.clone();
    }
    let env = Env::new(opts.fsync, !opts.no_redis)?;
    let mut res = Results::default();
    machine::describe(&env, opts, &mut res);
    machine::check_quiet(&mut res);
    if env.redis_bin.is_none() && !opts.no_redis {
        println!("{REDIS_MISSING}");
        res.note(REDIS_MISSING);
    }
    let runs = |s| opts.runs(s);

    let mut datasets = Datasets::default();
    if runs(Section::Footprint) {
        eprintln!("nkv_bench: footprint");
        footprint::run(&env, &plan, &mut res, &mut datasets)?;
        putmem::run(&env, &mut res)?;
    }

    let mut rig = setup(&env, opts, &plan, &mut res)?;
    for round in 0..opts.rounds {
        let t = Instant::now();
        let nkv_first = round % 2 == 0;
        eprint!("nkv_bench: round {}/{}:", round + 1, opts.rounds);
        if runs(Section::Get) || runs(Section::Floors) {
            eprint!(" get");
            get_round(&rig, &plan, runs(Section::Get), nkv_first, &mut res)?;
        }
        if runs(Section::Connect) {
            eprint!(" connect");
            connect_round(&rig, &plan, nkv_first, &mut res)?;
        }
        if runs(Section::Put) || runs(Section::Floors) {
            eprint!(" put");
            put_round(
                &rig,
                &plan,
                runs(Section::Put),
                nkv_first,
                opts.fsync,
                &mut res,
            )?;
        }
        if let Some(w) = &rig.wild {
            eprint!(" wildcard");
            for &c in &plan.wildcard_clients {
                let st = kv::wildcard(w, c, rig.wildcard_reply * 9 / 10, &plan)?;
                let mut m = st.metrics();
                m.push(("reply_bytes", rig.wildcard_reply as f64));
                res.add(&format!("wildcard/nkv/c{c}"), &m);
            }
        }
        if runs(Section::Framed) {
            if let Some(s) = &rig.nkv {
                eprint!(" framed");
                framed::round(s, &plan, &mut res)?;
            }
        }
        if runs(Section::Notify) {
            eprint!(" notify");
            notify_round(&rig, &plan, nkv_first, &mut res)?;
        }
        if runs(Section::Startup) {
            eprint!(" startup");
            for &n in &plan.startup_keys {
                startup::measure(&env, &mut datasets, n, nkv_first, &mut res)?;
            }
        }
        eprintln!(" ({:.1} s)", t.elapsed().as_secs_f64());
    }
    for s in [&mut rig.nkv, &mut rig.nkv_shm, &mut rig.wild]
        .into_iter()
        .flatten()
    {
        stop(s, &mut res);
    }
    for d in [&rig.floor_disk, &rig.floor_shm].into_iter().flatten() {
        floors::remove_floor_files(d);
    }
    drop(rig);
    // Includes this run's own load; informational only.
    res.info("load average (end of run)", machine::load_average());

    let fs = report::Fs {
        disk: &format!("{}, {}", env.disk_fs, env.disk.path().display()),
        shm: &env.shm_fs,
    };
    let mut tables = report::tables(&res, &plan, &fs);
    tables.extend(framed::table(&res, &plan));
    let targets = targets::evaluate(&res, &plan);
    tables.push(targets::table(&targets));
    let md = render(&res, &tables);
    println!("{md}");

    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| env.target_dir.join("nkv-bench"));
    fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let json = res.to_json(targets::json(&targets));
    let json = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    for (name, text) in [("results.md", md), ("results.json", json)] {
        let path = out.join(name);
        fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    eprintln!(
        "nkv_bench: wrote {}/results.md and results.json",
        out.display()
    );
    Ok(())
}

fn setup(env: &Env, opts: &Opts, plan: &Plan, res: &mut Results) -> Result<Rig, String> {
    let runs = |s| opts.runs(s);
    let (get, put, notify, floors, framed) = (
        runs(Section::Get) || runs(Section::Connect),
        runs(Section::Put),
        runs(Section::Notify),
        runs(Section::Floors),
        runs(Section::Framed),
    );
    let nkv_dir = env.fresh_dir(Base::Disk, "nkv")?;
    let nkv = if get || put || notify || framed {
        Some(env.start_nkv("nkv", &nkv_dir)?)
    } else {
        None
    };
    let shm_dir = if (put || floors || notify) && env.shm.is_some() {
        Some(env.fresh_dir(Base::Shm, "nkv")?)
    } else {
        None
    };
    if (put || floors) && shm_dir.is_none() {
        res.note("/dev/shm is not available: no tmpfs PUT figures");
    }
    let nkv_shm = match (&shm_dir, put || notify) {
        (Some(d), true) => Some(env.start_nkv("nkv-shm", d)?),
        _ => None,
    };
    let redis = if env.redis_bin.is_some() && (get || put || notify) {
        Some(env.start_redis("redis")?)
    } else {
        None
    };
    let echo = if get || floors {
        Some(EchoServer::start(env.run_dir.path().join("echo.sock"))?)
    } else {
        None
    };

    let (mut wild, mut wildcard_reply) = (None, 0);
    if runs(Section::Wildcard) {
        let w = env.start_nkv("wild", &env.fresh_dir(Base::Disk, "wild")?)?;
        kv::load_wildcard_keys(&w, plan.wildcard_keys)?;
        wildcard_reply = w.ask("GET bench.*\n")?.len();
        wild = Some(w);
    }
    if get {
        for s in [&nkv, &redis].into_iter().flatten() {
            kv::load_get_keys(s, plan)?;
        }
    } else if framed {
        // The framed GET cells read the GET cells' keys.
        for s in nkv.iter() {
            kv::load_get_keys(s, plan)?;
        }
    }
    if let Some(s) = &nkv {
        res.info("nkv version", s.ask("VERSION\n").unwrap_or_else(|e| e));
    }
    // Warm-up: one short pass per system so the first measured cell is not a cold start.
    if get {
        let warm = Plan {
            ops_per_cell: 500,
            cell_time: Duration::from_millis(100),
            ..Plan::new(true)
        };
        for s in [&nkv, &redis].into_iter().flatten() {
            kv::get(&s.socket, s.dialect, 1, plan.value_sizes[0], &warm)?;
        }
    }
    Ok(Rig {
        nkv,
        nkv_shm,
        redis,
        wild,
        echo,
        floor_disk: Some(nkv_dir),
        floor_shm: shm_dir,
        wildcard_reply,
    })
}

fn get_round(
    rig: &Rig,
    plan: &Plan,
    with_servers: bool,
    nkv_first: bool,
    res: &mut Results,
) -> Result<(), String> {
    for &c in &plan.clients {
        if with_servers {
            for &v in &plan.value_sizes {
                for s in order(nkv_first, [&rig.nkv, &rig.redis]) {
                    let st = kv::get(&s.socket, s.dialect, c, v, plan)?;
                    res.add(&format!("get/{}/c{c}/v{v}", sys(s)), &st.metrics());
                }
            }
        }
        if let Some(e) = &rig.echo {
            let st = kv::get(&e.socket, Dialect::Echo, c, plan.value_sizes[0], plan)?;
            res.add(&format!("echo/c{c}"), &st.metrics());
        }
    }
    Ok(())
}

/// Connect + GET + close at 1 and 8 clients: every op a new connection.
fn connect_round(rig: &Rig, plan: &Plan, nkv_first: bool, res: &mut Results) -> Result<(), String> {
    for c in plan.clients.iter().copied().filter(|c| *c == 1 || *c == 8) {
        for s in order(nkv_first, [&rig.nkv, &rig.redis]) {
            let st = kv::connect_get(&s.socket, s.dialect, c, plan)?;
            res.add(&format!("connect/{}/c{c}", sys(s)), &st.metrics());
        }
    }
    Ok(())
}

fn put_round(
    rig: &Rig,
    plan: &Plan,
    with_servers: bool,
    nkv_first: bool,
    fsync: bool,
    res: &mut Results,
) -> Result<(), String> {
    enum Job<'a> {
        Server(&'static str, &'a Server),
        Floor(&'static str, &'a std::path::Path),
        /// A `memory`-class put (no file at all).
        Memory(&'static str, &'a Server),
    }
    let mut jobs = Vec::new();
    if with_servers {
        if let Some(s) = &rig.nkv {
            jobs.push(Job::Server("put-disk/nkv", s));
        }
    }
    if let Some(d) = &rig.floor_disk {
        jobs.push(Job::Floor("put-disk/floor", d));
    }
    if with_servers {
        if let Some(s) = &rig.nkv {
            jobs.push(Job::Memory("put-mem/nkv", s));
        }
    }
    if with_servers {
        if let Some(s) = &rig.nkv_shm {
            jobs.push(Job::Server("put-shm/nkv", s));
        }
    }
    if let Some(d) = &rig.floor_shm {
        jobs.push(Job::Floor("put-shm/floor", d));
    }
    if with_servers {
        if let Some(s) = &rig.redis {
            jobs.push(Job::Server("put/redis", s));
        }
    }
    if !nkv_first {
        jobs.reverse();
    }
    for &c in &plan.clients {
        for &v in &plan.value_sizes {
            for job in &jobs {
                // Start each cell with no dirty pages left by the previous one, so its writeback
                // is not charged to the next system measured.
                nix::unistd::sync();
                let (name, st): (&str, Stats) = match job {
                    Job::Server(name, s) => (name, kv::put(s, c, v, plan)?),
                    Job::Floor(name, d) => (name, kv::rename_floor(d, c, v, plan, fsync)?),
                    Job::Memory(name, s) => (name, kv::put_memory(s, c, v, plan)?),
                };
                res.add(&format!("{name}/c{c}/v{v}"), &st.metrics());
            }
        }
    }
    Ok(())
}

fn notify_round(rig: &Rig, plan: &Plan, nkv_first: bool, res: &mut Results) -> Result<(), String> {
    for &n in &plan.subscribers {
        for s in order(nkv_first, [&rig.nkv, &rig.redis]) {
            let st = notify::measure(s, n, plan.notify_paced, plan.notify_burst)?;
            if st.lost > 0 {
                res.note(format!(
                    "{}: {} of {} paced events never reached a subscriber ({n} subscribers)",
                    sys(s),
                    st.lost,
                    n * plan.notify_paced
                ));
            }
            res.add(&format!("notify/{}/s{n}", sys(s)), &st.metrics());
        }
        // The fan-out cell as the issue measures it: nkv's data dir on tmpfs.
        if let Some(s) = &rig.nkv_shm {
            let st = notify::measure(s, n, 1, plan.notify_burst)?;
            res.add(&format!("fanout/nkv-shm/s{n}"), &st.metrics());
        }
    }
    Ok(())
}

/// The present servers of an A/B pair, in this round's order.
fn order(a_first: bool, pair: [&Option<Server>; 2]) -> Vec<&Server> {
    let mut v: Vec<&Server> = pair.into_iter().flatten().collect();
    if !a_first {
        v.reverse();
    }
    v
}

fn sys(s: &Server) -> &'static str {
    if s.dialect == Dialect::Redis {
        "redis"
    } else {
        "nkv"
    }
}

/// Stops a server with SIGTERM and notes anything unexpected: no exit within 10 s, a non-zero
/// exit, the socket file left behind. Returns how long the exit took.
pub fn stop(server: &mut Server, res: &mut Results) -> Option<Duration> {
    let name = server.proc.name().to_string();
    match server.proc.terminate(Duration::from_secs(10)) {
        Ok((took, status)) => {
            if !status.success() && server.dialect == Dialect::Nkv {
                res.note(format!(
                    "nkv-server exited with {status} on SIGTERM (expected exit 0)"
                ));
            }
            if server.dialect == Dialect::Nkv && server.socket.exists() {
                res.note(format!(
                    "nkv-server left its socket file behind after SIGTERM ({name})"
                ));
            }
            Some(took)
        }
        Err(e) => {
            res.note(e);
            None
        }
    }
}

fn render(res: &Results, tables: &[results::Table]) -> String {
    let mut md = String::from("## nkv benchmark results\n\n");
    for (k, v) in &res.info {
        md.push_str(&format!("- **{k}**: {v}\n"));
    }
    md.push('\n');
    for t in tables {
        md.push_str(&t.markdown());
        md.push('\n');
    }
    if !res.notes.is_empty() {
        md.push_str("### Notes\n\n");
        for n in &res.notes {
            md.push_str(&format!("- {n}\n"));
        }
    }
    md
}
