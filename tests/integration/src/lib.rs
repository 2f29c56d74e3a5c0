//! Integration tests live in tests/; this crate holds only what several of them share.

use std::time::{Duration, Instant};

/// Polls `probe` every 100 ms until it returns `Some`, for at most `timeout`; `None` when it never did.
/// Replication and shutdown are asynchronous: tests wait for the state they expect, boundedly.
pub fn eventually<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
