//! The server: accept loop, one thread per connection, and an orderly shutdown.
//!
//! - [`socket`]: binding (or inheriting) the listening socket;
//! - `accept`: connection threads taking turns at accepting (leader/followers);
//! - [`sd`]: readiness notifications to systemd;
//! - [`lines`]: reading request lines with limits;
//! - [`spin`]: waiting briefly, awake, for a sequential client's next request;
//! - [`connection`]: one connection's loop and the dispatch `match`;
//! - [`framed`]: the framed protocol of the system nkv replaces, on the same socket.

mod accept;
mod connection;
mod framed;
mod lines;
mod refuse;
pub mod sd;
mod socket;
mod spin;

use std::collections::{HashMap, HashSet};
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

use crate::class::ClassRules;
use crate::disk::owner::Policy;
use crate::disk::{OpenError, Options};
use crate::store::{Config as StoreConfig, Store};
use accept::Acceptor;
use connection::Connection;

/// Stack size of connection threads: requests need little stack (JSON nesting is capped by
/// serde_json), and hundreds of threads should not reserve megabytes each.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// How long shutdown waits for request connections to finish their in-flight requests before
/// closing them forcibly.
const DRAIN_GRACE: Duration = Duration::from_millis(300);
/// How long shutdown waits, at most, for subscribers to be sent what is pending and `shutdown`.
/// A subscriber that keeps reading is waited for (however far behind); one whose socket accepts
/// nothing for [`SHUTDOWN_STALL`] is dropped by its own thread. Well under systemd's default
/// `TimeoutStopSec` (90 s).
const SUBSCRIBER_DRAIN: Duration = Duration::from_secs(10);
/// While stopping, a subscriber whose socket accepts nothing for this long with data pending is
/// dropped (it stands for `--send-timeout`, when that is longer).
pub(crate) const SHUTDOWN_STALL: Duration = Duration::from_secs(1);
/// How long shutdown then waits for the threads of forcibly closed connections to end.
const FORCED_GRACE: Duration = Duration::from_millis(100);

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
    /// Use existing socket and data directories whoever owns them and whatever their mode
    /// (`--allow-unsafe-dirs`).
    pub allow_unsafe_dirs: bool,
    pub limits: Limits,
    /// Storage classes by key prefix (`--class`), on top of the default `runtime=memory`.
    pub classes: ClassRules,
    /// The `volatile` class's directory (`--volatile-dir`); opened only when a rule uses it.
    pub volatile_dir: PathBuf,
    /// Most tombstones kept for resumes (`--tombstones`).
    pub tombstones: usize,
}

/// `--spin`'s default: a sequential client on this machine comes back within ~20–40 µs.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Per-connection limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_value_bytes: usize,
    pub max_subscriptions: usize,
    /// How long a client may hold a partial line (or send nothing at first); `None` = forever.
    pub idle_timeout: Option<Duration>,
    /// How long a subscriber's socket may accept nothing while data is pending; `None` = forever.
    pub send_timeout: Option<Duration>,
    /// How long a connection thread polls for its client's next request before sleeping on it
    /// (see [`spin`]); zero = never.
    pub spin: Duration,
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
            send_timeout: Some(Duration::from_secs(300)),
            spin: DEFAULT_SPIN,
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
    /// Open connections. Locked briefly on accept, on close, when a connection subscribes,
    /// and at shutdown.
    connections: Mutex<Connections>,
    /// Signalled when a connection closes, for the shutdown drain.
    closed: Condvar,
    stopping: AtomicBool,
    /// Framed subscriptions by (client id, key), for framed `UNSUB` (see `framed::Registry`).
    framed: framed::Registry,
    /// The budget of threads polling for their client's next request.
    spin: Arc<spin::Spin>,
}

#[derive(Default)]
struct Connections {
    /// By connection id, with a handle to shut each down at stop. An entry lives as long as the
    /// connection's thread, which also does all of a subscriber's sending: every thread and
    /// descriptor held for a client is counted here, against `--max-connections`.
    streams: HashMap<u64, Arc<UnixStream>>,
    /// The connections that have subscribed (their mailbox is in the subscription table).
    /// Shutdown lets the others finish first, then tells these.
    subscribers: HashSet<u64>,
    /// The names connections gave with HELLO (for STATS), removed when they close.
    names: HashMap<u64, String>,
}

impl Connections {
    fn is_idle(&self) -> bool {
        self.streams.is_empty()
    }

    /// No request-mode connection is left (only subscribers, which wait for `shutdown`).
    fn only_subscribers(&self) -> bool {
        self.streams.keys().all(|id| self.subscribers.contains(id))
    }
}

impl Shared {
    fn connection_count(&self) -> usize {
        self.connections.lock().streams.len()
    }

    /// Connection `id` is now a subscriber (called once it is in the subscription table).
    fn mark_subscriber(&self, id: u64) {
        self.connections.lock().subscribers.insert(id);
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
        let group = config
            .socket_group
            .as_deref()
            .map(socket::resolve_group)
            .transpose()
            .map_err(StartError::Socket)?;
        let options = Options {
            fsync: config.fsync,
            max_value_bytes: config.limits.max_value_bytes,
            group,
            allow_unsafe_dirs: config.allow_unsafe_dirs,
        };
        let store = Store::open_with(&StoreConfig {
            data_dir: config.data_dir.clone(),
            volatile_dir: config.volatile_dir.clone(),
            classes: config.classes.clone(),
            tombstones: config.tombstones,
            options,
        })
        .map_err(StartError::Data)?;
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
                    Policy::new(group, config.allow_unsafe_dirs),
                )
                .map_err(StartError::Socket)?;
                (listener, config.socket.clone(), false)
            }
            Err(e) => return Err(socket_err("use the socket passed by systemd for", e)),
        };
        log::info!("storage classes: {}", store.classes().describe());
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
            framed: framed::Registry::default(),
            spin: Arc::new(spin::Spin::new(config.limits.spin)),
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

    /// Stops in order: no more accepts (already); request connections finish what they
    /// received (their changes' events are queued); then every subscriber is sent `shutdown`
    /// as its last line; then the socket file goes.
    fn shutdown(self) {
        log::info!("shutting down");
        sd::notify("STOPPING=1");
        // 1. Readers see end-of-file once they have answered what they already received.
        {
            let connections = self.shared.connections.lock();
            for (id, stream) in &connections.streams {
                if !connections.subscribers.contains(id) {
                    let _ = stream.shutdown(Shutdown::Read);
                }
            }
        }
        self.drain(
            "request connections",
            DRAIN_GRACE,
            Connections::only_subscribers,
            |c, id| !c.subscribers.contains(&id),
        );
        // 2. Every change has been published: `shutdown` is the last thing subscribers get.
        self.shared.store.notifier().shutdown();
        self.drain(
            "subscribers",
            SUBSCRIBER_DRAIN,
            Connections::is_idle,
            |_, _| true,
        );
        // 3. Nothing is in flight: the delete history can be kept for the next start.
        self.shared.store.save();
        let still_ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| Some((m.dev(), m.ino())) == self.socket_file);
        if !self.inherited && still_ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove {}: {e}", self.path.display());
            }
        }
        log::info!("stopped");
    }

    /// Waits up to `grace` for `done`, then closes the connections `which` selects and
    /// waits (up to [`FORCED_GRACE`]) for their threads to end, so nothing is sent after.
    fn drain(
        &self,
        what: &str,
        grace: Duration,
        done: fn(&Connections) -> bool,
        which: fn(&Connections, u64) -> bool,
    ) {
        let deadline = Instant::now() + grace;
        let mut connections = self.shared.connections.lock();
        while !done(&connections) {
            if self
                .shared
                .closed
                .wait_until(&mut connections, deadline)
                .timed_out()
            {
                let stuck: Vec<u64> = connections
                    .streams
                    .keys()
                    .copied()
                    .filter(|id| which(&connections, *id))
                    .collect();
                log::warn!("closing {} {what} that did not finish in time", stuck.len());
                for id in stuck {
                    if let Some(stream) = connections.streams.get(&id) {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
                let deadline = Instant::now() + FORCED_GRACE;
                while !done(&connections)
                    && !self
                        .shared
                        .closed
                        .wait_until(&mut connections, deadline)
                        .timed_out()
                {}
                break;
            }
        }
    }
}

/// A connection thread's body. A panic is contained here: logged, the connection closed, the
/// server and the shared state (parking_lot locks do not poison) unaffected.
fn serve(
    shared: &Arc<Shared>,
    id: u64,
    name: String,
    stream: Arc<UnixStream>,
    lead: Option<&accept::Leadership<'_>>,
) {
    let result = panic::catch_unwind(AssertUnwindSafe(|| {
        Connection::new(shared, id, name, stream, lead).serve();
    }));
    if let Err(panic) = result {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        log::error!("conn {id}: connection thread panicked: {what}; connection closed");
    }
    let mut connections = shared.connections.lock();
    connections.streams.remove(&id);
    connections.subscribers.remove(&id);
    connections.names.remove(&id);
    drop(connections);
    shared.closed.notify_all();
}
