//! Power loss, simulated: every file-system effect of a workload is recorded (writes, fsyncs,
//! renames, unlinks, directory fsyncs), then for every prefix of that record the directory a
//! power loss would leave is rebuilt — only what was fsynced survives: a file's content once
//! the file was fsynced, a name once its directory was — and loaded. With `--fsync` every
//! acknowledged change survives, untorn, and revisions do not go backwards. Without it the
//! same simulation finds acknowledged changes lost, which shows it can tell.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::fault::{plan_for, Rec};
use super::{Disk, Options};
use crate::key::{Key, Target};
use crate::mailbox::Kicks;
use crate::store::{Store, Value};

/// One key's state: its value and revision, or absent.
type KeyState = Option<(String, u64)>;

/// What one acknowledged change did (a pattern delete changes several keys).
type Effect = Vec<(String, KeyState)>;

/// Runs the workload on a store in `dir`; returns each acknowledged change's effect, in order.
fn workload(dir: &Path, fsync: bool) -> Vec<Effect> {
    let store = Store::open(dir, &Options::new(fsync)).unwrap();
    let plan = plan_for(dir);
    plan.record();
    let mut effects = Vec::new();
    let mut kicks = Kicks::default();
    for i in 0..36u64 {
        let name = format!("{}.k{}", if i % 3 == 0 { "p" } else { "q" }, i % 5);
        let key = Key::parse(&name).unwrap();
        let effect = match i % 9 {
            4 => match store.delete(&key, &mut kicks).unwrap() {
                Some(_) => vec![(name, None)],
                None => continue,
            },
            8 => {
                let target = Target::parse("p.*").unwrap();
                let Target::Pattern(pattern) = &target else {
                    unreachable!("p.* is a pattern")
                };
                let before = store.keys(Some(&target));
                store.delete_matching(pattern, &mut kicks).unwrap();
                before.iter().map(|k| (k.to_string(), None)).collect()
            }
            _ => {
                let value = format!(
                    "{{\"i\":{i},\"pad\":\"{}\"}}",
                    "x".repeat((i as usize * 37) % 300)
                );
                let rev = store
                    .put(key, Value::from(value.as_str()), &mut kicks)
                    .unwrap();
                vec![(name, Some((value, rev)))]
            }
        };
        plan.ack();
        effects.push(effect);
    }
    effects
}

/// The directory as a power loss after `records` would leave it, written into `out`.
fn crash_state(initial: &Path, records: &[(Rec, usize)], out: &Path) {
    struct Inode {
        current: Vec<u8>,
        durable: Vec<u8>,
    }
    let mut inodes = Vec::new();
    let mut names = BTreeMap::new();
    for entry in fs::read_dir(initial).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            let content = fs::read(entry.path()).unwrap();
            names.insert(entry.file_name().into_string().unwrap(), inodes.len());
            inodes.push(Inode {
                current: content.clone(),
                durable: content,
            });
        }
    }
    let mut durable_names = names.clone();
    for (rec, _) in records {
        match rec {
            Rec::Create(name) => {
                names.insert(name.clone(), inodes.len());
                inodes.push(Inode {
                    current: Vec::new(),
                    durable: Vec::new(),
                });
            }
            Rec::Write(name, bytes) => inodes[names[name]].current = bytes.clone(),
            Rec::SyncFile(name) => {
                let ino = names[name];
                inodes[ino].durable = inodes[ino].current.clone();
            }
            Rec::Rename(from, to) => {
                let ino = names.remove(from).unwrap();
                names.insert(to.clone(), ino);
            }
            Rec::Exchange(a, b) => {
                let (ia, ib) = (names[a], names[b]);
                names.insert(a.clone(), ib);
                names.insert(b.clone(), ia);
            }
            Rec::Unlink(name) => {
                names.remove(name);
            }
            Rec::SyncDir => durable_names = names.clone(),
        }
    }
    fs::create_dir(out).unwrap();
    for (name, ino) in durable_names {
        fs::write(out.join(name), &inodes[ino].durable).unwrap();
    }
}

/// Replays every crash point; returns how many lost or tore an acknowledged change.
fn crash_points_losing_acknowledged_changes(fsync: bool) -> (usize, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    // The state before the workload: a fresh data directory as `Disk::open` leaves it.
    drop(Store::open(&live, &Options::new(true)).unwrap());
    let initial = tmp.path().join("initial");
    fs::create_dir(&initial).unwrap();
    for entry in fs::read_dir(&live).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), initial.join(entry.file_name())).unwrap();
    }
    let effects = workload(&live, fsync);
    let records = plan_for(&live).recorded();
    assert!(
        records.len() > effects.len() * 3,
        "{} records",
        records.len()
    );
    let mut losing = 0;
    for k in 0..=records.len() {
        // Changes acknowledged before the (k+1)th effect: a power loss may strike after them.
        let required = records.get(k).map_or(effects.len(), |(_, acks)| *acks);
        let mut model: BTreeMap<String, KeyState> = BTreeMap::new();
        for effect in &effects[..required] {
            model.extend(effect.iter().cloned());
        }
        let in_flight: BTreeMap<String, KeyState> = effects
            .get(required)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let out = tmp.path().join(format!("crash-{k}"));
        crash_state(&initial, &records[..k], &out);
        let (disk, contents) = Disk::open(&out, &Options::new(false)).unwrap();
        drop(disk);
        let loaded: BTreeMap<String, (String, u64)> = contents
            .entries
            .iter()
            .map(|l| (l.key.to_string(), (l.value.to_string(), l.rev)))
            .collect();
        let acked_max = model
            .values()
            .flatten()
            .map(|(_, rev)| *rev)
            .max()
            .unwrap_or(0);
        let mut ok = contents.quarantined == 0 && contents.max_rev >= acked_max;
        for key in model.keys().chain(in_flight.keys()).chain(loaded.keys()) {
            let found = loaded.get(key).cloned();
            let expected = model.get(key).cloned().flatten();
            let alternative = in_flight.get(key).cloned().flatten();
            let fine = found == expected || (in_flight.contains_key(key) && found == alternative);
            ok &= fine;
        }
        if !ok {
            losing += 1;
        }
        fs::remove_dir_all(&out).unwrap();
    }
    (losing, records.len() + 1)
}

#[test]
fn with_fsync_every_acknowledged_change_survives_power_loss_untorn() {
    let (losing, points) = crash_points_losing_acknowledged_changes(true);
    assert_eq!(
        losing, 0,
        "{losing} of {points} crash points lost or tore an acknowledged change"
    );
}

#[test]
fn without_fsync_the_simulation_finds_losses() {
    let (losing, points) = crash_points_losing_acknowledged_changes(false);
    assert!(
        losing > 0,
        "none of {points} crash points lost anything: the simulation cannot tell"
    );
}
