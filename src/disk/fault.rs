//! Fault injection for the disk layer, compiled only into the crate's own tests.
//!
//! Every file-system operation of the disk layer calls [`Faults::hit`] first with the
//! [`Op`] it is about to do. In tests a plan registered for a data directory makes chosen
//! operations fail with a chosen `errno`; in every other build `hit` is an empty inline
//! function and the plan does not exist.

/// One kind of file-system operation of the disk layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Creating a temporary file (`openat` with `O_CREAT | O_EXCL`).
    CreateTemp,
    /// Writing a record into a temporary file (or into the reserve).
    WriteTemp,
    /// Filling in a written record's revision field, once the revision is taken.
    FillRev,
    /// Fsync of a temporary file before its rename.
    SyncFile,
    /// Renaming a temporary file over a key's file.
    Rename,
    /// Fsync of the data directory after a rename or unlink.
    SyncDir,
    /// Removing a key's file.
    Unlink,
    /// Rewriting the revision floor in place.
    WriteRev,
    /// Fsync of the revision floor.
    SyncRev,
    /// Growing or re-creating the reserve.
    Reserve,
    /// Appending a record to the delete log.
    AppendLog,
    /// Fsync of the delete log.
    SyncLog,
    /// Looking the data directory's path up, to tell whether it is still the directory held.
    CheckDir,
}

impl Op {
    pub const ALL: [Op; 13] = [
        Op::CreateTemp,
        Op::WriteTemp,
        Op::FillRev,
        Op::SyncFile,
        Op::Rename,
        Op::SyncDir,
        Op::Unlink,
        Op::WriteRev,
        Op::SyncRev,
        Op::Reserve,
        Op::AppendLog,
        Op::SyncLog,
        Op::CheckDir,
    ];
}

/// One file-system effect, as the power-loss simulation replays it (tests only record them).
#[derive(Clone, Debug)]
pub enum Rec {
    Create(String),
    /// The whole content of the named file is now these bytes.
    Write(String, Vec<u8>),
    SyncFile(String),
    Rename(String, String),
    /// The two names swapped their files.
    Exchange(String, String),
    Unlink(String),
    SyncDir,
}

#[cfg(test)]
pub use imp::{plan_for, Fault, Faults, Plan};

#[cfg(test)]
mod imp {
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::{Op, Rec};

    /// Fail `op` with `errno` for the next `times` calls.
    #[derive(Clone, Copy, Debug)]
    pub struct Fault {
        pub op: Op,
        pub errno: i32,
        pub times: usize,
    }

    /// The faults planned for one data directory; shared by the test and the server's disk.
    #[derive(Default)]
    pub struct Plan {
        fault: Mutex<Option<Fault>>,
        /// How many injected failures happened.
        injected: Mutex<usize>,
        /// File-system effects, when recording (see [`Plan::record`]), each with the number of
        /// acknowledgements the test had noted when it happened.
        recorded: Mutex<Option<Vec<(Rec, usize)>>>,
        acks: Mutex<usize>,
        /// Run once, instead of failing, when the disk is about to do this operation: lets a
        /// test change the world at an exact point of a write (e.g. replace the directory).
        hook: Mutex<Option<Hook>>,
    }

    type Hook = (Op, Box<dyn FnOnce() + Send>);

    impl Plan {
        /// Starts recording every file-system effect of the disk layer.
        pub fn record(&self) {
            *self.recorded.lock() = Some(Vec::new());
        }

        /// The recorded effects.
        pub fn recorded(&self) -> Vec<(Rec, usize)> {
            self.recorded.lock().clone().unwrap_or_default()
        }

        /// The test notes that one more change was acknowledged.
        pub fn ack(&self) {
            *self.acks.lock() += 1;
        }

        pub fn set(&self, fault: Option<Fault>) {
            *self.fault.lock() = fault;
        }

        /// Runs `hook` the next time the disk is about to do `op`.
        pub fn on(&self, op: Op, hook: impl FnOnce() + Send + 'static) {
            *self.hook.lock() = Some((op, Box::new(hook)));
        }

        pub fn injected(&self) -> usize {
            *self.injected.lock()
        }
    }

    static PLANS: Mutex<Vec<(PathBuf, Arc<Plan>)>> = Mutex::new(Vec::new());

    /// The plan for the data directory `dir`, created on first use.
    pub fn plan_for(dir: &Path) -> Arc<Plan> {
        let mut plans = PLANS.lock();
        if let Some((_, plan)) = plans.iter().find(|(p, _)| p == dir) {
            return plan.clone();
        }
        let plan = Arc::new(Plan::default());
        plans.push((dir.to_owned(), plan.clone()));
        plan
    }

    /// The disk's view of its plan.
    pub struct Faults(Arc<Plan>);

    impl Faults {
        pub fn for_dir(dir: &Path) -> Faults {
            Faults(plan_for(dir))
        }

        pub fn note(&self, rec: impl FnOnce() -> Rec) {
            if let Some(log) = self.0.recorded.lock().as_mut() {
                log.push((rec(), *self.0.acks.lock()));
            }
        }

        pub fn hit(&self, op: Op) -> std::io::Result<()> {
            let hook = {
                let mut hook = self.0.hook.lock();
                match hook.take() {
                    Some((at, run)) if at == op => Some(run),
                    other => {
                        *hook = other;
                        None
                    }
                }
            };
            if let Some(run) = hook {
                run();
            }
            let mut fault = self.0.fault.lock();
            match fault.as_mut() {
                Some(f) if f.op == op && f.times > 0 => {
                    f.times -= 1;
                    *self.0.injected.lock() += 1;
                    Err(std::io::Error::from_raw_os_error(f.errno))
                }
                _ => Ok(()),
            }
        }
    }
}

/// Outside tests: no plan, nothing injected.
#[cfg(not(test))]
pub struct Faults;

#[cfg(not(test))]
impl Faults {
    pub fn for_dir(_: &std::path::Path) -> Faults {
        Faults
    }

    #[inline(always)]
    pub fn hit(&self, _: Op) -> std::io::Result<()> {
        Ok(())
    }

    #[inline(always)]
    pub fn note(&self, _: impl FnOnce() -> Rec) {}
}
