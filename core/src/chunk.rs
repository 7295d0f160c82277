//! Chunking: which tokens the main network sees, and in which order
//! (SPEC section 1.6). Allocation-free, on one sample's `L` tokens.

use core::cmp::Ordering;

/// Writes the raster-order indices of the kept tokens (`mask[i]` true) to the
/// front of `out` and returns their number `M`.
///
/// # Panics
/// If `out` is shorter than `M`.
pub fn kept_indices(mask: &[bool], out: &mut [u32]) -> usize {
    let mut m = 0;
    for (i, &k) in mask.iter().enumerate() {
        if k {
            out[m] = i as u32;
            m += 1;
        }
    }
    m
}

/// Order of the non-kept tokens in the pad fill: descending `p`, NaN last
/// (torch sorts NaN after every number), then ascending raster index.
fn pad_order(p: &[f32], a: u32, b: u32) -> Ordering {
    let (pa, pb) = (p[a as usize], p[b as usize]);
    let by_p = match (pa.is_nan(), pb.is_nan()) {
        (false, false) => pb.partial_cmp(&pa).unwrap_or(Ordering::Equal),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => Ordering::Equal,
    };
    by_p.then(a.cmp(&b))
}

/// The release's `ChunkLayer` token order: the kept tokens in raster order
/// (`out[..M]`), then the other tokens by descending `p`, ties by raster
/// order (`out[M..]`, the paper's pad fill: the next-most-likely boundaries).
/// Returns `M`.
///
/// The release breaks ties with torch's unstable `argsort`, which is not
/// raster order on CPU beyond 16 elements; raster order is this project's
/// (SPEC's) deterministic choice. Pad slots never influence real outputs.
///
/// # Panics
/// If `p`, `mask` and `out` do not all have the same length.
pub fn chunk_order(p: &[f32], mask: &[bool], out: &mut [u32]) -> usize {
    assert!(
        p.len() == mask.len() && out.len() == p.len(),
        "chunk_order: length mismatch"
    );
    let m = kept_indices(mask, out);
    let mut j = m;
    for (i, &k) in mask.iter().enumerate() {
        if !k {
            out[j] = i as u32;
            j += 1;
        }
    }
    // Indices are unique, so the order is total and an unstable sort (core,
    // no allocation) is deterministic.
    out[m..].sort_unstable_by(|&a, &b| pad_order(p, a, b));
    m
}

/// For every raster position, the number of kept tokens before it, i.e. the
/// kept slot a kept token occupies in the chunked sequence (an exclusive
/// prefix count). Returns `M`.
///
/// # Panics
/// If `out.len() != mask.len()`.
pub fn rank_in_kept(mask: &[bool], out: &mut [u32]) -> usize {
    assert_eq!(mask.len(), out.len(), "rank_in_kept: length mismatch");
    let mut c = 0u32;
    for (o, &k) in out.iter_mut().zip(mask) {
        *o = c;
        c += k as u32;
    }
    c as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};

    #[derive(Clone, Debug)]
    struct Case {
        p: Vec<f32>,
        mask: Vec<bool>,
    }

    impl Arbitrary for Case {
        fn arbitrary(g: &mut Gen) -> Self {
            let h = 1 + usize::arbitrary(g) % 64;
            let w = 1 + usize::arbitrary(g) % 64;
            let l = h * w;
            let levels = 1 + u8::arbitrary(g) % 10;
            let p: Vec<f32> = (0..l)
                .map(|_| match u8::arbitrary(g) % 20 {
                    0 => f32::NAN,
                    1..=9 => (u8::arbitrary(g) % levels) as f32 / levels as f32,
                    _ => (u32::arbitrary(g) % 1_000_000) as f32 / 1e6,
                })
                .collect();
            let mode = u8::arbitrary(g) % 4;
            let mask = (0..l)
                .map(|i| match mode {
                    0 => true,
                    1 => i == 0 || i == l - 1,
                    2 => p[i] > 0.5,
                    _ => bool::arbitrary(g),
                })
                .collect();
            Case { p, mask }
        }
    }

    /// Straightforward version: the release's construction with a stable
    /// sort. Key for non-kept tokens is -p with NaN mapped after +inf.
    fn chunk_order_brute(p: &[f32], mask: &[bool]) -> Vec<u32> {
        let l = p.len();
        // (class, key, index): kept tokens class 0 keyed by index.
        let mut items: Vec<(u8, f64, usize)> = (0..l)
            .map(|i| {
                if mask[i] {
                    (0, i as f64, i)
                } else if p[i].is_nan() {
                    (2, 0.0, i)
                } else {
                    (1, -(p[i] as f64), i)
                }
            })
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.partial_cmp(&b.1).unwrap()));
        items.into_iter().map(|t| t.2 as u32).collect()
    }

    /// Fails with the case printed (quickcheck 1.x only prints shrunk cases).
    fn verdict<T: core::fmt::Debug>(ok: bool, case: &T) -> TestResult {
        if ok {
            TestResult::passed()
        } else {
            TestResult::error(alloc::format!("failing case: {case:?}"))
        }
    }

    fn prop_chunk(c: Case) -> TestResult {
        let l = c.p.len();
        let mut out = vec![0u32; l];
        let m = chunk_order(&c.p, &c.mask, &mut out);
        let want = chunk_order_brute(&c.p, &c.mask);
        let m_true = c.mask.iter().filter(|&&b| b).count();
        let mut kept = vec![0u32; l];
        let mk = kept_indices(&c.mask, &mut kept);
        let mut rank = vec![0u32; l];
        let mr = rank_in_kept(&c.mask, &mut rank);
        let mut ok = m == m_true && mk == m && mr == m && out == want && kept[..m] == out[..m];
        for (slot, &i) in out[..m].iter().enumerate() {
            ok &= rank[i as usize] == slot as u32;
        }
        for (i, &rk) in rank.iter().enumerate() {
            let before = c.mask[..i].iter().filter(|&&b| b).count() as u32;
            ok &= rk == before;
        }
        verdict(ok, &c)
    }

    #[test]
    fn chunk_order_matches_brute() {
        QuickCheck::new()
            .tests(1500)
            .quickcheck(prop_chunk as fn(Case) -> TestResult);
    }

    #[test]
    fn chunk_order_known() {
        let p = [1.0f32, 0.3, 0.9, 0.3, 0.45, 1.0];
        let mask = [true, false, true, false, false, true];
        let mut out = [0u32; 6];
        assert_eq!(chunk_order(&p, &mask, &mut out), 3);
        assert_eq!(out, [0, 2, 5, 4, 1, 3]);
        // A dropped boundary (mask false, high p) leads the pad fill.
        let mask = [true, false, false, false, false, true];
        assert_eq!(chunk_order(&p, &mask, &mut out), 2);
        assert_eq!(out, [0, 5, 2, 4, 1, 3]);
    }
}
