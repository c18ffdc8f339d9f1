//! [`Value`]: a stored value, kept as the JSON text it arrived as.
//!
//! A leaf module: the store, the disk, the wire format and the mailbox all hold values, and
//! none of them should import another just to name the type.

use std::sync::Arc;

/// A value: its JSON text exactly as received, shared by the map, responses and events.
pub type Value = Arc<str>;
