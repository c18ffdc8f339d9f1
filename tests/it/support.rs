//! The harness: a real server in a fresh temp dir, and ways to talk to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SERVER: &str = env!("CARGO_BIN_EXE_nkv-server");
pub const CLIENT: &str = env!("CARGO_BIN_EXE_nkv-client");

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` until it holds; panics naming `what` after `DEADLINE`.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `nkv-server`, killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    /// Extra environment for the server process.
    pub env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// A server with default flags in a new temp dir.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// A server with extra flags in a new temp dir.
    pub fn start_with(args: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut server = Server::new_in(tmp.path(), args);
        server._tmp = Some(tmp);
        server.spawn_and_wait();
        server
    }

    /// A server with extra environment variables in a new temp dir.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut server = Server::new_in(tmp.path(), args);
        server.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        server._tmp = Some(tmp);
        server.spawn_and_wait();
        server
    }

    /// A server description in `dir` (socket `dir/nkv.sock`, data `dir/data`), not started.
    pub fn new_in(dir: &Path, args: &[&str]) -> Server {
        Server {
            child: None,
            dir: dir.to_owned(),
            socket: dir.join("nkv.sock"),
            data: dir.join("data"),
            log: dir.join("server.log"),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            _tmp: None,
        }
    }

    /// The command that starts this server (for tests that start it in unusual ways).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(SERVER);
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.args)
            .env("RUST_LOG", "debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd
    }

    /// Starts the process and waits until it accepts connections.
    pub fn spawn_and_wait(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = self
            .command()
            .stderr(log)
            .spawn()
            .expect("spawn nkv-server");
        self.child = Some(child);
        let end = Instant::now() + DEADLINE;
        loop {
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "nkv-server exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < end,
                "nkv-server did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops (SIGKILL) and starts again on the same socket and data dir.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let signal = nix::sys::signal::Signal::try_from(signal).expect("signal");
        nix::sys::signal::kill(pid, signal).expect("kill");
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the server to exit by itself (after a signal); panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server running");
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < end,
                "server did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc_sigterm());
        self.wait_exit(Duration::from_secs(5))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn client(&self) -> nkv::Client {
        nkv::Client::connect(&self.socket).expect("connect")
    }

    pub fn raw(&self) -> Raw {
        Raw::connect(&self.socket)
    }

    /// Runs `nkv-client --socket <socket> args...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_stdin(args, "")
    }

    pub fn cli_with_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(CLIENT)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nkv-client");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("nkv-client output")
    }

    /// `printf '%s' input | socat - UNIX-CONNECT:<socket>`, exactly as a script would.
    pub fn socat(&self, input: &str) -> String {
        let mut child = Command::new("socat")
            .arg("-")
            .arg(format!("UNIX-CONNECT:{}", self.socket.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("socat must be installed (apt-get install socat)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to socat");
        let out = child.wait_with_output().expect("socat output");
        assert!(out.status.success(), "socat failed: {out:?}");
        String::from_utf8(out.stdout).expect("utf-8 from socat")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A numeric field of `/proc/<pid>/status` (`VmRSS`, `VmHWM` in KiB; `Threads`).
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

pub fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

/// A raw socket connection speaking lines.
pub struct Raw {
    pub reader: BufReader<UnixStream>,
    pub writer: UnixStream,
}

impl Raw {
    pub fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        Raw {
            writer: stream.try_clone().expect("clone"),
            reader: BufReader::new(stream),
        }
    }

    /// Sends bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// Sends one line (adds `\n`).
    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    /// Reads one line (without `\n`); `None` at end of stream.
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_owned()),
            Err(e) => panic!("reading a line: {e}"),
        }
    }

    /// Reads one line as JSON.
    pub fn json(&mut self) -> Value {
        let line = self.line().expect("a line, not end of stream");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// Sends a request line and reads its JSON response.
    pub fn request(&mut self, line: &str) -> Value {
        self.send(line);
        self.json()
    }
}
