//! The ratio (load-balancing) loss that steers the router towards a target
//! compression `N` (SPEC section 4), as the release's `load_balancing_loss`.
//!
//! `L = N/(N-1) * ((1 - r)(1 - pbar) + (N - 1) r pbar)` where `r` is the
//! fraction of natural boundaries (no gradient) and `pbar` the mean boundary
//! probability. Computed in f32 in the release's operation order.

use crate::{Error, Result};

/// `N - 1` as the release forms it: a python double, then an f32 operand.
#[inline]
fn n_minus_1(n: f32) -> f32 {
    ((n as f64) - 1.0) as f32
}

/// The ratio loss of one group from its target compression `n`, its natural
/// boundary fraction `boundary_frac` and its mean probability `mean_p`.
///
/// Evaluated as the release's `_switch_loss`:
/// `((1 - r)(1 - pbar) + (r pbar)(N - 1)) * N / (N - 1)`. It is only meaningful
/// for `n > 1` (the release asserts it); `n == 1` gives inf/NaN here.
pub fn ratio_loss(n: f32, boundary_frac: f32, mean_p: f32) -> f32 {
    let r = boundary_frac;
    let nm1 = n_minus_1(n);
    ((1.0 - r) * (1.0 - mean_p) + r * mean_p * nm1) * n / nm1
}

/// `d ratio_loss / d mean_p = N/(N-1) * ((N - 1) r - (1 - r))`; the loss is
/// linear in `mean_p`, and `r` carries no gradient.
pub fn ratio_loss_grad_mean_p(n: f32, boundary_frac: f32) -> f32 {
    let r = boundary_frac;
    let nm1 = n_minus_1(n);
    (r * nm1 - (1.0 - r)) * n / nm1
}

/// The release's grouped ratio loss over a batch of `B = p.len() / l` samples.
///
/// `p` holds the boundary probabilities (forced ends included, as the release
/// uses `boundary_prob[..., -1]`) and `natural` the natural (pre-tail-drop)
/// masks, both `B x l`. Samples are split into consecutive groups of `group`
/// samples (`None`: the whole batch is one group); each group gets
/// [`ratio_loss`] with its own `r` and `pbar`, and the result is the mean over
/// groups. If `grad_p` is given, `dLoss/dp_i` is written to it (every entry,
/// also the forced ends: the caller drops those, as they are constants in the
/// release).
///
/// Errors (the release raises in all of these): `n <= 1` or NaN (its
/// `assert n > 1`), `l == 0`, mismatched lengths, an empty batch (the release
/// would return NaN), `group == Some(0)` (division by zero), and a batch that
/// is not a whole number of groups: the release reshapes with
/// `view(B // group, group, ...)`, which fails for a partial last group (and
/// for `B < group`), so no partial group is ever used.
pub fn grouped_ratio_loss(
    p: &[f32],
    natural: &[bool],
    l: usize,
    group: Option<usize>,
    n: f32,
    grad_p: Option<&mut [f32]>,
) -> Result<f32> {
    // `!(n > 1)` also rejects NaN.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    if !(n > 1.0) {
        return Err(Error::input("ratio loss: downsample factor N must be > 1"));
    }
    if l == 0 || p.len() != natural.len() || !p.len().is_multiple_of(l) {
        return Err(Error::input("ratio loss: p/natural must be B x L"));
    }
    let b = p.len() / l;
    if b == 0 {
        return Err(Error::input("ratio loss: empty batch"));
    }
    let g = group.unwrap_or(b);
    if g == 0 || !b.is_multiple_of(g) {
        return Err(Error::input(
            "ratio loss: batch size must be a multiple of ratio_batch_size",
        ));
    }
    if let Some(gp) = &grad_p {
        if gp.len() != p.len() {
            return Err(Error::input("ratio loss: grad_p must be B x L"));
        }
    }
    let n_groups = b / g;
    let per = g * l;
    let mut total = 0f32;
    let mut grad_p = grad_p;
    for k in 0..n_groups {
        let r = k * per..(k + 1) * per;
        // Mean in f64, rounded once: the closest f32 to the exact mean.
        let sum: f64 = p[r.clone()].iter().map(|&x| x as f64).sum();
        let mean_p = (sum / per as f64) as f32;
        let count = natural[r.clone()].iter().filter(|&&m| m).count();
        let frac = (count as f64 / per as f64) as f32;
        total += ratio_loss(n, frac, mean_p);
        if let Some(gp) = grad_p.as_deref_mut() {
            let gv = ratio_loss_grad_mean_p(n, frac) / (per as f32) / (n_groups as f32);
            gp[r].fill(gv);
        }
    }
    Ok(total / n_groups as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};

    /// f64 reference of the loss, written from the paper's formula.
    fn loss_ref(p: &[f64], natural: &[bool], l: usize, group: usize, n: f64) -> f64 {
        let b = p.len() / l;
        let ng = b / group;
        let mut t = 0.0;
        for k in 0..ng {
            let s = &p[k * group * l..(k + 1) * group * l];
            let m = &natural[k * group * l..(k + 1) * group * l];
            let pbar = s.iter().sum::<f64>() / s.len() as f64;
            let r = m.iter().filter(|&&x| x).count() as f64 / s.len() as f64;
            t += n / (n - 1.0) * ((1.0 - r) * (1.0 - pbar) + (n - 1.0) * r * pbar);
        }
        t / ng as f64
    }

    #[test]
    fn known_values() {
        // At the target (r = pbar = 1/N) the loss is exactly 1.
        for n in [2.0f32, 3.0, 4.0, 8.0] {
            let v = ratio_loss(n, 1.0 / n, 1.0 / n);
            assert!((v - 1.0).abs() < 1e-6, "{n} {v}");
        }
        // r = 0, pbar = 0: N/(N-1).
        assert_eq!(ratio_loss(4.0, 0.0, 0.0), 4.0 / 3.0);
        assert_eq!(ratio_loss_grad_mean_p(4.0, 0.25), 0.0);
        assert_eq!(ratio_loss_grad_mean_p(2.0, 1.0), 2.0);
    }

    #[test]
    fn errors_like_release() {
        let p = vec![0.5f32; 12];
        let m = vec![true; 12];
        assert!(grouped_ratio_loss(&p, &m, 4, None, 1.0, None).is_err());
        assert!(grouped_ratio_loss(&p, &m, 4, None, f32::NAN, None).is_err());
        assert!(grouped_ratio_loss(&p, &m, 4, Some(2), 4.0, None).is_err()); // 3 % 2
        assert!(grouped_ratio_loss(&p, &m, 4, Some(4), 4.0, None).is_err()); // B < group
        assert!(grouped_ratio_loss(&p, &m, 4, Some(0), 4.0, None).is_err());
        assert!(grouped_ratio_loss(&p, &m, 5, None, 4.0, None).is_err());
        assert!(grouped_ratio_loss(&[], &[], 4, None, 4.0, None).is_err());
        assert!(grouped_ratio_loss(&p, &m, 4, Some(3), 4.0, None).is_ok());
        assert!(grouped_ratio_loss(&p, &m, 4, Some(1), 4.0, None).is_ok());
    }

    #[derive(Clone, Debug)]
    struct Case {
        p: Vec<f32>,
        natural: Vec<bool>,
        l: usize,
        group: Option<usize>,
        n: f32,
    }

    impl Arbitrary for Case {
        fn arbitrary(g: &mut Gen) -> Self {
            let l = 1 + usize::arbitrary(g) % 20;
            let group = 1 + usize::arbitrary(g) % 4;
            let ng = 1 + usize::arbitrary(g) % 4;
            let b = group * ng;
            let p: Vec<f32> = (0..b * l)
                .map(|_| (u32::arbitrary(g) % 1_000_001) as f32 / 1e6)
                .collect();
            let natural = p.iter().map(|&x| x > 0.5).collect();
            let group = if bool::arbitrary(g) {
                Some(group)
            } else {
                None
            };
            let n = [1.5f32, 2.0, 3.0, 4.0, 6.25][usize::arbitrary(g) % 5];
            Case {
                p,
                natural,
                l,
                group,
                n,
            }
        }
    }

    /// Fails with the case printed (quickcheck 1.x only prints shrunk cases).
    fn verdict<T: core::fmt::Debug>(ok: bool, case: &T) -> TestResult {
        if ok {
            TestResult::passed()
        } else {
            TestResult::error(alloc::format!("failing case: {case:?}"))
        }
    }

    fn prop_loss_and_grad(c: Case) -> TestResult {
        let b = c.p.len() / c.l;
        let group = c.group.unwrap_or(b);
        let mut grad = vec![0f32; c.p.len()];
        let v = grouped_ratio_loss(&c.p, &c.natural, c.l, c.group, c.n, Some(&mut grad)).unwrap();
        let v2 = grouped_ratio_loss(&c.p, &c.natural, c.l, c.group, c.n, None).unwrap();
        let p64: Vec<f64> = c.p.iter().map(|&x| x as f64).collect();
        let want = loss_ref(&p64, &c.natural, c.l, group, c.n as f64);
        let mut ok = v == v2 && (v as f64 - want).abs() < 1e-5 * (1.0 + want.abs());
        // Central differences in f64 with the mask held fixed (r has no gradient).
        let eps = 1e-4;
        for i in 0..c.p.len() {
            let mut a = p64.clone();
            a[i] += eps;
            let mut bm = p64.clone();
            bm[i] -= eps;
            let fd = (loss_ref(&a, &c.natural, c.l, group, c.n as f64)
                - loss_ref(&bm, &c.natural, c.l, group, c.n as f64))
                / (2.0 * eps);
            ok &= (grad[i] as f64 - fd).abs() < 1e-5 * (1.0 + fd.abs());
        }
        verdict(ok, &c)
    }

    #[test]
    fn grouped_loss_and_gradient_vs_reference() {
        QuickCheck::new()
            .tests(500)
            .quickcheck(prop_loss_and_grad as fn(Case) -> TestResult);
    }

    #[test]
    fn whole_batch_equals_single_group() {
        let p: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37) % 1.0).collect();
        let m: Vec<bool> = p.iter().map(|&x| x > 0.5).collect();
        let a = grouped_ratio_loss(&p, &m, 6, None, 4.0, None).unwrap();
        let b = grouped_ratio_loss(&p, &m, 6, Some(4), 4.0, None).unwrap();
        assert_eq!(a, b);
        // Groups of 2 average two different group losses.
        let c = grouped_ratio_loss(&p, &m, 6, Some(2), 4.0, None).unwrap();
        let g0 = grouped_ratio_loss(&p[..12], &m[..12], 6, None, 4.0, None).unwrap();
        let g1 = grouped_ratio_loss(&p[12..], &m[12..], 6, None, 4.0, None).unwrap();
        assert_eq!(c, (g0 + g1) / 2.0);
    }
}
