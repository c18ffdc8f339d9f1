//! The harness: a real server in a fresh temp dir, and ways to talk to it.

#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

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

    /// Takes `child`, a server started some other way (e.g. under a shell), and waits until
    /// it accepts connections.
    pub fn adopt(&mut self, child: Child) {
        self.child = Some(child);
        wait_until("the adopted server to accept connections", || {
            UnixStream::connect(&self.socket).is_ok()
        });
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

    /// The server's thread count once it has started all of its threads. A connect succeeds
    /// as soon as the socket listens, before the signal thread and the first accepting thread
    /// exist; a reply proves both do (the signal thread starts before accepting does).
    pub fn started_threads(&self) -> u64 {
        assert_eq!(self.raw().request("HEALTH")["ok"], true);
        proc_status(self.pid(), "Threads")
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
        output_with_input(self.cli_command(args), stdin, "nkv-client")
    }

    /// `nkv-client --socket <socket> args...`, not started.
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(CLIENT);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// `printf '%s' input | socat - UNIX-CONNECT:<socket>`, exactly as a script would.
    pub fn socat(&self, input: &str) -> String {
        let out = output_with_input(self.socat_command(), input, "socat");
        assert!(out.status.success(), "socat failed: {out:?}");
        String::from_utf8(out.stdout).expect("utf-8 from socat")
    }

    /// `socat - UNIX-CONNECT:<socket>`, not started.
    pub fn socat_command(&self) -> Command {
        let mut cmd = Command::new("socat");
        cmd.arg("-")
            .arg(format!("UNIX-CONNECT:{}", self.socket.display()));
        cmd
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How long a command a test runs may take before it is killed and the test fails: well above
/// any command's normal time on a loaded machine, well below the CI's limit.
pub const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// Runs `cmd` with `input` on its stdin and returns its output; `what` names it in a panic.
fn output_with_input(mut cmd: Command, input: &str, what: &str) -> Output {
    output_within(&mut cmd, input.as_bytes(), what, COMMAND_DEADLINE)
}

/// Runs `cmd` with `input` on its stdin and returns its output, or kills it and panics with
/// what it printed if it has not exited within `deadline`: a test that hangs is a failure
/// that names the command, never a CI run that times out.
pub fn output_within(cmd: &mut Command, input: &[u8], what: &str, deadline: Duration) -> Output {
    run_within(cmd, input, deadline)
        .unwrap_or_else(|e| panic!("spawn {what} (is it installed?): {e}"))
}

/// `Command::output` with [`COMMAND_DEADLINE`]: the drop-in every test uses.
pub trait BoundedOutput {
    fn bounded_output(&mut self) -> io::Result<Output>;
}

impl BoundedOutput for Command {
    fn bounded_output(&mut self) -> io::Result<Output> {
        run_within(self, b"", COMMAND_DEADLINE)
    }
}

fn run_within(cmd: &mut Command, input: &[u8], deadline: Duration) -> io::Result<Output> {
    let what = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let reader = |pipe: Option<Box<dyn io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = reader(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = reader(child.stderr.take().map(|p| Box::new(p) as _));
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_vec();
    // Written from a thread, so a command that reads nothing cannot block the deadline.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let end = Instant::now() + deadline;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&stdout.join().unwrap_or_default()).into_owned();
            let err = String::from_utf8_lossy(&stderr.join().unwrap_or_default()).into_owned();
            panic!("{what} did not exit within {deadline:?}\nstdout: {out}\nstderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if let Ok(Err(e)) = writer.join() {
        // A command that exits without reading all of its input is the test's to judge.
        if e.kind() != ErrorKind::BrokenPipe {
            panic!("write to {what}: {e}");
        }
    }
    Ok(Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    })
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

/// The server's fan-out threads (`mailbox::fanout`): started by the first fan-out to two or
/// more subscribers and kept for the server's life, one per further CPU. Not per client, so
/// thread counts that must come back to idle leave them out.
pub fn fanout_threads(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "nkv-fanout")
                .count() as u64
        })
        .unwrap_or(0)
}

/// The resident set size of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS")
}

pub fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

/// Parses one line as JSON, naming the line when it is not.
pub fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

/// A raw socket connection speaking lines, byte for byte as socat would, on one file descriptor
/// (a test holds a thousand at once).
///
/// Two families: `connect`, `send`, `line`, `json`, `request`, `subscribe` and `assert_closed`
/// panic on anything unexpected; `try_connect`, `try_send`, `try_line`, `try_json` and
/// `try_request` report it instead, for tests that list every failure or race a server that may
/// be gone.
///
/// The server closing the connection is the end of the stream, whether it arrives as end of file
/// or as a reset (the server closed with our bytes unread). A line the close cuts short is not a
/// line: `line` panics on it and the `try_` reads report it.
pub struct Raw {
    /// Reads buffer here; writes go straight to `reader.get_ref()` (`&UnixStream` is `Write`).
    pub reader: BufReader<UnixStream>,
}

impl Raw {
    /// Connects to `path`; reads time out after `DEADLINE`.
    pub fn connect(path: &Path) -> Raw {
        Raw::try_connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()))
    }

    /// Connects to `path`; reads time out after `DEADLINE`.
    ///
    /// # Errors
    /// When nobody accepts on `path`.
    pub fn try_connect(path: &Path) -> io::Result<Raw> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(DEADLINE))?;
        Ok(Raw {
            reader: BufReader::new(stream),
        })
    }

    /// The socket, to write, clone or shut down beside the helpers.
    pub fn stream(&self) -> &UnixStream {
        self.reader.get_ref()
    }

    /// Replaces the read timeout (`DEADLINE` from `connect`).
    pub fn set_read_timeout(&self, timeout: Duration) {
        self.stream()
            .set_read_timeout(Some(timeout))
            .expect("read timeout");
    }

    /// Sends bytes as they are.
    ///
    /// # Errors
    /// When the write fails, e.g. the server has closed the connection (broken pipe).
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream().write_all(bytes)
    }

    /// Sends bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.try_send(bytes).expect("send");
    }

    /// Sends one line (adds `\n`).
    pub fn send(&mut self, line: &str) {
        self.send_bytes(format!("{line}\n").as_bytes());
    }

    /// Reads one line (without `\n`); `Ok(None)` once the server has closed the connection.
    ///
    /// # Errors
    /// A failed read (a timeout, say), a line cut short by the close, or a line not UTF-8.
    pub fn try_line(&mut self) -> Result<Option<String>, String> {
        let mut bytes = Vec::new();
        match self.reader.read_until(b'\n', &mut bytes) {
            Ok(_) => {}
            // What was read before a reset is kept in `bytes`, and judged below.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        if bytes.pop_if(|b| *b == b'\n').is_none() {
            return Err(format!(
                "unterminated line at the end of the stream: {:?}",
                String::from_utf8_lossy(&bytes)
            ));
        }
        String::from_utf8(bytes).map(Some).map_err(|e| {
            let line = String::from_utf8_lossy(e.as_bytes()).into_owned();
            format!("not UTF-8: {line:?}")
        })
    }

    /// Reads one line (without `\n`); `None` once the server has closed the connection.
    ///
    /// # Panics
    /// On what `try_line` reports as an error.
    pub fn line(&mut self) -> Option<String> {
        self.try_line()
            .unwrap_or_else(|e| panic!("reading a line: {e}"))
    }

    /// Reads the lines left until the server closes the connection.
    pub fn lines_until_closed(&mut self) -> Vec<String> {
        std::iter::from_fn(|| self.line()).collect()
    }

    /// Reads one line as JSON.
    ///
    /// # Errors
    /// What `try_line` reports, a closed connection, or a line that is not JSON.
    pub fn try_json(&mut self) -> Result<Value, String> {
        let line = self.try_line()?.ok_or("connection closed")?;
        serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line:?}"))
    }

    /// Reads one line as JSON.
    pub fn json(&mut self) -> Value {
        parse(&self.line().expect("a line, not end of stream"))
    }

    /// Sends a request line (bytes as they are, plus `\n`) and reads its JSON response.
    ///
    /// # Errors
    /// A failed send, or what `try_json` reports.
    pub fn try_request(&mut self, line: impl AsRef<[u8]>) -> Result<Value, String> {
        let mut bytes = line.as_ref().to_vec();
        bytes.push(b'\n');
        self.try_send(&bytes)
            .map_err(|e| format!("send failed: {e}"))?;
        self.try_json()
    }

    /// Sends a request line and reads its JSON response.
    pub fn request(&mut self, line: &str) -> Value {
        self.send(line);
        self.json()
    }

    /// Whether `HEALTH` is answered `ok`; false, not a panic, when the connection is unusable.
    pub fn healthy(&mut self) -> bool {
        self.try_request("HEALTH") == Ok(json!({"ok": true, "status": "ok"}))
    }

    /// Sends `SUB target` and reads the acknowledgement, the `init` events and the `ready`
    /// marker (which must name `target` and count the inits); returns the number of inits.
    pub fn subscribe(&mut self, target: &str) -> u64 {
        assert_eq!(self.request(&format!("SUB {target}")), json!({"ok": true}));
        let mut inits = 0;
        loop {
            let event = self.json();
            match event["event"].as_str() {
                Some("init") => inits += 1,
                Some("ready") => {
                    assert_eq!(event["sub"], target);
                    assert_eq!(event["count"], inits);
                    return inits;
                }
                _ => panic!("unexpected line in the snapshot of {target}: {event}"),
            }
        }
    }

    /// Asserts the server closed the connection (after everything already read).
    pub fn assert_closed(&mut self) {
        if let Some(line) = self.line() {
            panic!("expected the connection to be closed, got {line:?}");
        }
    }
}
