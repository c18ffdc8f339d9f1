//! Integration tests: every test starts the real `nkv-server` on its own socket and data
//! directory and talks to it as users do — the Rust client, the CLI, raw socket lines, socat.

mod support;

mod access;
mod cas;
mod chaos;
mod classes;
mod cli;
mod core;
mod framed;
mod hostile;
mod lifecycle;
mod limits;
mod ops;
mod panic;
mod promise;
mod props;
mod resume;
mod sessions;
mod soak;
mod storage;
mod subscribe;
mod watchcheck;
