//! The floors nkv is measured against, run in the same process and the same rounds:
//! a bare Unix-socket echo (the cost of one round trip), a bare write-temp-file-and-rename
//! loop (the cost of one PUT's file), and reading a data directory's files (the cost of start-up).

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::wire::{push_u64, IO_TIMEOUT};

/// A line echo server on a Unix socket: a thread per connection, like nkv.
pub struct EchoServer {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(socket: PathBuf) -> Result<EchoServer, String> {
        let listener =
            UnixListener::bind(&socket).map_err(|e| format!("bind {}: {e}", socket.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let accept = thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    // Detached: it ends when its client closes (or after IO_TIMEOUT of silence).
                    let _ = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
                        let _ = echo(conn);
                    });
                }
            })
            .map_err(|e| format!("spawn echo thread: {e}"))?;
        Ok(EchoServer {
            socket,
            stop,
            accept: Some(accept),
        })
    }
}

fn echo(conn: UnixStream) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut line = Vec::with_capacity(8192);
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        writer.write_all(&line)?;
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accept() so the thread sees the flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

/// File names of the rename floor start with this, so they can be removed afterwards.
const FLOOR_PREFIX: &str = "zz-bench-floor.";

/// One client of the rename floor: each op writes `value` to a temp file in `dir` and renames
/// it over the key's file, cycling through `keys` file names (like a PUT client cycles keys).
/// With `fsync`, the file and then the directory are synced, as a durable PUT would.
pub fn rename_op(
    dir: &Path,
    client: usize,
    keys: usize,
    value: Vec<u8>,
    fsync: bool,
) -> impl FnMut(usize) -> io::Result<()> {
    let dir = dir.to_path_buf();
    let mut name = Vec::with_capacity(64);
    move |i| {
        name.clear();
        name.extend_from_slice(FLOOR_PREFIX.as_bytes());
        push_u64(&mut name, client as u64);
        name.push(b'.');
        push_u64(&mut name, (i % keys) as u64);
        let base = std::str::from_utf8(&name).expect("ASCII built above");
        let final_path = dir.join(base);
        let tmp_path = dir.join(format!(".{base}.tmp"));
        let mut f = File::create(&tmp_path)?;
        f.write_all(&value)?;
        if fsync {
            f.sync_all()?;
        }
        drop(f);
        fs::rename(&tmp_path, &final_path)?;
        if fsync {
            File::open(&dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Removes the rename floor's files from `dir`.
pub fn remove_floor_files(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(FLOOR_PREFIX) || name.starts_with(&format!(".{FLOOR_PREFIX}")) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Reads every file under `dir` (read_dir, then read each file), as a loader at start-up must.
/// Returns the time taken and the number of files.
pub fn read_tree(dir: &Path) -> io::Result<(Duration, u64)> {
    let t0 = Instant::now();
    let mut files = 0;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
                continue;
            }
            buf.clear();
            File::open(e.path())?.read_to_end(&mut buf)?;
            files += 1;
        }
    }
    Ok((t0.elapsed(), files))
}
