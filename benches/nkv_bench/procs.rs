//! Child processes (nkv-server, redis-server): start, wait until they answer, read their
//! footprint from /proc, stop. A `Proc` kills its child when dropped (panics included), and a
//! signal thread kills every live child on SIGINT/SIGTERM/SIGHUP before exiting.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::wire::{Conn, Dialect};

/// Pids of the children still running; the signal thread kills these. Touched by `Proc`
/// (spawn, drop) and the signal thread.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Temp directories to remove if a signal ends the run (destructors do not run then).
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Has the signal thread remove `dir` (recursively) if a signal ends the run.
pub fn remove_on_signal(dir: &Path) {
    if let Ok(mut l) = TEMP_DIRS.lock() {
        l.push(dir.to_path_buf());
    }
}

/// How often `wait_ready` retries the socket: short, since start-up time is measured with it.
const POLL: Duration = Duration::from_micros(200);

pub fn install_signal_cleanup() -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let pids = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
                for pid in &pids {
                    let _ = Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                }
                for dir in TEMP_DIRS.lock().map(|l| l.clone()).unwrap_or_default() {
                    let _ = fs::remove_dir_all(dir);
                }
                eprintln!(
                    "nkv_bench: signal {sig}: killed {} child process(es), exiting",
                    pids.len()
                );
                std::process::exit(128 + sig);
            }
        })?;
    Ok(())
}

pub struct Proc {
    name: String,
    /// `None` once the child has been waited for.
    child: Option<Child>,
    log: PathBuf,
}

/// Memory and threads of a process, from /proc/PID/status.
#[derive(Clone, Copy, Debug)]
pub struct ProcStatus {
    pub rss_kib: u64,
    pub threads: u64,
}

/// When a started server first accepted a connection, and first answered a request.
#[derive(Clone, Copy, Debug)]
pub struct Ready {
    pub connect: Duration,
    pub reply: Duration,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, String> {
        let out = File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({cmd:?}): {e}"))?;
        if let Ok(mut l) = LIVE.lock() {
            l.push(child.id());
        }
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The exit status if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn status(&self) -> Result<ProcStatus, String> {
        let path = format!("/proc/{}/status", self.pid());
        let text = fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(format!("{path} has no {name}"))
        };
        Ok(ProcStatus {
            rss_kib: field("VmRSS:")?,
            threads: field("Threads:")?,
        })
    }

    /// The last lines the child printed, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        if tail.is_empty() {
            format!("({} printed nothing)", self.name)
        } else {
            tail
        }
    }

    /// SIGTERM, then wait up to `grace` for the exit; SIGKILL after that.
    /// Returns how long the exit took and the exit status, or an error saying it was killed.
    pub fn terminate(&mut self, grace: Duration) -> Result<(Duration, ExitStatus), String> {
        let Some(mut child) = self.child.take() else {
            return Err(format!("{} was already stopped", self.name));
        };
        let pid = child.id();
        let t0 = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let outcome = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Ok((t0.elapsed(), st)),
                Ok(None) if t0.elapsed() < grace => thread::sleep(Duration::from_micros(500)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!(
                        "{} did not exit within {grace:?} of SIGTERM; killed",
                        self.name
                    ));
                }
            }
        };
        unregister(pid);
        outcome
    }

    /// Polls `socket` until a connection is accepted and a probe request (`HEALTH` / `PING`)
    /// is answered, measured from `started`. Fails if the child exits or `limit` passes.
    pub fn wait_ready(
        &mut self,
        socket: &Path,
        dialect: Dialect,
        started: Instant,
        limit: Duration,
    ) -> Result<Ready, String> {
        let probe: &[u8] = match dialect {
            Dialect::Nkv => b"HEALTH\n",
            Dialect::Redis => b"PING\r\n",
            Dialect::Echo => b"ping\n",
        };
        let mut connect = None;
        let mut last_err = String::from("socket never appeared");
        loop {
            if let Some(st) = self.exited() {
                return Err(format!(
                    "{} exited with {st} before answering; its output:\n{}",
                    self.name,
                    self.log_tail()
                ));
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "{} did not answer on {} within {limit:?} (last: {last_err}); its output:\n{}",
                    self.name,
                    socket.display(),
                    self.log_tail()
                ));
            }
            match Conn::connect(socket, dialect) {
                Ok(mut c) => {
                    let at = started.elapsed();
                    let connect = *connect.get_or_insert(at);
                    match c.call(probe) {
                        Ok(_) => {
                            return Ok(Ready {
                                connect,
                                reply: started.elapsed(),
                            })
                        }
                        Err(e) => last_err = format!("probe: {e}"),
                    }
                }
                Err(e) => last_err = e.to_string(),
            }
            thread::sleep(POLL);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister(child.id());
        }
    }
}

fn unregister(pid: u32) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|p| *p != pid);
    }
}

/// The first `name` on PATH that is a file.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Raises the soft open-files limit to the hard one: 300 subscribers take 600 descriptors here.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}
