//! `nkv-server`: argument parsing, logging and signals; the work is in `nkv::server`.
//!
//! Exit status: 0 after an orderly stop, 1 when it cannot start, 2 for bad usage.

#[path = "common/man.rs"]
mod man;

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use nkv::class::Class;
use nkv::class::ClassRules;
use nkv::key::Key;
use nkv::server::{Config, Limits, Server};

/// The nkv server: a notify key-value store on a Unix socket.
///
/// Every flag can also be set through the environment variable named beside it (for systemd's
/// EnvironmentFile). Logging is controlled by RUST_LOG (default: info).
///
/// Signals: SIGTERM and SIGINT stop the server cleanly (in-flight requests finish, subscribers
/// get a shutdown event, the socket file is removed, exit status 0); SIGHUP is logged and
/// otherwise ignored.
#[derive(Parser, Debug)]
#[command(name = "nkv-server", version, about, long_about)]
struct Args {
    /// Unix socket to listen on (parent directories are created)
    #[arg(
        long,
        visible_alias = "addr",
        env = "NKV_SOCKET",
        default_value = "/tmp/nkv/nkv.sock"
    )]
    socket: PathBuf,

    /// Directory holding one file per key (created if missing)
    #[arg(long, env = "NKV_DATA_DIR", default_value = "/tmp/nkv/data")]
    data_dir: PathBuf,

    /// Most simultaneous client connections; one more is answered with an error and closed
    #[arg(long, env = "NKV_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,

    /// Largest value, in bytes of JSON text
    #[arg(long, env = "NKV_MAX_VALUE_BYTES", default_value_t = 16 << 20)]
    max_value_bytes: usize,

    /// Most subscriptions one connection may hold
    #[arg(long, env = "NKV_MAX_SUBSCRIPTIONS", default_value_t = 1024)]
    max_subscriptions: usize,

    /// Seconds a client may hold a partial line, or stay silent after connecting, before it
    /// is disconnected (0 = never)
    #[arg(long, env = "NKV_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout: u64,

    /// Seconds a subscriber's socket may accept nothing while events are pending before the
    /// subscriber is disconnected and counted as `dropped_slow` (0 = never)
    #[arg(long, env = "NKV_SEND_TIMEOUT", default_value_t = 300)]
    send_timeout: u64,

    /// Microseconds a connection thread polls for its client's next request before sleeping
    /// on it: a sequential client gets its replies sooner, for a bounded amount of CPU (at most
    /// one thread fewer than the CPUs polls at once; none on one CPU). 0 = never
    #[arg(long, env = "NKV_SPIN", value_name = "MICROS", default_value_t = nkv::server::DEFAULT_SPIN.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    spin: u64,

    /// Fsync every write and its directory entry before acknowledging it
    #[arg(long, env = "NKV_FSYNC", value_name = "BOOL", num_args = 0..=1,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    fsync: bool,

    /// Permissions of the socket file, in octal
    #[arg(long, env = "NKV_SOCKET_MODE", default_value = "0660", value_parser = parse_mode)]
    socket_mode: u32,

    /// Group (name or id) to own the socket file, so its members may connect; the data
    /// directory (0750) and its files (0640) get the same group, so they may also read the data
    #[arg(long, env = "NKV_SOCKET_GROUP")]
    socket_group: Option<String>,

    /// Use an existing socket or data directory even if it is a symlink, owned by another
    /// user or writable by others (by default the server refuses it and exits with status 1)
    #[arg(long, env = "NKV_ALLOW_UNSAFE_DIRS", value_name = "BOOL", num_args = 0..=1,
          default_value = "false", default_missing_value = "true",
          value_parser = BoolishValueParser::new())]
    allow_unsafe_dirs: bool,

    /// Print the man page (roff) and exit
    #[arg(long, hide = true)]
    man: bool,

    /// Directory of the `volatile` storage class: one file per key, kept across a server
    /// restart, gone after a reboot (a tmpfs). Opened only when a --class rule uses it; the
    /// same safety rules as the data directory
    #[arg(long, env = "NKV_VOLATILE_DIR", default_value = "/dev/shm/nkv")]
    volatile_dir: PathBuf,

    /// Storage class of the keys at and below PREFIX: persistent (the data directory),
    /// volatile (--volatile-dir) or memory (gone when the server stops). Repeatable; the
    /// longest matching prefix wins; everything else is persistent; `runtime=memory` unless
    /// overridden
    #[arg(
        long = "class",
        value_name = "PREFIX=CLASS",
        env = "NKV_CLASSES",
        value_delimiter = ',',
        value_parser = ClassRules::parse_rule
    )]
    classes: Vec<(Key, Class)>,

    /// Most delete records (tombstones) kept so that subscriptions can resume from a
    /// revision (`SUB key FROM rev`); an older resume gets a reset and the full snapshot
    #[arg(long, env = "NKV_TOMBSTONES", default_value_t = 100_000)]
    tombstones: usize,
}

fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal mode such as 0660"))
}

/// Parses the command line and environment. A bad value's error names both the flag and its
/// environment variable, since either may have set it.
fn parse_args() -> Result<(Args, ArgMatches), clap::Error> {
    let mut command = Args::command();
    let matches = command
        .try_get_matches_from_mut(std::env::args_os())
        .map_err(|e| {
            use clap::error::{ContextKind, ContextValue};
            let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
                return e;
            };
            let long = arg
                .trim_start_matches("--")
                .split([' ', '='])
                .next()
                .unwrap_or("");
            let env = command
                .get_arguments()
                .find(|a| a.get_long() == Some(long))
                .and_then(|a| a.get_env())
                .map(|env| env.to_string_lossy().into_owned());
            match env {
                Some(env) => {
                    // `raw` adds its own "error: " in front.
                    let rendered = e.render().to_string();
                    let message = format!(
                        "{}(set by --{long} or the environment variable {env})\n",
                        rendered.strip_prefix("error: ").unwrap_or(&rendered)
                    );
                    clap::Error::raw(e.kind(), message).with_cmd(&command)
                }
                None => e,
            }
        })?;
    let args = Args::from_arg_matches(&matches).map_err(|e| e.with_cmd(&command))?;
    Ok((args, matches))
}

/// Where a setting's value came from, for the start-up log.
fn source(matches: &ArgMatches, id: &str) -> &'static str {
    match matches.value_source(id) {
        Some(ValueSource::CommandLine) => "flag",
        Some(ValueSource::EnvVariable) => "env",
        _ => "default",
    }
}

/// Logs every setting with its source; under socket activation, the socket settings that
/// systemd's socket unit decides instead are logged as ignored.
fn log_config(args: &Args, classes: &ClassRules, matches: &ArgMatches, inherited: bool) {
    let actual = inherited.then(systemd_socket);
    let s = |id| match &actual {
        Some(_) if ["socket", "socket_mode", "socket_group"].contains(&id) => "systemd",
        _ => source(matches, id),
    };
    let (socket, mode, group) = match &actual {
        Some(used) => (used.path.clone(), used.mode.clone(), used.group.clone()),
        None => (
            args.socket.display().to_string(),
            format!("{:04o}", args.socket_mode),
            args.socket_group.clone().unwrap_or_else(|| "-".into()),
        ),
    };
    log::info!(
        "config: socket={} ({}) data-dir={} ({}) max-connections={} ({}) max-value-bytes={} ({}) \
         max-subscriptions={} ({}) idle-timeout={}s ({}) send-timeout={}s ({}) spin={}us ({}) fsync={} ({}) \
         socket-mode={} ({}) socket-group={} ({}) allow-unsafe-dirs={} ({}) class={} ({}) \
         volatile-dir={} ({}) tombstones={} ({})",
        socket,
        s("socket"),
        args.data_dir.display(),
        s("data_dir"),
        args.max_connections,
        s("max_connections"),
        args.max_value_bytes,
        s("max_value_bytes"),
        args.max_subscriptions,
        s("max_subscriptions"),
        args.idle_timeout,
        s("idle_timeout"),
        args.send_timeout,
        s("send_timeout"),
        args.spin,
        s("spin"),
        args.fsync,
        s("fsync"),
        mode,
        s("socket_mode"),
        group,
        s("socket_group"),
        args.allow_unsafe_dirs,
        s("allow_unsafe_dirs"),
        classes.describe(),
        s("classes"),
        args.volatile_dir.display(),
        s("volatile_dir"),
        args.tombstones,
        s("tombstones"),
    );
    if inherited {
        for (id, flag, value) in [
            (
                "socket",
                "--socket (NKV_SOCKET)",
                args.socket.display().to_string(),
            ),
            (
                "socket_mode",
                "--socket-mode (NKV_SOCKET_MODE)",
                format!("{:04o}", args.socket_mode),
            ),
            (
                "socket_group",
                "--socket-group (NKV_SOCKET_GROUP)",
                args.socket_group.clone().unwrap_or_default(),
            ),
        ] {
            if source(matches, id) != "default" {
                log::info!("{flag}={value} ignored: the socket comes from systemd (its socket unit sets path, mode and group)");
            }
        }
    }
}

/// The socket systemd passed (descriptor 3), as the start-up log shows it.
struct UsedSocket {
    path: String,
    mode: String,
    group: String,
}

/// The path, mode and group of the socket systemd passed, read from the descriptor and the
/// file it is bound to; `?` for what cannot be read (an abstract or unnamed socket).
fn systemd_socket() -> UsedSocket {
    use std::os::unix::fs::MetadataExt;
    let unknown = || "?".to_owned();
    let addr = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(3).ok();
    let path = addr.as_ref().and_then(|a| a.path().map(|p| p.to_owned()));
    let meta = path.as_ref().and_then(|p| std::fs::metadata(p).ok());
    UsedSocket {
        path: match (&path, addr.as_ref().and_then(|a| a.as_abstract())) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
            (None, None) => unknown(),
        },
        mode: meta
            .as_ref()
            .map_or_else(unknown, |m| format!("{:04o}", m.mode() & 0o7777)),
        group: meta.as_ref().map_or_else(unknown, |m| {
            nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                .ok()
                .flatten()
                .map_or_else(|| m.gid().to_string(), |g| g.name)
        }),
    }
}

fn main() -> ExitCode {
    let (args, matches) = match parse_args() {
        Ok(parsed) => parsed,
        Err(e) => e.exit(),
    };
    if args.man {
        return match man::render(Args::command(), &man::SERVER, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nkv-server: {e}");
                ExitCode::from(2)
            }
        };
    }
    // Two rules giving one prefix different classes: refused like any other bad flag.
    let classes = match ClassRules::checked(args.classes.clone()) {
        Ok(classes) => classes,
        Err(e) => {
            eprintln!("nkv-server: --class (or NKV_CLASSES): {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    raise_fd_limit();
    return_large_buffers_to_the_os();
    let activated = std::env::var("LISTEN_PID").ok() == Some(std::process::id().to_string());
    log_config(&args, &classes, &matches, activated);

    let config = Config {
        socket: args.socket,
        data_dir: args.data_dir,
        socket_mode: args.socket_mode,
        // An empty NKV_SOCKET_GROUP= in an environment file means "not set".
        socket_group: args.socket_group.filter(|g| !g.is_empty()),
        fsync: args.fsync,
        allow_unsafe_dirs: args.allow_unsafe_dirs,
        limits: Limits {
            max_connections: args.max_connections,
            max_value_bytes: args.max_value_bytes,
            max_subscriptions: args.max_subscriptions,
            idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
            send_timeout: (args.send_timeout > 0).then(|| Duration::from_secs(args.send_timeout)),
            spin: Duration::from_micros(args.spin),
        },
        classes,
        volatile_dir: args.volatile_dir,
        tombstones: args.tombstones,
    };
    // Before the socket exists: a SIGTERM sent as soon as it accepts must stop us cleanly, not
    // kill us. Signals that arrive before the handling thread runs wait in `signals`.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            eprintln!("nkv-server: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    ignore_file_size_signal();
    let server = match Server::start(&config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("nkv-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = server.stop_handle();
    thread::spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                log::info!("SIGHUP received: nkv has nothing to reload; still running");
                continue;
            }
            log::info!("signal {signal} received: stopping");
            stop.stop();
        }
    });
    nkv::server::sd::notify("READY=1");
    server.run();
    ExitCode::SUCCESS
}

/// glibc raises its mmap threshold each time a large block is freed, so after the first big
/// value every later one comes from the connection thread's own arena and stays there once
/// freed: twenty connections that each put a 4 MiB value would keep ~80 MiB. A fixed threshold
/// (setting it disables the adjustment) maps every block of 128 KiB or more on its own and
/// unmaps it on free, so the memory of a large put is given back when the put is done.
///
/// glibc also gives threads up to eight arenas per CPU, and what a connection frees stays in
/// its arena for that arena's threads: after 1,000 subscribers each drained a 1,000-key
/// snapshot, 33.2 KiB RSS per idle subscriber with the default, 31.3 KiB with one arena per
/// CPU (`cargo bench --bench nkv_bench -- --only footprint`; per-thread caches keep small
/// allocations off the arena locks either way).
fn return_large_buffers_to_the_os() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = i32::try_from(cpus.max(2)).unwrap_or(i32::MAX);
        // SAFETY: mallopt only changes allocator tuning; it is called before any thread starts.
        unsafe {
            nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 128 * 1024);
            nix::libc::mallopt(nix::libc::M_ARENA_MAX, arenas);
        }
    }
}

/// Hundreds of clients each hold descriptors (subscribers also an eventfd): use the hard limit.
fn raise_fd_limit() {
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}");
            }
        }
    }
}

/// A write past the file-size limit (`ulimit -f`) raises SIGXFSZ, whose default kills the
/// whole server. Ignored, the write fails with `EFBIG` instead, and that put alone is
/// refused (`no_space`, "file-size limit").
fn ignore_file_size_signal() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: installs no handler, only the kernel's "ignore" disposition.
    if let Err(e) = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) } {
        eprintln!("nkv-server: cannot ignore SIGXFSZ: {e}");
    }
}
