//! The server: accept loop, one thread per connection, and an orderly shutdown.
//!
//! - [`socket`]: binding (or inheriting) the listening socket;
//! - `accept`: connection threads taking turns at accepting (leader/followers);
//! - [`sd`]: readiness notifications to systemd;
//! - [`lines`]: reading request lines with limits;
//! - [`connection`]: one connection's loop and the dispatch `match`.

mod accept;
mod connection;
mod lines;
pub mod sd;
mod socket;

use std::collections::HashMap;
use std::io::{PipeWriter, Write};
use std::net::Shutdown;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub use socket::SocketError;

use crate::disk::OpenError;
use crate::store::Store;
use accept::Acceptor;
use connection::Connection;

/// Stack size of connection threads: requests need little stack (JSON nesting is capped by
/// serde_json), and hundreds of threads should not reserve megabytes each.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

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
    /// The listener and the connection threads' turns at it (see [`accept`]).
    acceptor: Arc<Acceptor>,
    path: PathBuf,
    inherited: bool,
    /// Device and inode of the socket file we bound: at stop we remove the file only if it is
    /// still ours, not one another server put in its place.
    socket_file: Option<(u64, u64)>,
    /// The write end of the stop pipe, shared by every [`StopHandle`]; its read end is
    /// polled beside the listener.
    waker: Arc<PipeWriter>,
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
        let shared = Arc::new(Shared {
            store,
            limits: config.limits.clone(),
            connections: Mutex::new(Connections::default()),
            closed: Condvar::new(),
            stopping: AtomicBool::new(false),
        });
        Ok(Server {
            acceptor: Arc::new(Acceptor::new(shared.clone(), listener, wake)),
            waker: Arc::new(waker),
            shared,
            path,
            inherited,
            socket_file,
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
        match self.acceptor.start() {
            Ok(()) => self.acceptor.wait_for_stop(),
            Err(e) => log::error!("cannot start a connection thread: {e}; stopping"),
        }
        self.shutdown();
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
