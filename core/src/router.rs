//! Boundary selection on a router's probabilities (SPEC sections 1.5, 2 and 5).
//!
//! Everything here works on one sample's `L` tokens in raster order, on
//! caller-provided slices, without allocating (except the convenience
//! [`tail_drop`]). The release computes these steps in f32 (its
//! `fp32_router_dechunk`), and so do we, in the same operation order.

use core::cmp::Ordering;

/// Sets the probability of the first and the last token to exactly 1.
///
/// The release does this in place after the sigmoid, so both end tokens are
/// always natural boundaries and the chunked sequence is never empty. The
/// written values are constants: callers must not propagate gradients into
/// these two entries. A no-op on an empty slice; a 1-token slice gets one 1.
pub fn force_ends(p: &mut [f32]) {
    if let Some(first) = p.first_mut() {
        *first = 1.0;
    }
    if let Some(last) = p.last_mut() {
        *last = 1.0;
    }
}

/// Natural boundary mask: `mask[i] = p[i] > 0.5` (strictly).
///
/// The release takes `argmax((1 - p, p))`, which picks index 0 on ties and on
/// NaN; in f32 that is exactly `p > 0.5` (for `p >= 0.25`, `1 - p` is exact by
/// Sterbenz' lemma, below that `1 - p > p` anyway; the tests sweep it).
///
/// # Panics
/// If `mask.len() != p.len()`.
pub fn natural_mask(p: &[f32], mask: &mut [bool]) {
    assert_eq!(p.len(), mask.len(), "natural_mask: length mismatch");
    for (m, &pi) in mask.iter_mut().zip(p) {
        *m = pi > 0.5;
    }
}

/// Clamps a tail-drop fraction to `[0, 1]`, NaN to 0.
///
/// The release multiplies unclamped; a fraction above 1 drops every boundary
/// there too, and a negative or NaN one drops none, so clamping only removes
/// the undefined float-to-int conversions.
fn sanitize_fraction(fraction: f32) -> f32 {
    if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    }
}

/// Number of boundaries tail dropping removes out of `n_boundary`:
/// `trunc(n_boundary as f32 * fraction)`, with the f32 multiply of the
/// release (`n_boundary.float() * frac`), the fraction clamped to `[0, 1]`
/// and NaN treated as 0.
pub fn n_drop(n_boundary: usize, fraction: f32) -> usize {
    let f = sanitize_fraction(fraction);
    // `as usize` truncates toward zero like torch's `.long()`; the product is
    // in [0, n_boundary], so nothing saturates.
    ((n_boundary as f32) * f) as usize
}

/// Total order used to rank boundaries for dropping: lower `p` first, then
/// lower raster index. Boundaries have `p > 0.5`, so NaN never occurs; it is
/// ordered last for safety.
fn drop_order(p: &[f32], a: u32, b: u32) -> Ordering {
    let (pa, pb) = (p[a as usize], p[b as usize]);
    let by_p = match (pa.is_nan(), pb.is_nan()) {
        (false, false) => pa.partial_cmp(&pb).unwrap_or(Ordering::Equal),
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (true, true) => Ordering::Equal,
    };
    by_p.then(a.cmp(&b))
}

/// Elastic-inference tail dropping, allocation-free: among the boundaries in
/// `mask`, clears the [`n_drop`]`(n_boundary, fraction)` with the lowest `p`
/// (ties broken by raster order, lower index dropped first). Returns how many
/// were dropped.
///
/// `scratch` (length `>= L`) receives the boundary indices; a partial
/// selection (`select_nth_unstable_by`, in `core`) makes this O(L) on average.
/// The forced ends have `p = 1`, the maximum, so they go last, but a fraction
/// of 1 drops every boundary, exactly as the release does; callers that need
/// a non-empty chunk must keep the fraction below 1.
///
/// # Panics
/// If `mask.len() != p.len()` or `scratch.len() < p.len()`.
pub fn tail_drop_with_scratch(
    p: &[f32],
    mask: &mut [bool],
    fraction: f32,
    scratch: &mut [u32],
) -> usize {
    assert_eq!(p.len(), mask.len(), "tail_drop: length mismatch");
    assert!(scratch.len() >= p.len(), "tail_drop: scratch too short");
    let mut nb = 0usize;
    for (i, &m) in mask.iter().enumerate() {
        if m {
            scratch[nb] = i as u32;
            nb += 1;
        }
    }
    let nd = n_drop(nb, fraction);
    if nd == 0 {
        return 0;
    }
    let cand = &mut scratch[..nb];
    if nd < nb {
        // Afterwards cand[..nd] holds the nd smallest under the total order
        // (in some order), which is all we need.
        cand.select_nth_unstable_by(nd - 1, |&a, &b| drop_order(p, a, b));
    }
    for &i in &cand[..nd] {
        mask[i as usize] = false;
    }
    nd
}

/// [`tail_drop_with_scratch`] with an internally allocated scratch, for
/// callers that do not care about the allocation.
pub fn tail_drop(p: &[f32], mask: &mut [bool], fraction: f32) -> usize {
    let mut scratch = alloc::vec![0u32; p.len()];
    tail_drop_with_scratch(p, mask, fraction, &mut scratch)
}

/// Tail dropping over a batch of `B = p.len() / l` samples of `l` tokens,
/// with one fraction for all (`fractions.len() == 1`) or one per sample
/// (`fractions.len() == B`, the release's tensor fraction used by Lite-CFG).
/// Returns the total number of dropped boundaries.
///
/// # Panics
/// If `l == 0` while `p` is non-empty, `p.len()` is not a multiple of `l`,
/// `fractions` has neither length 1 nor `B`, or `scratch.len() < l`.
pub fn tail_drop_batch_with_scratch(
    p: &[f32],
    mask: &mut [bool],
    l: usize,
    fractions: &[f32],
    scratch: &mut [u32],
) -> usize {
    assert_eq!(p.len(), mask.len(), "tail_drop_batch: length mismatch");
    if p.is_empty() {
        return 0;
    }
    assert!(
        l > 0 && p.len().is_multiple_of(l),
        "tail_drop_batch: bad sample length"
    );
    let b = p.len() / l;
    assert!(
        fractions.len() == 1 || fractions.len() == b,
        "tail_drop_batch: need 1 or B fractions"
    );
    let mut total = 0;
    for s in 0..b {
        let f = if fractions.len() == 1 {
            fractions[0]
        } else {
            fractions[s]
        };
        let r = s * l..(s + 1) * l;
        total += tail_drop_with_scratch(&p[r.clone()], &mut mask[r], f, scratch);
    }
    total
}

/// Selected probability `q_i = p_i` where token i is a natural boundary and
/// `1 - p_i` (f32) otherwise: the release's `gather` of `(1 - p, p)` at the
/// argmax, which feeds the STE gate of the residual (SPEC 1.9).
///
/// # Panics
/// If the three lengths differ.
pub fn selected_prob(p: &[f32], natural: &[bool], q: &mut [f32]) {
    assert!(
        p.len() == natural.len() && p.len() == q.len(),
        "selected_prob: length mismatch"
    );
    for ((qi, &pi), &m) in q.iter_mut().zip(p).zip(natural) {
        *qi = if m { pi } else { 1.0 - pi };
    }
}

/// Cosine router scores (the paper's router): `p_i = (1 - q_i . kbar_i) / 2`
/// for `L = p.len()` rows of width `dim` that are already L2-normalised.
///
/// # Panics
/// If `q` or `kbar` is not `p.len() * dim` long.
pub fn cosine_scores(q: &[f32], kbar: &[f32], dim: usize, p: &mut [f32]) {
    assert!(
        q.len() == p.len() * dim && kbar.len() == q.len(),
        "cosine_scores: length mismatch"
    );
    for (i, pi) in p.iter_mut().enumerate() {
        let r = i * dim..(i + 1) * dim;
        let s: f32 = q[r.clone()]
            .iter()
            .zip(&kbar[r])
            .map(|(&a, &b)| a * b)
            .sum();
        *pi = (1.0 - s) / 2.0;
    }
}

/// In-place row L2 normalisation with `F.normalize` semantics:
/// `x / max(||x||_2, 1e-12)` per row of width `dim` (zero rows stay zero).
///
/// The norm is accumulated in f64 and rounded once, the closest f32 to the
/// exact norm; each element is then divided (not multiplied by a reciprocal),
/// as torch does.
///
/// # Panics
/// If `dim > 0` and `x.len()` is not a multiple of `dim`.
pub fn l2_normalize_rows(x: &mut [f32], dim: usize) {
    if dim == 0 {
        return;
    }
    assert!(
        x.len().is_multiple_of(dim),
        "l2_normalize_rows: ragged rows"
    );
    for row in x.chunks_exact_mut(dim) {
        let ss: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let n = (libm::sqrt(ss) as f32).max(1e-12);
        for v in row.iter_mut() {
            *v /= n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};

    /// torch.argmax over the pair (1 - p, p): first index of the maximum,
    /// NaN counts as the maximum (torch propagates NaN in max/argmax).
    fn release_argmax_is_one(p: f32) -> bool {
        let a = 1.0 - p;
        let b = p;
        if a.is_nan() {
            return false;
        }
        if b.is_nan() {
            return true;
        }
        b > a
    }

    #[test]
    fn natural_mask_equals_release_argmax_sweep() {
        // Every f32 in [0.125, 1] (about 25M values) plus a strided sweep of
        // everything else between -4 and 4 and the specials.
        let lo = 0.125f32.to_bits();
        let hi = 1.0f32.to_bits();
        for bits in lo..=hi {
            let p = f32::from_bits(bits);
            assert_eq!(p > 0.5, release_argmax_is_one(p), "p = {p:e}");
            assert_eq!(p > 0.5, p > 1.0 - p, "p = {p:e}");
        }
        let mut specials = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 0.5];
        specials.push(f32::from_bits(0.5f32.to_bits() + 1));
        specials.push(f32::from_bits(0.5f32.to_bits() - 1));
        for bits in (0u32..=u32::MAX).step_by(4099) {
            let p = f32::from_bits(bits);
            if p.abs() <= 4.0 || p.is_nan() {
                specials.push(p);
            }
        }
        let mut mask = vec![false; specials.len()];
        natural_mask(&specials, &mut mask);
        for (&p, &m) in specials.iter().zip(&mask) {
            assert_eq!(m, release_argmax_is_one(p), "p = {p:e}");
        }
    }

    #[test]
    fn force_ends_cases() {
        let mut e: [f32; 0] = [];
        force_ends(&mut e);
        let mut one = [0.2f32];
        force_ends(&mut one);
        assert_eq!(one, [1.0]);
        let mut v = [0.1f32, 0.2, 0.3, 0.4];
        force_ends(&mut v);
        assert_eq!(v, [1.0, 0.2, 0.3, 1.0]);
    }

    /// Probabilities drawn from a small set so ties are common.
    #[derive(Clone, Debug)]
    struct Probs(Vec<f32>, f32);

    impl Arbitrary for Probs {
        fn arbitrary(g: &mut Gen) -> Self {
            let l = 1 + usize::arbitrary(g) % 300;
            let levels = 1 + u8::arbitrary(g) % 12;
            let v = (0..l)
                .map(|_| {
                    if bool::arbitrary(g) {
                        (u8::arbitrary(g) % levels) as f32 / levels as f32
                    } else {
                        (u32::arbitrary(g) % 1_000_001) as f32 / 1e6
                    }
                })
                .collect();
            let f = match u8::arbitrary(g) % 6 {
                0 => 0.0,
                1 => 1.0,
                2 => (u16::arbitrary(g) % 11) as f32 / 10.0,
                3 => f32::NAN,
                4 => (i16::arbitrary(g) as f32) / 1000.0,
                _ => (u32::arbitrary(g) % 1001) as f32 / 1000.0,
            };
            Probs(v, f)
        }
    }

    /// Brute force: a full stable sort of the boundaries by p (raster order
    /// preserved on ties), drop the first n.
    fn tail_drop_brute(p: &[f32], mask: &mut [bool], fraction: f32) -> usize {
        let mut idx: Vec<usize> = (0..p.len()).filter(|&i| mask[i]).collect();
        idx.sort_by(|&a, &b| p[a].partial_cmp(&p[b]).unwrap());
        let f = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        let n = libm::floorf((idx.len() as f32) * f) as usize;
        for &i in &idx[..n] {
            mask[i] = false;
        }
        n
    }

    /// Fails with the case printed (quickcheck 1.x only prints shrunk cases).
    fn verdict<T: core::fmt::Debug>(ok: bool, case: &T) -> TestResult {
        if ok {
            TestResult::passed()
        } else {
            TestResult::error(alloc::format!("failing case: {case:?}"))
        }
    }

    fn prop_tail_drop(pr: Probs) -> TestResult {
        let Probs(mut p, f) = pr.clone();
        force_ends(&mut p);
        let mut mask = vec![false; p.len()];
        natural_mask(&p, &mut mask);
        let mut m1 = mask.clone();
        let mut m2 = mask.clone();
        let mut scratch = vec![0u32; p.len()];
        let n1 = tail_drop_with_scratch(&p, &mut m1, f, &mut scratch);
        let n2 = tail_drop_brute(&p, &mut m2, f);
        let mut m3 = mask.clone();
        let n3 = tail_drop(&p, &mut m3, f);
        let dropped = mask.iter().zip(&m1).filter(|(a, b)| **a && !**b).count();
        verdict(
            n1 == n2 && m1 == m2 && n3 == n1 && m3 == m1 && dropped == n1,
            &pr,
        )
    }

    #[test]
    fn tail_drop_matches_stable_sort() {
        QuickCheck::new()
            .tests(3000)
            .quickcheck(prop_tail_drop as fn(Probs) -> TestResult);
    }

    #[test]
    fn tail_drop_known_cases() {
        // 5 boundaries, 0.4 * 5 = 2 dropped: lowest p, lower index first on tie.
        let p = [1.0f32, 0.7, 0.6, 0.2, 0.6, 0.9, 1.0];
        let mut m = [false; 7];
        natural_mask(&p, &mut m);
        assert_eq!(m, [true, true, true, false, true, true, true]);
        let n = tail_drop(&p, &mut m, 0.4);
        // n_boundary = 6: 6 * 0.4f32 = 2.4000001 -> 2
        assert_eq!(n, 2);
        assert_eq!(m, [true, true, false, false, false, true, true]);
        // Fraction 1 drops everything, including the forced ends.
        let mut m = [true; 7];
        assert_eq!(tail_drop(&p, &mut m, 1.0), 7);
        assert!(m.iter().all(|&b| !b));
        // Out-of-range fractions.
        for f in [f32::NAN, -0.5, 0.0, f32::NEG_INFINITY] {
            let mut m = [true; 7];
            assert_eq!(tail_drop(&p, &mut m, f), 0);
            assert!(m.iter().all(|&b| b));
        }
        let mut m = [true; 7];
        assert_eq!(tail_drop(&p, &mut m, f32::INFINITY), 7);
        // f32 product: 10 * 0.7f32 = 7.0 in f32 (6.9999998 exactly), trunc 7.
        assert_eq!(n_drop(10, 0.7), 7);
        assert_eq!(n_drop(3, 0.5), 1);
        assert_eq!(n_drop(0, 0.5), 0);
    }

    #[test]
    fn tail_drop_per_sample() {
        let l = 6;
        let p: Vec<f32> = [1.0f32, 0.9, 0.8, 0.7, 0.6, 1.0].repeat(3);
        let mut mask = vec![true; p.len()];
        let mut scratch = vec![0u32; l];
        let n = tail_drop_batch_with_scratch(&p, &mut mask, l, &[0.0, 0.5, 0.9], &mut scratch);
        assert_eq!(n, 3 + 5);
        assert_eq!(&mask[..6], &[true; 6]);
        assert_eq!(&mask[6..12], &[true, true, false, false, false, true]);
        assert_eq!(&mask[12..], &[false, false, false, false, false, true]);
        let mut mask = vec![true; p.len()];
        let n = tail_drop_batch_with_scratch(&p, &mut mask, l, &[0.5], &mut scratch);
        assert_eq!(n, 9);
    }

    #[test]
    fn selected_prob_cases() {
        let p = [1.0f32, 0.3, 0.7, 0.5];
        let mut m = [false; 4];
        natural_mask(&p, &mut m);
        let mut q = [0f32; 4];
        selected_prob(&p, &m, &mut q);
        assert_eq!(q, [1.0, 1.0 - 0.3f32, 0.7, 0.5]);
        // q is always the larger of the two (>= 0.5) for probabilities.
        assert!(q.iter().all(|&x| x >= 0.5));
    }

    #[test]
    fn cosine_and_normalize() {
        let dim = 3;
        let mut q = vec![3.0f32, 4.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut k = vec![3.0f32, 4.0, 0.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0];
        l2_normalize_rows(&mut q, dim);
        l2_normalize_rows(&mut k, dim);
        assert_eq!(&q[..3], &[0.6, 0.8, 0.0]);
        assert_eq!(&q[3..6], &[0.0, 0.0, 0.0]);
        let mut p = vec![0f32; 3];
        cosine_scores(&q, &k, dim, &mut p);
        assert!((p[0] - 0.0).abs() < 1e-7); // identical directions
        assert_eq!(p[1], 0.5); // zero vector: orthogonal to everything
        assert!((p[2] - 1.0).abs() < 1e-6); // opposite directions
                                            // Norm of normalised random rows is 1.
        let mut x: Vec<f32> = (0..40).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        l2_normalize_rows(&mut x, 8);
        for r in x.chunks(8) {
            let n: f32 = r.iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-6);
        }
    }
}
