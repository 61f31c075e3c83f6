//! Whether this rank's main thread is waiting inside a collective now, for the
//! watchdog's heartbeats (src/parallel/heartbeat.rs): a rank that stopped while not waiting
//! stopped on its own (computing, a wedged device), not because of a peer. One atomic
//! add per collective, so the mark costs nothing next to the collective itself.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Collectives the main thread is inside now (nested calls count twice).
static IN_COLLECTIVE: AtomicUsize = AtomicUsize::new(0);

/// Held while the main thread waits in a collective (World's collectives take one).
pub(crate) struct InCollective(());

impl InCollective {
    pub fn enter() -> InCollective {
        IN_COLLECTIVE.fetch_add(1, Ordering::Relaxed);
        InCollective(())
    }
}

impl Drop for InCollective {
    fn drop(&mut self) {
        IN_COLLECTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) fn in_collective() -> bool {
    IN_COLLECTIVE.load(Ordering::Relaxed) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collective_mark_nests() {
        let outer = InCollective::enter();
        let inner = InCollective::enter();
        drop(inner);
        assert!(in_collective());
        drop(outer);
    }
}
