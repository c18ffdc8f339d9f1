//! Integration tests: every test starts the real `nkv-server` on its own socket and data
//! directory and talks to it as users do — the Rust client, the CLI, raw socket lines, socat.

mod support;

mod access;
mod cas;
mod chaos;
mod classes;
mod cli;
mod cli_resume;
mod client_resume;
mod client_retry;
mod core;
mod exact;
mod follow;
mod framed;
mod hostile;
mod lifecycle;
mod limits;
mod operator;
mod ops;
mod panic;
mod promise;
mod promise_peers;
mod props;
mod resume;
mod session;
mod sessions;
mod soak;
mod spin;
mod storage;
mod subscribe;
mod terminal;
mod watchcheck;
