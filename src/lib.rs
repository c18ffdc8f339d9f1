//! nkv — a notify key-value store for the services of one host.
//!
//! Services get, put and delete JSON values by hierarchical key (`service.topicA.key1`) over a
//! Unix socket, and subscribe to a key or a keyspace to be told of every change. Each key is
//! persisted as one file; every subscriber converges to the latest state of every key it covers.
//!
//! # Layout
//!
//! Data flows one way: accept → connection thread → parse → dispatch → store (disk, map) →
//! notify → mailbox → the subscriber's own connection. Only the response line flows back.
//!
//! - [`key`]: the `Key` newtype and patterns; the only place a key is validated.
//! - [`wire`]: the shape of every request, response and event line, shared by server and client.
//! - [`protocol`]: the server's side of the wire: `Request` parsing, `Response` and `Event` lines.
//! - [`value`]: `Value`, a stored value as JSON text (a leaf, so no layer imports another for it).
//! - [`store`]: the shared map behind the `RwLock`; put/get/delete (with compare-and-set and
//!   session keys); calls disk and notify.
//! - [`class`]: storage classes (`persistent`, `volatile`, `memory`) by key prefix.
//! - [`revseq`]: the revision counter and the turnstile applying changes in revision order.
//! - [`history`]: tombstones, so a subscription can resume from a revision.
//! - [`disk`]: one file per key: load at start (trusting nothing), atomic write, remove; the
//!   data directory belongs to the server alone.
//! - [`json`]: JSON values validated without building a tree, and compacted.
//! - [`notify`]: who subscribes to what; publishing a change to the matching mailboxes.
//! - [`mailbox`]: one subscriber's bounded queue that keeps the latest state of every key, and
//!   its sending (one lock for every decision).
//! - [`server`]: listener, accept (leader/followers), one connection's loop and dispatch, shutdown; the
//!   framed front end for the clients of the nkv this project replaces (`server::framed`).
//! - [`client`]: the blocking client: [`Client`], [`Subscription`], [`Timeouts`].
//! - [`error`]: error types.
//!
//! # Invariants
//!
//! - Nothing after [`protocol::parse_request`] sees a raw key: keys are [`key::Key`], so a key
//!   file is always a plain name inside the data directory.
//! - A change is acknowledged only after its file is renamed into place; if only its fsync
//!   failed it is applied and announced and answered `not_durable`, so memory, disk and
//!   subscribers never diverge.
//! - One key's changes are applied, stored and published in revision order (its stripe lock),
//!   and all changes reach the map and the mailboxes in revision order ([`revseq`]), so a
//!   `ready`'s revision is a point a subscription can resume from; the map lock is never held
//!   across disk or socket I/O.
//! - Revisions never go back, across storage classes and restarts: `memory`/`volatile` changes
//!   raise the data directory's revision floor ahead of themselves.
//! - A resume is answered from the delete history only when it reaches back; otherwise `reset`
//!   and the full snapshot: never a stale key.
//! - Publishing never blocks on a subscriber; a subscriber's memory is bounded by its queue plus
//!   one pending event per key.

pub mod class;
pub mod client;
pub mod disk;
pub mod error;
pub mod history;
pub mod json;
pub mod key;
pub mod mailbox;
pub mod notify;
pub mod protocol;
pub mod revseq;
pub mod server;
pub mod store;
pub mod value;
pub mod wire;

pub use client::{Cas, Client, Entry, Event, RawEntry, RawEvent, Subscription, Timeouts, Watch};
pub use error::{Error, ErrorCode};

// The README's Rust example is compiled as a doctest, so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
