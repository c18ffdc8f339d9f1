//! The mailbox's lock: `parking_lot` normally, `loom`'s under `cfg(loom)` so the model check
//! explores every interleaving of the real turn-taking code (see `loom_tests.rs`).

#[cfg(not(loom))]
pub use parking_lot::{Mutex, MutexGuard};

#[cfg(loom)]
pub use model::{Mutex, MutexGuard};

#[cfg(loom)]
mod model {
    use std::ops::{Deref, DerefMut};

    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(value: T) -> Mutex<T> {
            Mutex(loom::sync::Mutex::new(value))
        }

        pub fn lock(&self) -> MutexGuard<'_, T> {
            MutexGuard {
                lock: &self.0,
                // A panicking model run is a failed model run; poisoning does not matter.
                guard: Some(self.0.lock().unwrap_or_else(|e| e.into_inner())),
            }
        }
    }

    /// A guard that can be let go and taken again, like `parking_lot`'s.
    pub struct MutexGuard<'a, T> {
        lock: &'a loom::sync::Mutex<T>,
        guard: Option<loom::sync::MutexGuard<'a, T>>,
    }

    impl<T> MutexGuard<'_, T> {
        pub fn unlocked<U>(this: &mut Self, f: impl FnOnce() -> U) -> U {
            this.guard = None;
            let result = f();
            this.guard = Some(this.lock.lock().unwrap_or_else(|e| e.into_inner()));
            result
        }
    }

    impl<T> Deref for MutexGuard<'_, T> {
        type Target = T;
        fn deref(&self) -> &T {
            // Only `unlocked` takes the guard out, and puts it back before returning.
            self.guard
                .as_deref()
                .expect("guard held outside `unlocked`")
        }
    }

    impl<T> DerefMut for MutexGuard<'_, T> {
        fn deref_mut(&mut self) -> &mut T {
            self.guard
                .as_deref_mut()
                .expect("guard held outside `unlocked`")
        }
    }
}
