//! The server: accept loop, one thread per connection, and an orderly shutdown.
//!
//! - [`socket`]: binding (or inheriting) the listening socket;
//! - [`lines`]: reading request lines with limits;
//! - [`connection`]: one connection's loop and the dispatch `match`.

mod connection;
mod lines;
pub mod sd;
mod socket;

use std::collections::HashMap;
use std::io::{PipeReader, PipeWriter, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use parking_lot::{Condvar, Mutex};

pub use socket::SocketError;

use crate::disk::OpenError;
use crate::error::ErrorCode;
use crate::protocol::Response;
use crate::store::Store;
use connection::Connection;

/// Stack size of connection threads: requests need little stack (JSON nesting is capped by
/// serde_json), and hundreds of threads should not reserve megabytes each.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// How long a connection thread whose client left waits for the next accepted connection
/// before it exits: one-shot clients (`socat`, `nkv-client get`) then cost no thread start.
const LINGER: Duration = Duration::from_secs(2);

/// How long shutdown waits for connections to finish before closing them forcibly.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Everything the server is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    /// Mode of a socket file we create.
    pub socket_mode: u32,
    /// Group (name or gid) of a socket file we create.
    pub socket_group: Option<String>,
    pub fsync: bool,
    pub limits: Limits,
}

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_value_bytes: usize,
    pub max_subscriptions: usize,
    /// How long a client may hold a partial line (or send nothing at first); `None` = forever.
    pub idle_timeout: Option<Duration>,
}

impl Limits {
    /// The longest request line: the largest value plus room for the rest of the request.
    pub fn max_line(&self) -> usize {
        self.max_value_bytes.saturating_add(64 * 1024)
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 4096,
            max_value_bytes: 16 << 20,
            max_subscriptions: 1024,
            idle_timeout: Some(Duration::from_secs(60)),
        }
    }
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartError {
    Data(OpenError),
    Socket(SocketError),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Data(e) => e.fmt(f),
            StartError::Socket(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for StartError {}

/// State shared by the accept loop and every connection thread.
pub(crate) struct Shared {
    store: Store,
    limits: Limits,
    /// Open connections and running subscriber writers. Locked briefly on accept, on close,
    /// when a writer starts or stops, and at shutdown.
    connections: Mutex<Connections>,
    /// Signalled when a connection closes or a writer stops, for the shutdown drain.
    closed: Condvar,
    stopping: AtomicBool,
}

#[derive(Default)]
struct Connections {
    /// By connection id, with a handle to shut each down at stop.
    streams: HashMap<u64, UnixStream>,
    /// Subscriber writer threads still sending (they outlive their connection's reader until
    /// the queued events, and at stop the `shutdown` event, are written).
    writers: usize,
    /// The names connections gave with HELLO (for STATS), removed when they close.
    names: HashMap<u64, String>,
}

impl Connections {
    fn is_idle(&self) -> bool {
        self.streams.is_empty() && self.writers == 0
    }
}

impl Shared {
    fn connection_count(&self) -> usize {
        self.connections.lock().streams.len()
    }

    /// Records the name connection `id` gave itself with HELLO.
    fn set_name(&self, id: u64, name: &str) {
        self.connections.lock().names.insert(id, name.to_owned());
    }

    /// The names of open connections, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.connections.lock().names.values().cloned().collect();
        names.sort();
        names
    }

    /// Counts a subscriber writer thread until the returned guard is dropped.
    fn writer_running(self: &Arc<Self>) -> WriterGuard {
        self.connections.lock().writers += 1;
        WriterGuard(self.clone())
    }
}

/// Held by a subscriber writer thread; shutdown waits for all of them.
pub(crate) struct WriterGuard(Arc<Shared>);

impl Drop for WriterGuard {
    fn drop(&mut self) {
        self.0.connections.lock().writers -= 1;
        self.0.closed.notify_all();
    }
}

/// A running server's listener and state.
pub struct Server {
    shared: Arc<Shared>,
    listener: UnixListener,
    path: PathBuf,
    inherited: bool,
    /// Device and inode of the socket file we bound: at stop we remove the file only if it is
    /// still ours, not one another server put in its place.
    socket_file: Option<(u64, u64)>,
    next_id: AtomicU64,
    /// The read end of the stop pipe, polled beside the listener: stopping needs neither the
    /// socket path (which may be gone or taken by another server) nor a free descriptor.
    wake: PipeReader,
    /// The write end, shared by every [`StopHandle`].
    waker: Arc<PipeWriter>,
    /// Hands an accepted connection to a connection thread that is waiting for one. A
    /// rendezvous channel: `try_send` succeeds only when a thread is waiting right now.
    handoff: Sender<Accepted>,
    idle: Receiver<Accepted>,
}

/// An accepted connection on its way to a connection thread.
struct Accepted {
    id: u64,
    name: String,
    stream: UnixStream,
}

/// Stops a running [`Server`] from another thread (a signal handler thread, a test).
#[derive(Clone)]
pub struct StopHandle {
    shared: Arc<Shared>,
    waker: Arc<PipeWriter>,
}

impl StopHandle {
    /// Asks the server to stop: it stops accepting, lets in-flight requests finish, tells
    /// subscribers, and [`Server::run`] returns.
    pub fn stop(&self) {
        if !self.shared.stopping.swap(true, Ordering::SeqCst) {
            // One byte into the empty pipe the accept loop polls: it cannot block, and it
            // needs no new descriptor.
            if let Err(e) = (&*self.waker).write_all(b"s") {
                log::error!("cannot wake the accept loop to stop: {e}");
            }
        }
    }
}

impl Server {
    /// Opens the data directory and binds the socket (or takes the one systemd passed).
    ///
    /// # Errors
    /// The data directory is in use or unreadable, or the socket cannot be bound.
    pub fn start(config: &Config) -> Result<Server, StartError> {
        let store = Store::open(&config.data_dir, config.fsync).map_err(StartError::Data)?;
        let socket_err = |action, source| {
            StartError::Socket(SocketError::Io {
                action,
                path: config.socket.clone(),
                source,
            })
        };
        let (listener, path, inherited) = match socket::inherited() {
            Ok(Some(listener)) => {
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(PathBuf::from))
                    .unwrap_or_else(|| config.socket.clone());
                (listener, path, true)
            }
            Ok(None) => {
                let listener = socket::bind(
                    &config.socket,
                    config.socket_mode,
                    config.socket_group.as_deref(),
                )
                .map_err(StartError::Socket)?;
                (listener, config.socket.clone(), false)
            }
            Err(e) => return Err(socket_err("use the socket passed by systemd for", e)),
        };
        log::info!(
            "nkv {} listening on {}{} with data in {} ({} keys, rev {})",
            env!("CARGO_PKG_VERSION"),
            path.display(),
            if inherited { " (from systemd)" } else { "" },
            config.data_dir.display(),
            store.len(),
            store.rev()
        );
        let socket_file = (!inherited)
            .then(|| std::fs::symlink_metadata(&path).ok())
            .flatten()
            .map(|m| (m.dev(), m.ino()));
        let (wake, waker) =
            std::io::pipe().map_err(|e| socket_err("create the stop pipe for", e))?;
        let (handoff, idle) = crossbeam_channel::bounded(0);
        Ok(Server {
            wake,
            waker: Arc::new(waker),
            handoff,
            idle,
            shared: Arc::new(Shared {
                store,
                limits: config.limits.clone(),
                connections: Mutex::new(Connections::default()),
                closed: Condvar::new(),
                stopping: AtomicBool::new(false),
            }),
            listener,
            path,
            inherited,
            socket_file,
            next_id: AtomicU64::new(1),
        })
    }

    /// Whether the listening socket came from systemd (socket activation).
    pub fn inherited(&self) -> bool {
        self.inherited
    }

    /// The socket path clients connect to.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            shared: self.shared.clone(),
            waker: self.waker.clone(),
        }
    }

    /// Accepts connections until stopped, then shuts down in order: subscribers get a
    /// `shutdown` event, connections finish their in-flight request, the socket file goes.
    pub fn run(self) {
        while !self.shared.stopping.load(Ordering::SeqCst) {
            match self.wait_for_connection() {
                Ok(true) => match self.listener.accept() {
                    Ok((stream, _)) => self.accept(stream),
                    Err(e) => {
                        log::error!("accept failed: {e}");
                        // Out of descriptors or memory: give closing connections a moment.
                        thread::sleep(Duration::from_millis(10));
                    }
                },
                Ok(false) => {}
                Err(e) => {
                    log::error!("waiting for connections failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
            }
        }
        self.shutdown();
    }

    /// Blocks until a connection is waiting (true) or the stop pipe is written (false).
    fn wait_for_connection(&self) -> Result<bool, Errno> {
        let mut fds = [
            PollFd::new(self.listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => return Ok(false),
            Err(e) => return Err(e),
        }
        let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
        // The stop pipe first: once stopping, a waiting connection is not taken on.
        Ok(!ready(&fds[1]) && ready(&fds[0]))
    }

    fn accept(&self, mut stream: UnixStream) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (pid, uid) = match getsockopt(&stream, PeerCredentials) {
            Ok(cred) => (cred.pid(), cred.uid()),
            Err(_) => (0, u32::MAX),
        };
        let handle = match stream.try_clone() {
            Ok(handle) => handle,
            Err(e) => {
                log::error!("conn {id}: cannot clone socket: {e}");
                return;
            }
        };
        {
            let mut connections = self.shared.connections.lock();
            if connections.streams.len() >= self.shared.limits.max_connections {
                drop(connections);
                log::warn!("conn {id} (pid {pid}, uid {uid}) refused: too many connections");
                let mut line = Vec::new();
                Response::error(
                    ErrorCode::TooManyConnections,
                    format!(
                        "the server has {} connections (--max-connections); try again later",
                        self.shared.limits.max_connections
                    ),
                )
                .write(None, &mut line);
                let _ = stream.write_all(&line);
                return;
            }
            connections.streams.insert(id, handle);
        }
        log::debug!("conn {id} opened (pid {pid}, uid {uid})");
        let accepted = Accepted {
            id,
            name: format!("pid:{pid}"),
            stream,
        };
        // A thread that has just finished a connection takes it; otherwise start one.
        let accepted = match self.handoff.try_send(accepted) {
            Ok(()) => return,
            Err(TrySendError::Full(a) | TrySendError::Disconnected(a)) => a,
        };
        let shared = self.shared.clone();
        let idle = self.idle.clone();
        let spawned = thread::Builder::new()
            .name("nkv-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || connection_thread(&shared, accepted, &idle));
        if let Err(e) = spawned {
            log::error!("conn {id}: cannot start a thread: {e}");
            self.shared.connections.lock().streams.remove(&id);
        }
    }

    fn shutdown(self) {
        log::info!("shutting down");
        sd::notify("STOPPING=1");
        self.shared.store.notifier().shutdown();
        // Readers see end-of-file once they have answered what they already received.
        for stream in self.shared.connections.lock().streams.values() {
            let _ = stream.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + DRAIN_GRACE;
        let mut connections = self.shared.connections.lock();
        while !connections.is_idle() {
            if self
                .shared
                .closed
                .wait_until(&mut connections, deadline)
                .timed_out()
            {
                log::warn!(
                    "closing {} connections that did not finish in time",
                    connections.streams.len()
                );
                for stream in connections.streams.values() {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                break;
            }
        }
        drop(connections);
        let still_ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.socket_file);
        if !self.inherited && still_ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
        log::info!("stopped");
    }
}

/// Serves connections one after another: the first, then whichever the accept loop hands over
/// within [`LINGER`] of the last one finishing.
fn connection_thread(shared: &Arc<Shared>, first: Accepted, idle: &Receiver<Accepted>) {
    let mut next = Some(first);
    while let Some(Accepted { id, name, stream }) = next {
        serve(shared, id, name, stream);
        next = idle.recv_timeout(LINGER).ok();
    }
}

/// A connection's body. A panic is contained here: logged, the connection closed, the
/// server and the shared state (parking_lot locks do not poison) unaffected.
fn serve(shared: &Arc<Shared>, id: u64, name: String, stream: UnixStream) {
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        Connection::new(shared, id, name, stream).serve();
    }));
    if let Err(panic) = result {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        log::error!("conn {id}: connection thread panicked: {what}; connection closed");
    }
    {
        let mut connections = shared.connections.lock();
        connections.streams.remove(&id);
        connections.names.remove(&id);
    }
    shared.closed.notify_all();
}
