//! Palisade's admission webhook. Every check reads the pod through [`workload`] (Pods and the
//! pod templates of every workload kind) and its containers through [`pods`] (init, regular and
//! ephemeral), so no kind of object or container escapes a check.

pub mod cluster;
pub mod config;
pub mod decide;
pub mod identity;
pub mod images;
pub mod pods;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod workload;

/// The guarded value even if another thread panicked while holding the lock. Every map the
/// webhook guards stays consistent between statements, and refusing to read it (an empty
/// policy list, say) would fail open.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
