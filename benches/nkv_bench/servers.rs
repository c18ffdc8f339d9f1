//! Where things run: the temp directories (disk and tmpfs), starting nkv and Redis on fresh
//! sockets, and loading keys into them.

use std::cell::Cell;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::procs::{self, Proc, Ready};
use crate::wire::{push_u64, Conn, Dialect};

/// A server must answer within this after being started (100,000 keys included).
const START_LIMIT: Duration = Duration::from_secs(120);

/// Pipelined loading sends this many bytes of requests before reading their replies: small
/// enough to fit the socket buffers, so neither side blocks on the other.
const PIPELINE_BYTES: usize = 48 * 1024;

pub struct Env {
    pub bin: PathBuf,
    pub client_bin: PathBuf,
    pub target_dir: PathBuf,
    pub fsync: bool,
    pub redis_bin: Option<PathBuf>,
    /// Sockets and logs: a short path under /tmp (socket paths are limited to 108 bytes).
    pub run_dir: TempDir,
    /// Data directories on a real disk filesystem (not tmpfs).
    pub disk: TempDir,
    pub disk_fs: String,
    /// Data directories on tmpfs (/dev/shm), when it exists.
    pub shm: Option<TempDir>,
    pub shm_fs: String,
    /// Makes every socket, log and data directory name unique.
    counter: Cell<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Base {
    Disk,
    Shm,
}

pub struct Server {
    pub proc: Proc,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub ready: Ready,
    pub dialect: Dialect,
}

impl Env {
    pub fn new(fsync: bool, use_redis: bool) -> Result<Env, String> {
        let bin = match std::env::var_os("NKV_BENCH_SERVER") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(env!("CARGO_BIN_EXE_nkv-server")),
        };
        let client_bin = PathBuf::from(env!("CARGO_BIN_EXE_nkv-client"));
        if !bin.is_file() {
            return Err(format!("no server binary at {}", bin.display()));
        }
        // target/<profile>/nkv-server -> target
        let built = PathBuf::from(env!("CARGO_BIN_EXE_nkv-server"));
        let target_dir = built
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("target"));

        let run_dir = tempfile::Builder::new()
            .prefix("nkv-bench-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let mut disk = None;
        let candidates = [
            target_dir.join("nkv-bench").join("tmp"),
            PathBuf::from("/var/tmp"),
        ];
        for dir in &candidates {
            if fs::create_dir_all(dir).is_err() {
                continue;
            }
            let fs_type = fs_type(dir);
            if fs_type == "tmpfs" || fs_type == "ramfs" {
                eprintln!(
                    "nkv_bench: {} is on {fs_type}; looking further for a disk",
                    dir.display()
                );
                continue;
            }
            if let Ok(t) = tempfile::Builder::new().prefix("data-").tempdir_in(dir) {
                disk = Some((t, fs_type));
                break;
            }
        }
        let (disk, disk_fs) = match disk {
            Some(d) => d,
            None => {
                eprintln!("nkv_bench: warning: found no non-tmpfs directory; the 'disk' figures are not on a disk");
                let t = tempfile::Builder::new()
                    .prefix("nkv-bench-data-")
                    .tempdir_in(&candidates[1])
                    .map_err(|e| format!("temp dir: {e}"))?;
                let f = fs_type(t.path());
                (t, f)
            }
        };
        let shm = tempfile::Builder::new()
            .prefix("nkv-bench-")
            .tempdir_in("/dev/shm")
            .ok();
        let shm_fs = shm
            .as_ref()
            .map(|t| fs_type(t.path()))
            .unwrap_or_else(|| "none".into());
        for t in [Some(&run_dir), Some(&disk), shm.as_ref()]
            .into_iter()
            .flatten()
        {
            procs::remove_on_signal(t.path());
        }
        let redis_bin = if use_redis {
            procs::find_on_path("redis-server")
        } else {
            None
        };
        Ok(Env {
            bin,
            client_bin,
            target_dir,
            fsync,
            redis_bin,
            run_dir,
            disk,
            disk_fs,
            shm,
            shm_fs,
            counter: Cell::new(0),
        })
    }

    fn next(&self) -> usize {
        let n = self.counter.get() + 1;
        self.counter.set(n);
        n
    }

    /// A new empty directory under `base`.
    pub fn fresh_dir(&self, base: Base, tag: &str) -> Result<PathBuf, String> {
        let root = match base {
            Base::Disk => self.disk.path(),
            Base::Shm => self.shm.as_ref().ok_or("/dev/shm is not available")?.path(),
        };
        let dir = root.join(format!("{tag}-{}", self.next()));
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Starts nkv-server on `data_dir` with a new socket; returns once it answers `HEALTH`.
    pub fn start_nkv(&self, tag: &str, data_dir: &Path) -> Result<Server, String> {
        let n = self.next();
        let socket = self.run_dir.path().join(format!("{tag}-{n}.sock"));
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(data_dir);
        if self.fsync {
            cmd.arg("--fsync");
        }
        let started = Instant::now();
        let mut proc = Proc::spawn(
            &format!("nkv-server ({tag})"),
            cmd,
            self.run_dir.path().join(format!("{tag}-{n}.log")),
        )?;
        let ready = proc.wait_ready(&socket, Dialect::Nkv, started, START_LIMIT)?;
        Ok(Server {
            proc,
            socket,
            dir: data_dir.to_path_buf(),
            ready,
            dialect: Dialect::Nkv,
        })
    }

    /// Starts redis-server with AOF (appendfsync everysec) in a data directory on disk, on a new
    /// Unix socket, and turns on keyspace notifications.
    pub fn start_redis(&self, tag: &str) -> Result<Server, String> {
        let bin = self.redis_bin.as_ref().ok_or("redis-server not found")?;
        let n = self.next();
        let dir = self.fresh_dir(Base::Disk, tag)?;
        let socket = self.run_dir.path().join(format!("{tag}-{n}.sock"));
        let mut cmd = Command::new(bin);
        cmd.args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args([
                "--unixsocketperm",
                "700",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
            ])
            .arg(&dir)
            .args(["--save", ""]);
        let started = Instant::now();
        let mut proc = Proc::spawn(
            &format!("redis-server ({tag})"),
            cmd,
            self.run_dir.path().join(format!("{tag}-{n}.log")),
        )?;
        let ready = proc.wait_ready(&socket, Dialect::Redis, started, START_LIMIT)?;
        let mut c = Conn::connect(&socket, Dialect::Redis).map_err(|e| e.to_string())?;
        c.call(b"CONFIG SET notify-keyspace-events KEA\r\n")
            .map_err(|e| format!("redis CONFIG SET: {e}"))?;
        Ok(Server {
            proc,
            socket,
            dir,
            ready,
            dialect: Dialect::Redis,
        })
    }
}

impl Server {
    pub fn connect(&self) -> Result<Conn, String> {
        Conn::connect(&self.socket, self.dialect).map_err(|e| format!("{}: {e}", self.proc.name()))
    }

    /// Sends one request and returns the reply as text.
    pub fn ask(&self, req: &str) -> Result<String, String> {
        let mut c = self.connect()?;
        let reply = c
            .call(req.as_bytes())
            .map_err(|e| format!("{} {:?}: {e}", self.proc.name(), req.trim_end()))?;
        Ok(String::from_utf8_lossy(reply).trim_end().to_string())
    }

    /// The `keys` figure of nkv's `STATS`.
    pub fn stats_keys(&self) -> Result<u64, String> {
        let reply = self.ask("STATS\n")?;
        let v: serde_json::Value =
            serde_json::from_str(&reply).map_err(|e| format!("STATS reply {reply:?}: {e}"))?;
        v["keys"]
            .as_u64()
            .ok_or(format!("STATS reply without keys: {reply}"))
    }

    /// Writes `n` keys (`<prefix><i>`) holding `value`, pipelined over one connection.
    pub fn populate(&self, prefix: &str, n: usize, value: &[u8]) -> Result<(), String> {
        let mut c = self.connect()?;
        let (verb, end): (&[u8], &[u8]) = match self.dialect {
            Dialect::Redis => (b"SET ", b"\r\n"),
            _ => (b"PUT ", b"\n"),
        };
        let mut batch = Vec::with_capacity(PIPELINE_BYTES + value.len() + 256);
        let mut i = 0;
        while i < n {
            batch.clear();
            let mut sent = 0;
            while i < n && batch.len() < PIPELINE_BYTES {
                batch.extend_from_slice(verb);
                batch.extend_from_slice(prefix.as_bytes());
                push_u64(&mut batch, i as u64);
                batch.push(b' ');
                batch.extend_from_slice(value);
                batch.extend_from_slice(end);
                i += 1;
                sent += 1;
            }
            c.send(&batch)
                .map_err(|e| format!("loading {prefix}*: {e}"))?;
            for _ in 0..sent {
                c.recv().map_err(|e| format!("loading {prefix}*: {e}"))?;
            }
        }
        Ok(())
    }
}

/// The filesystem type of the mount holding `path`, from /proc/self/mounts.
pub fn fs_type(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut f = line.split(' ');
        let (Some(_dev), Some(mnt), Some(kind)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let mnt = mnt.replace("\\040", " ");
        if path.starts_with(&mnt) && best.as_ref().is_none_or(|(len, _)| mnt.len() >= *len) {
            best = Some((mnt.len(), kind.to_string()));
        }
    }
    best.map_or_else(|| "unknown".into(), |(_, k)| k)
}

/// Files and bytes under `dir`, recursively.
pub fn tree_size(dir: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(_) => {
                    files += 1;
                    bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}
