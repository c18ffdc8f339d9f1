//! What the figures were measured on: CPU, kernel, filesystems, versions, options.

use std::fs;
use std::process::Command;

use crate::opts::Opts;
use crate::results::Results;
use crate::servers::Env;

pub fn describe(env: &Env, opts: &Opts, res: &mut Results) {
    let cpus = machine_cpus();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |s| s.trim().to_string());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    res.info(
        "machine",
        format!("{cpus} CPUs, {model}, {mem} RAM, Linux {kernel}"),
    );
    res.info(
        "disk data dirs",
        format!("{} ({})", env.disk.path().display(), env.disk_fs),
    );
    res.info(
        "tmpfs data dirs",
        format!(
            "{} ({})",
            env.shm
                .as_ref()
                .map_or("none".into(), |t| t.path().display().to_string()),
            env.shm_fs
        ),
    );
    res.info("nkv-server", env.bin.display().to_string());
    let redis = match &env.redis_bin {
        Some(b) => {
            first_line(Command::new(b).arg("--version")).unwrap_or_else(|| b.display().to_string())
        }
        None if opts.no_redis => "skipped (--no-redis)".into(),
        None => "not found".into(),
    };
    res.info("redis", redis);
    if let Some(v) = first_line(Command::new("rustc").arg("--version")) {
        res.info("rustc", v);
    }
    let mode = if opts.quick { "quick" } else { "full" };
    let only = opts
        .only
        .as_ref()
        .map(|l| l.iter().map(|s| s.name()).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| "all".into());
    res.info(
        "run",
        format!(
            "{mode}, {} round(s), sections {only}, nkv {}",
            opts.rounds,
            if opts.fsync {
                "--fsync"
            } else {
                "without --fsync"
            }
        ),
    );
}

/// The machine's CPUs (not only those this process may use: `--cpus` narrows those).
fn machine_cpus() -> usize {
    let info = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let n = info.lines().filter(|l| l.starts_with("processor")).count();
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The 1-, 5- and 15-minute load averages, as /proc/loadavg shows them.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Notes a busy machine: other processes' CPU use distorts every figure here.
pub fn check_quiet(res: &mut Results) {
    let load = load_average();
    res.info("load average (start of run)", load.clone());
    let one: f64 = load
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let cpus = machine_cpus() as f64;
    if one > 0.5 * cpus {
        res.note(format!("the machine was busy when the run started (load average {load} on {cpus} CPUs): figures are unreliable"));
    }
}

fn first_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    String::from_utf8(out.stdout)
        .ok()?
        .lines()
        .next()
        .map(str::to_string)
}
