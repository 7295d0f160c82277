//! A recycling pool for f32 and bf16 buffers, so the steady-state forward and training
//! step reuse the buffers of the previous step instead of asking the allocator
//! (and the kernel, through page faults and zeroing) for fresh memory.
//!
//! Buffers are kept by size class: capacities rounded up to one of eight
//! steps per octave (at most 12.5% slack). Exact lengths would not do: in
//! training the router keeps a slightly different number of tokens at every
//! step (6586, 6484, 6474, ... of 25088 in the MNIST config), so every
//! kept-token activation had a new length and missed, and the fresh memory
//! cost ~22k page faults (~90 MB first touched) a step. The pool holds at most
//! `MAX_POOL_BYTES` (2 GiB); a buffer returned to a full pool evicts the
//! buffers returned longest ago (whatever their size) until it fits, so the
//! pool follows the current working set: after a large model's sampling
//! filled it, a small model's training step found it full of buffers of the
//! wrong sizes and page-faulted ~50 fresh ones every step. A buffer from
//! `take` holds arbitrary (initialised) values: use it only where every
//! element is written; `take_zeroed` for accumulators.

use std::collections::HashMap;
use std::sync::Mutex;

use half::bf16;

/// Buffers shorter than this are left to the allocator (cheap to allocate).
const MIN_POOLED: usize = 4096;
/// Upper bound on the bytes the pool keeps.
const MAX_POOL_BYTES: usize = 2 << 30;
/// Size classes per octave, as a power of two.
const CLASS_BITS: u32 = 3;

/// Pooled buffers of one element type by size class, each with the stamp
/// of its return (lists grow by pushing, so each starts with its oldest).
type Lists<T> = HashMap<u32, Vec<(u64, Vec<T>)>>;

struct Pool {
    /// f32 buffers by size class; every buffer in class `c` has capacity
    /// `>= class_len(c)`.
    by_class: Lists<f32>,
    /// bf16 buffers (the storage of bf16 activations) likewise.
    bf16_by_class: Lists<bf16>,
    /// Bytes held by both.
    bytes: usize,
    /// Most bytes held.
    cap: usize,
    /// Returns so far (the next stamp).
    stamp: u64,
}

/// An element type the pool recycles buffers of.
trait Pooled: Copy + Default + 'static {
    /// This type's buffers in the pool.
    fn lists(p: &mut Pool) -> &mut Lists<Self>;
}

impl Pooled for f32 {
    fn lists(p: &mut Pool) -> &mut Lists<f32> {
        &mut p.by_class
    }
}

impl Pooled for bf16 {
    fn lists(p: &mut Pool) -> &mut Lists<bf16> {
        &mut p.bf16_by_class
    }
}

impl Pool {
    fn new(cap: usize) -> Pool {
        Pool {
            by_class: HashMap::new(),
            bf16_by_class: HashMap::new(),
            bytes: 0,
            cap,
            stamp: 0,
        }
    }

    /// A buffer of class `c`, if one is pooled (the most recently returned).
    fn get<T: Pooled>(&mut self, c: u32) -> Option<Vec<T>> {
        let (_, v) = T::lists(self).get_mut(&c)?.pop()?;
        self.bytes -= v.capacity() * size_of::<T>();
        Some(v)
    }

    /// Keeps `v` (capacity at least `MIN_POOLED`), evicting the buffers
    /// returned longest ago while it does not fit; a buffer larger than the
    /// whole cap is dropped.
    fn put<T: Pooled>(&mut self, v: Vec<T>) {
        let bytes = v.capacity() * size_of::<T>();
        if bytes > self.cap {
            return;
        }
        while self.bytes + bytes > self.cap && self.evict_oldest() {}
        self.bytes += bytes;
        self.stamp += 1;
        let stamp = self.stamp;
        T::lists(self)
            .entry(class_floor(v.capacity()))
            .or_default()
            .push((stamp, v));
    }

    /// Frees the buffer returned longest ago; false if the pool is empty.
    fn evict_oldest(&mut self) -> bool {
        fn oldest<T>(lists: &Lists<T>) -> Option<(u64, u32)> {
            lists
                .iter()
                .filter_map(|(&c, l)| l.first().map(|(s, _)| (*s, c)))
                .min()
        }
        let f = oldest(&self.by_class);
        let h = oldest(&self.bf16_by_class);
        let freed = match (f, h) {
            (Some(a), Some(b)) if b < a => Self::remove_first(&mut self.bf16_by_class, b.1),
            (Some(a), _) => Self::remove_first(&mut self.by_class, a.1),
            (None, Some(b)) => Self::remove_first(&mut self.bf16_by_class, b.1),
            (None, None) => return false,
        };
        self.bytes -= freed;
        true
    }

    /// Drops the oldest buffer of class `c`; returns its bytes.
    fn remove_first<T>(lists: &mut Lists<T>, c: u32) -> usize {
        let Some(l) = lists.get_mut(&c) else { return 0 };
        let (_, v) = l.remove(0);
        if l.is_empty() {
            lists.remove(&c);
        }
        v.capacity() * size_of::<T>()
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn with_pool<R>(f: impl FnOnce(&mut Pool) -> R) -> R {
    // A poisoned lock only means a panic elsewhere while holding it; the pool
    // stays consistent (every mutation completes before the lock is released).
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Pool::new(MAX_POOL_BYTES)))
}

/// The smallest size class whose length is `>= n` (`n >= 2^CLASS_BITS`).
fn class_ceil(n: usize) -> u32 {
    let c = class_floor(n);
    if class_len(c) >= n {
        c
    } else {
        c + 1
    }
}

/// The largest size class whose length is `<= n` (`n >= 2^CLASS_BITS`).
fn class_floor(n: usize) -> u32 {
    let e = usize::BITS - 1 - n.leading_zeros();
    let mant = (n >> (e - CLASS_BITS)) as u32 & ((1 << CLASS_BITS) - 1);
    (e << CLASS_BITS) | mant
}

/// Length of size class `c`: `(8 + m) * 2^(e - 3)` for `c = (e, m)`.
fn class_len(c: u32) -> usize {
    let (e, m) = (c >> CLASS_BITS, c & ((1 << CLASS_BITS) - 1));
    (((1 << CLASS_BITS) | m) as usize) << (e - CLASS_BITS)
}

/// A buffer of length `n` with arbitrary contents (recycled when possible).
pub(crate) fn take(n: usize) -> Vec<f32> {
    take_of(n)
}

/// A bf16 buffer of length `n` with arbitrary contents (recycled when
/// possible): bf16 activations are converted at every op, and fresh
/// allocations cost page faults and zeroing each time.
pub(crate) fn take_bf16(n: usize) -> Vec<bf16> {
    take_of(n)
}

fn take_of<T: Pooled>(n: usize) -> Vec<T> {
    if n < MIN_POOLED {
        return vec![T::default(); n];
    }
    let c = class_ceil(n);
    let hit = with_pool(|p| p.get::<T>(c));
    match hit {
        Some(mut v) => {
            // Shrinking keeps the capacity; growing zero-fills only the part
            // beyond the previous user's length.
            v.resize(n, T::default());
            v
        }
        None => {
            // Allocated at the class's length, so that it serves any later
            // request of the class.
            let mut v: Vec<T> = Vec::with_capacity(class_len(c));
            advise_huge_pages(&mut v);
            v.resize(n, T::default());
            v
        }
    }
}

/// Asks the kernel to back the (not yet touched) allocation of `v` with
/// transparent huge pages where it spans whole 2 MiB pages. The activations
/// of a training step are several MiB each and cache-cold when the backward
/// reads them; with 4 KiB pages those reads also miss the TLB. MNIST
/// training step, 6 interleaved runs each: median 401 ms with, 445 ms
/// without. `DCDIT_NO_HUGE_PAGES=1` turns it off (for comparisons).
fn advise_huge_pages<T>(v: &mut Vec<T>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let end = start + v.capacity() * size_of::<T>();
        let a = start.div_ceil(HUGE) * HUGE;
        let b = end / HUGE * HUGE;
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *OFF.get_or_init(|| std::env::var_os("DCDIT_NO_HUGE_PAGES").is_some());
        if b > a && !off {
            // SAFETY: [a, b) lies inside the allocation; madvise only changes
            // how the kernel backs the pages, not their contents.
            unsafe {
                libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// A zero-filled buffer of length `n` (recycled when possible).
pub(crate) fn take_zeroed(n: usize) -> Vec<f32> {
    let mut v = take(n);
    v.fill(0.0);
    v
}

/// Returns a buffer to the pool (or frees it when the pool is full).
pub(crate) fn give(v: Vec<f32>) {
    give_of(v)
}

/// Returns a bf16 buffer to the pool (or frees it when the pool is full).
pub(crate) fn give_bf16(v: Vec<bf16>) {
    give_of(v)
}

fn give_of<T: Pooled>(v: Vec<T>) {
    if v.capacity() < MIN_POOLED {
        return;
    }
    with_pool(|p| p.put(v));
}

/// Frees every pooled buffer (e.g. after a phase with different shapes).
pub fn clear() {
    with_pool(|p| {
        p.by_class.clear();
        p.bf16_by_class.clear();
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

    /// A large fresh buffer is backed by huge pages where the kernel offers
    /// them on request (`madvise` mode; `always` would pass without us).
    #[cfg(target_os = "linux")]
    #[test]
    fn large_buffers_get_huge_pages() {
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if !mode.contains("[madvise]") || std::env::var_os("DCDIT_NO_HUGE_PAGES").is_some() {
            eprintln!("skipped: transparent huge pages are not in madvise mode ({mode:?})");
            return;
        }
        // An odd length no other test uses, so the buffer is fresh.
        let mut v = take(3 << 20 | 12345);
        v.fill(1.0);
        // The first 2 MiB page boundary inside the buffer (madvise splits the
        // mapping there).
        let at = (v.as_ptr() as usize).div_ceil(2 << 20) * (2 << 20);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let mut huge_kb = None;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    inside = a <= at && at < b;
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    huge_kb = kb
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<usize>()
                        .ok();
                }
            }
        }
        give(v);
        assert!(
            huge_kb.unwrap_or(0) >= 2048,
            "AnonHugePages of the buffer: {huge_kb:?}"
        );
    }

    /// A full pool makes room for a returned buffer by freeing the ones
    /// returned longest ago, of either element type, and keeps the counts
    /// straight; a buffer larger than the cap is not kept.
    #[test]
    fn a_full_pool_evicts_the_oldest_returns() {
        let n = MIN_POOLED;
        let f32_bytes = n * size_of::<f32>();
        let mut p = Pool::new(3 * f32_bytes);
        let buf = |len: usize, fill: f32| vec![fill; len];
        p.put(buf(n, 1.0));
        p.put(vec![bf16::from_f32(2.0); 2 * n]); // 1 f32-sized
        p.put(buf(n, 3.0));
        assert_eq!(p.bytes, 3 * f32_bytes);
        // Full: the next return evicts the oldest (the 1.0 buffer).
        p.put(buf(n, 4.0));
        assert_eq!(p.bytes, 3 * f32_bytes);
        let c = class_floor(n);
        let got: Vec<f32> = (0..3)
            .filter_map(|_| p.get::<f32>(c).map(|v| v[0]))
            .collect();
        assert_eq!(got, vec![4.0, 3.0], "most recent first; 1.0 evicted");
        assert_eq!(p.bytes, f32_bytes, "the bf16 buffer is left");
        // Two f32-sized returns into one free slot: the bf16 buffer (oldest)
        // goes next.
        p.put(buf(n, 5.0));
        p.put(buf(n, 6.0));
        p.put(buf(n, 7.0));
        assert!(p.get::<bf16>(class_floor(2 * n)).is_none());
        assert_eq!(p.bytes, 3 * f32_bytes);
        // Larger than the whole cap: dropped, nothing evicted.
        p.put(buf(4 * n, 8.0));
        assert_eq!(p.bytes, 3 * f32_bytes);
        assert!(p.get::<f32>(class_floor(4 * n)).is_none());
        // Evicting from an empty pool reports it.
        let mut e = Pool::new(f32_bytes);
        assert!(!e.evict_oldest());
    }

    #[test]
    fn recycles_bf16_buffers_apart_from_f32_ones() {
        // An odd length no other test uses.
        let n = MIN_POOLED * 3 + 11;
        let mut v = take_bf16(n);
        assert_eq!(v.len(), n);
        v.fill(bf16::ONE);
        let p = v.as_ptr();
        give_bf16(v);
        // An f32 request of the same length never gets the bf16 buffer.
        let f = take(n);
        assert_ne!(f.as_ptr() as usize, p as usize);
        give(f);
        let w = take_bf16(n - 5);
        assert_eq!(w.len(), n - 5);
        if w.as_ptr() == p {
            assert_eq!(w[0], bf16::ONE);
        }
        give_bf16(w);
    }

    #[test]
    fn size_classes_bracket_every_length() {
        // Brute force over a range of lengths: the ceiling class holds `n`,
        // the class below it does not; the floor class fits inside `n`, the
        // class above it does not; slack at most 1/8.
        for n in (MIN_POOLED..MIN_POOLED * 70)
            .step_by(7)
            .chain([1 << 20, (1 << 20) + 1, 6586 * 64])
        {
            let c = class_ceil(n);
            assert!(class_len(c) >= n && class_len(c - 1) < n, "{n}");
            assert!(class_len(c) - n <= n / 8 + 1, "{n}");
            let f = class_floor(n);
            assert!(class_len(f) <= n && class_len(f + 1) > n, "{n}");
        }
    }

    #[test]
    fn a_buffer_serves_shorter_and_longer_requests_of_its_class() {
        // Lengths that differ a little (kept-token counts from step to step)
        // share one allocation.
        let a = take(6586 * 64);
        let cap = a.capacity();
        assert!(cap >= 6586 * 64);
        let p = a.as_ptr();
        give(a);
        let b = take(6484 * 64);
        assert_eq!(b.len(), 6484 * 64);
        if b.as_ptr() == p {
            let mut b = b;
            b.fill(3.0);
            give(b);
            let c = take(6590 * 64);
            assert_eq!(c.len(), 6590 * 64);
            if c.as_ptr() == p {
                // The grown tail is zero, the rest the previous contents.
                assert_eq!(c[6484 * 64 - 1], 3.0);
                assert!(c[6484 * 64..].iter().all(|&x| x == 0.0));
            }
        }
    }
}
