//! One home per key: what the start does with the keys found in the data directory and the
//! volatile directory when the class rules no longer agree with where a key's file is.
//!
//! - A key found in both directories keeps the record of the higher revision (on a tie, the
//!   one in the key's current home, else the persistent one); the other file is removed.
//! - A key whose file is not where its class now says is moved there: written to its new
//!   home under the same revision, then removed from the old one (a `memory` key is only
//!   removed: it is kept in the map). Should the move fail, the key stays where it was found
//!   and the next change of it moves it (as every change of a key whose class changed does).
//!
//! Keys are never renumbered here: a resume must still be told that a key appeared (see
//! `Store::open_with`, which compares what was found with the history saved at the stop).

use std::collections::BTreeMap;

use super::{Disk, Loaded};
use crate::class::{Class, ClassRules};
use crate::key::Key;
use crate::value::Value;

/// A key as the store keeps it after the start: its record and the class whose place holds it.
pub struct Placed {
    pub key: Key,
    pub value: Value,
    pub rev: u64,
    pub class: Class,
}

/// The disk of `class`, if it has one and it is open.
fn disk_of<'a>(class: Class, data: &'a Disk, volatile: Option<&'a Disk>) -> Option<&'a Disk> {
    match class {
        Class::Persistent => Some(data),
        Class::Volatile => volatile,
        Class::Memory => None,
    }
}

/// Merges the two directories' keys into one place each; returns every key and whether all
/// of them now live where `rules` say (or in memory). `volatile` holds what the volatile
/// directory held, when it was read.
pub fn place(
    data: &Disk,
    persistent: Vec<Loaded>,
    volatile: Option<(&Disk, Vec<Loaded>)>,
    rules: &ClassRules,
) -> (Vec<Placed>, bool) {
    let mut found: BTreeMap<Key, (Loaded, Class)> = BTreeMap::new();
    for l in persistent {
        found.insert(l.key.clone(), (l, Class::Persistent));
    }
    let vdisk = volatile.as_ref().map(|(d, _)| *d);
    for l in volatile.map(|(_, entries)| entries).unwrap_or_default() {
        let Some((other, _)) = found.get(&l.key) else {
            found.insert(l.key.clone(), (l, Class::Volatile));
            continue;
        };
        let home = rules.class_of(&l.key);
        let volatile_wins = l.rev > other.rev || (l.rev == other.rev && home == Class::Volatile);
        let (loser_rev, loser_class) = if volatile_wins {
            (other.rev, Class::Persistent)
        } else {
            (l.rev, Class::Volatile)
        };
        log::warn!(
            "{} is in both the data and the volatile directory: keeping rev {}, removing the {loser_class} file of rev {loser_rev}",
            l.key,
            l.rev.max(other.rev),
        );
        if let Some(disk) = disk_of(loser_class, data, vdisk) {
            if let Err(e) = disk.remove(&l.key, loser_rev) {
                log::warn!("cannot remove the {loser_class} file of {}: {e}", l.key);
            }
        }
        if volatile_wins {
            found.insert(l.key.clone(), (l, Class::Volatile));
        }
    }
    let mut settled = true;
    let placed = found
        .into_values()
        .map(|(l, at)| {
            let home = rules.class_of(&l.key);
            let class = if home == at {
                at
            } else {
                match move_home(&l, at, home, data, vdisk) {
                    Ok(()) => {
                        log::info!("{} moved from class {at} to {home} (its rule)", l.key);
                        home
                    }
                    Err(e) => {
                        log::warn!(
                            "{} stays in class {at} though its rule says {home}: {e}",
                            l.key
                        );
                        settled = false;
                        at
                    }
                }
            };
            Placed {
                key: l.key,
                value: l.value,
                rev: l.rev,
                class,
            }
        })
        .collect();
    (placed, settled)
}

/// Writes `l` to `to`'s place (none for `memory`), then removes it from `from`'s.
fn move_home(
    l: &Loaded,
    from: Class,
    to: Class,
    data: &Disk,
    volatile: Option<&Disk>,
) -> Result<(), String> {
    if to != Class::Memory {
        let disk = disk_of(to, data, volatile).ok_or("its directory is not open")?;
        disk.write(&l.key, l.rev, &l.value)
            .map_err(|e| e.to_string())?;
    }
    if let Some(disk) = disk_of(from, data, volatile) {
        disk.remove(&l.key, l.rev).map_err(|e| e.to_string())?;
    }
    Ok(())
}
