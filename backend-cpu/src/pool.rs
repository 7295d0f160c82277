//! A recycling pool for f32 buffers, so the steady-state forward and training
//! step reuse the buffers of the previous step instead of asking the allocator
//! (and the kernel, through page faults and zeroing) for fresh memory.
//!
//! Shapes repeat exactly from one sampling or training step to the next, so
//! buffers are matched by exact length. The pool holds at most
//! `MAX_POOL_BYTES` (1 GiB); beyond that, dropped buffers go back to the allocator.
//! A buffer from `take` holds arbitrary (initialised) values: use it only
//! where every element is written; `take_zeroed` for accumulators.

use std::collections::HashMap;
use std::sync::Mutex;

/// Buffers shorter than this are left to the allocator (cheap to allocate).
const MIN_POOLED: usize = 4096;
/// Upper bound on the bytes the pool keeps.
const MAX_POOL_BYTES: usize = 1 << 30;

struct Pool {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    // A poisoned lock only means a panic elsewhere while holding it; the pool
    // stays consistent (every mutation is a single push or pop).
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Pool {
        by_len: HashMap::new(),
        bytes: 0,
    }))
}

/// A buffer of length `n` with arbitrary contents (recycled when possible).
pub(crate) fn take(n: usize) -> Vec<f32> {
    if n >= MIN_POOLED {
        let hit = with_pool(|p| {
            let v = p.by_len.get_mut(&n).and_then(|l| l.pop());
            if v.is_some() {
                p.bytes -= n * 4;
            }
            v
        });
        if let Some(v) = hit {
            return v;
        }
    }
    vec![0.0; n]
}

/// A zero-filled buffer of length `n` (recycled when possible).
pub(crate) fn take_zeroed(n: usize) -> Vec<f32> {
    let mut v = take(n);
    v.fill(0.0);
    v
}

/// Returns a buffer to the pool (or frees it when the pool is full).
pub(crate) fn give(mut v: Vec<f32>) {
    let n = v.len();
    if n < MIN_POOLED || v.capacity() != n {
        return;
    }
    with_pool(|p| {
        if p.bytes + n * 4 <= MAX_POOL_BYTES {
            p.bytes += n * 4;
            p.by_len.entry(n).or_default().push(std::mem::take(&mut v));
        }
    });
}

/// Frees every pooled buffer (e.g. after a phase with different shapes).
pub fn clear() {
    with_pool(|p| {
        p.by_len.clear();
        p.bytes = 0;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycles_exact_lengths_and_zeroes_on_request() {
        let n = MIN_POOLED + 3;
        let mut v = take(n);
        v.fill(7.0);
        let p = v.as_ptr();
        give(v);
        let w = take_zeroed(n);
        // Another test thread may have taken it; only check contents then.
        assert!(w.iter().all(|&x| x == 0.0));
        if w.as_ptr() == p {
            assert_eq!(w.len(), n);
        }
        give(w);
        let u = take(n + 1);
        assert_eq!(u.len(), n + 1);
    }
}
