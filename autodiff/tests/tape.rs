//! Tape mechanics on the f64 reference backend: gradient accumulation when a
//! tensor feeds several consumers, several seeds at once, no-grad mode,
//! reset/clear and stale tensors, freeing during backward, and moving model
//! parameters on and off the tape.

mod common;

use std::rc::{Rc, Weak};

use common::*;
use dcdit_autodiff::{take_param_grads, track_params, untrack_params, AdTensor, Autodiff};
use dcdit_core::backend::{Backend, Binary, Unary};
use dcdit_core::config::Config;
use dcdit_core::model::{self, params::Params};
use dcdit_core::rng::Rng;
use dcdit_core::{Error, Result};

type Ad = Autodiff<RefBackend>;

/// A program over any backend with several outputs (each gets a seed).
trait Prog {
    fn inputs(&self) -> Vec<(Vec<usize>, Vec<f32>)>;
    fn run<B: Backend>(&self, b: &B, x: &[B::Tensor]) -> Result<Vec<B::Tensor>>;
}

/// A DiT-block-like chain in which `x` feeds six consumers and `ada` three,
/// with two outputs (a final one and an intermediate one), as the training
/// loss seeds the model output and the router probabilities.
struct Block;

const POS: [u32; 8] = [0, 5, 11, 1, 2, 6, 9, 10];

impl Prog for Block {
    fn inputs(&self) -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut r = Rng::new(7);
        vec![
            (vec![8, 4], normal(&mut r, 32, 1.0)),      // x
            (vec![12, 4], normal(&mut r, 48, 0.5)),     // w_qkv
            (vec![12], normal(&mut r, 12, 0.2)),        // b_qkv
            (vec![4, 4], normal(&mut r, 16, 0.5)),      // w_o
            (vec![3, 24], normal(&mut r, 72, 0.5)),     // ada
            (vec![8, 1], uniform(&mut r, 8, 0.1, 0.9)), // p
        ]
    }
    fn run<B: Backend>(&self, b: &B, t: &[B::Tensor]) -> Result<Vec<B::Tensor>> {
        let (x, wqkv, bqkv, wo, ada, p) = (&t[0], &t[1], &t[2], &t[3], &t[4], &t[5]);
        let seg = &SEG;
        let h = b.layer_norm(x, 1e-6)?;
        let h = b.modulate(&h, ada, 0, 1, seg)?;
        let qkv = b.linear(&h, wqkv, Some(bqkv))?;
        let a = b.attention(&qkv, 2, seg)?;
        let a = b.linear(&a, wo, None)?;
        let x2 = b.gated_add(x, &a, ada, 2, seg)?;
        let m = b.binary(&x2, x, Binary::Mul)?;
        let m = b.binary(&m, x, Binary::Sub)?;
        let s = b.row_sum(&m)?;
        let y = b.scale_rows(&x2, &s)?;
        let sm = b.dechunk_smooth(&y, p, &POS, 4, 1.0, seg)?;
        let sx = b.unary(x, Unary::Silu)?;
        let z = b.binary(&sm, &sx, Binary::Add)?;
        let z = b.binary(&z, x, Binary::Mul)?;
        let pp = b.binary(p, p, Binary::Mul)?;
        Ok(vec![z, s, pp])
    }
}

fn fd_prog<P: Prog>(prog: &P, seeds: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let xs: Vec<RT> = prog
        .inputs()
        .iter()
        .map(|(s, d)| RT::new(d.iter().map(|&v| v as f64).collect(), s))
        .collect();
    let loss = |xs: &[RT]| -> f64 {
        let outs = prog.run(&RefBackend, xs).unwrap();
        outs.iter()
            .zip(seeds)
            .map(|(o, r)| o.data.iter().zip(r).map(|(a, b)| a * b).sum::<f64>())
            .sum()
    };
    let h = 1e-5;
    (0..xs.len())
        .map(|i| {
            (0..xs[i].data.len())
                .map(|j| {
                    let at = |d: f64| {
                        let mut ys = xs.clone();
                        let mut v = (*ys[i].data).clone();
                        v[j] += d;
                        ys[i] = RT::new(v, &xs[i].shape);
                        loss(&ys)
                    };
                    (at(h) - at(-h)) / (2.0 * h)
                })
                .collect()
        })
        .collect()
}

fn leaves(ad: &Ad, inputs: &[(Vec<usize>, Vec<f32>)]) -> Vec<AdTensor<RefBackend>> {
    inputs
        .iter()
        .map(|(s, d)| ad.leaf(RefBackend.from_f32(d, s).unwrap()))
        .collect()
}

#[test]
fn shared_inputs_and_several_seeds() {
    let ad = Ad::new(RefBackend);
    let xs = leaves(&ad, &Block.inputs());
    let outs = Block.run(&ad, &xs).unwrap();
    let mut rng = Rng::new(3);
    let seeds: Vec<Vec<f32>> = outs
        .iter()
        .map(|o| normal(&mut rng, ad.shape(o).iter().product(), 1.0))
        .collect();
    let seed_t: Vec<_> = outs
        .iter()
        .zip(&seeds)
        .map(|(o, r)| RefBackend.from_f32(r, &ad.shape(o)).unwrap())
        .collect();
    let pairs: Vec<_> = outs.iter().zip(seed_t).collect();
    let grads = ad.backward(&pairs).unwrap();
    let fd = fd_prog(
        &Block,
        &seeds
            .iter()
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect::<Vec<_>>(),
    );
    for (i, x) in xs.iter().enumerate() {
        let g = RefBackend.to_f32(grads.get(x).expect("gradient")).unwrap();
        let (e, at) = rel_err(&g, &fd[i], 0.05);
        assert!(
            e < 1e-6,
            "input {i}: rel err {e:.2e} at {at}: {} vs {}",
            g[at],
            fd[i][at]
        );
    }
}

#[test]
fn same_tensor_seeded_twice_adds() {
    let ad = Ad::new(RefBackend);
    let x = ad.leaf(RefBackend.from_f32(&[0.3, -1.2, 2.0], &[3, 1]).unwrap());
    let y = ad.unary(&x, Unary::GeluTanh).unwrap();
    let r1 = RefBackend.from_f32(&[1.0, 2.0, -1.0], &[3, 1]).unwrap();
    let r2 = RefBackend.from_f32(&[0.5, -0.5, 4.0], &[3, 1]).unwrap();
    let g2 = ad.backward(&[(&y, r1.clone()), (&y, r2.clone())]).unwrap();
    let g2 = RefBackend.to_f32(g2.get(&x).unwrap()).unwrap();

    let x = ad.leaf(RefBackend.from_f32(&[0.3, -1.2, 2.0], &[3, 1]).unwrap());
    let y = ad.unary(&x, Unary::GeluTanh).unwrap();
    let r = RefBackend.binary(&r1, &r2, Binary::Add).unwrap();
    let g1 = ad.backward(&[(&y, r)]).unwrap();
    let g1 = RefBackend.to_f32(g1.get(&x).unwrap()).unwrap();
    for (a, b) in g1.iter().zip(&g2) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn no_grad_records_nothing() {
    let ad = Ad::new(RefBackend);
    let x = ad.leaf(RefBackend.from_f32(&[1.0, 2.0], &[2, 1]).unwrap());
    assert_eq!(ad.tape_len(), 1);
    let y = ad.no_grad(|| ad.unary(&x, Unary::Silu).unwrap());
    assert!(!y.is_tracked());
    assert_eq!(ad.tape_len(), 1);
    assert!(ad.is_grad_enabled());

    // A guard; a nested no_grad keeps it disabled until the guard drops.
    {
        let _g = ad.no_grad_guard();
        let z = ad.no_grad(|| ad.affine(&x, 2.0, 1.0).unwrap());
        assert!(!z.is_tracked());
        let z = ad.affine(&x, 2.0, 1.0).unwrap();
        assert!(!z.is_tracked(), "still disabled after the inner no_grad");
        assert!(!ad.is_grad_enabled());
    }
    assert!(ad.is_grad_enabled());

    // A panic inside no_grad restores the mode.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ad.no_grad(|| panic!("boom"));
    }));
    assert!(r.is_err());
    assert!(ad.is_grad_enabled());

    let y = ad.unary(&x, Unary::Silu).unwrap();
    assert!(y.is_tracked());
    assert_eq!(ad.tape_len(), 2);
    // Clones share the tape and the mode.
    let ad2 = ad.clone();
    ad2.no_grad(|| assert!(!ad.is_grad_enabled()));
    let _ = ad2.affine(&y, 1.0, 0.0).unwrap();
    assert_eq!(ad.tape_len(), 3);
}

#[test]
fn backward_resets_and_stale_tensors_error() {
    let ad = Ad::new(RefBackend);
    let x = ad.leaf(RefBackend.from_f32(&[1.0, 2.0], &[2, 1]).unwrap());
    let y = ad.affine(&x, 3.0, 0.0).unwrap();
    let seed = RefBackend.from_f32(&[1.0, 1.0], &[2, 1]).unwrap();
    let grads = ad.backward(&[(&y, seed.clone())]).unwrap();
    assert_eq!(ad.tape_len(), 0);
    assert_eq!(
        RefBackend.to_f32(grads.get(&x).unwrap()).unwrap(),
        vec![3.0, 3.0]
    );
    assert!(
        grads.get(&y).is_none(),
        "non-leaves have no gradient in Grads"
    );
    assert_eq!(grads.len(), 1);

    // x belongs to the old tape.
    match ad.unary(&x, Unary::Silu) {
        Err(Error::Backend(m)) => assert!(m.contains("reset"), "{m}"),
        other => panic!("expected a stale-tensor error, got {other:?}"),
    }
    assert!(ad.backward(&[(&y, seed.clone())]).is_err());
    // ... but in no-grad mode it is just a value.
    assert!(ad.no_grad(|| ad.unary(&x, Unary::Silu)).is_ok());

    // A fresh leaf at the same index is not confused with the old one.
    let x2 = ad.leaf(RefBackend.from_f32(&[1.0, 2.0], &[2, 1]).unwrap());
    assert!(grads.get(&x2).is_none());
    let y2 = ad.affine(&x2, -1.0, 0.0).unwrap();
    ad.clear();
    assert_eq!(ad.tape_len(), 0);
    assert!(ad.unary(&y2, Unary::Silu).is_err());
}

#[test]
fn seeds_checked_and_untracked_paths() {
    let ad = Ad::new(RefBackend);
    let x = ad.leaf(RefBackend.from_f32(&[1.0, 2.0], &[2, 1]).unwrap());
    let unused = ad.leaf(RefBackend.from_f32(&[5.0], &[1]).unwrap());
    let c = ad.from_f32(&[4.0, 5.0], &[2, 1]).unwrap();
    assert!(!c.is_tracked());
    let y = ad.binary(&x, &c, Binary::Mul).unwrap();
    // Wrong seed shape.
    let bad = RefBackend.from_f32(&[1.0, 1.0], &[1, 2]).unwrap();
    assert!(matches!(ad.backward(&[(&y, bad)]), Err(Error::Input(_))));

    let x = ad.leaf(RefBackend.from_f32(&[1.0, 2.0], &[2, 1]).unwrap());
    let unused2 = ad.leaf(RefBackend.from_f32(&[5.0], &[1]).unwrap());
    let y = ad.binary(&x, &c, Binary::Mul).unwrap();
    let seed = RefBackend.from_f32(&[1.0, 1.0], &[2, 1]).unwrap();
    // A seed on a constant is ignored.
    let grads = ad.backward(&[(&y, seed.clone()), (&c, seed)]).unwrap();
    assert_eq!(
        RefBackend.to_f32(grads.get(&x).unwrap()).unwrap(),
        vec![4.0, 5.0]
    );
    assert!(grads.get(&unused2).is_none(), "unreached leaf");
    assert!(grads.get(&unused).is_none(), "leaf of an earlier tape");
    assert!(grads.get(&c).is_none(), "constant");
}

/// Saved tensors and gradients of processed nodes are gone before the walk
/// reaches the earlier nodes.
#[test]
fn backward_frees_as_it_goes() {
    let ad = Ad::new(RefBackend);
    let x = ad.leaf(
        RefBackend
            .from_f32(&[0.5, -1.0, 2.0, 0.1, 0.7, -0.3], &[2, 3])
            .unwrap(),
    );
    let a = ad.unary(&x, Unary::Silu).unwrap(); // saves x
    let b = ad.layer_norm(&a, 1e-5).unwrap(); // saves a
    let c = ad.l2_normalize(&b).unwrap(); // saves b
    let (a_data, b_data) = (Rc::clone(&a.value.data), Rc::clone(&b.value.data));
    drop((a, b));
    // Held by us and by the node that saved each.
    assert_eq!(Rc::strong_count(&a_data), 2);
    assert_eq!(Rc::strong_count(&b_data), 2);

    let ln_grad: Rc<std::cell::RefCell<Option<Weak<Vec<f64>>>>> = Default::default();
    let checked = Rc::new(std::cell::Cell::new(false));
    {
        let (ln_grad, checked, a_data, b_data) = (
            ln_grad.clone(),
            checked.clone(),
            a_data.clone(),
            b_data.clone(),
        );
        BACKWARD_HOOK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |name: &str, g: &RT| match name {
                "layer_norm" => {
                    // l2_normalize's node is done: b is only ours (+ this closure).
                    assert_eq!(Rc::strong_count(&b_data), 2, "b still saved");
                    *ln_grad.borrow_mut() = Some(Rc::downgrade(&g.data));
                }
                "unary" => {
                    assert_eq!(Rc::strong_count(&a_data), 2, "a still saved");
                    let w = ln_grad.borrow().clone().expect("layer_norm ran first");
                    assert!(w.upgrade().is_none(), "layer_norm's gradient still alive");
                    checked.set(true);
                }
                _ => {}
            }));
        });
    }
    let seed = RefBackend
        .from_f32(&[1.0, -2.0, 0.5, 0.3, 0.2, 1.0], &[2, 3])
        .unwrap();
    let grads = ad.backward(&[(&c, seed)]).unwrap();
    BACKWARD_HOOK.with(|h| *h.borrow_mut() = None);
    assert!(checked.get());
    assert!(grads.get(&x).is_some());
    assert_eq!(Rc::strong_count(&a_data), 1);
    assert_eq!(Rc::strong_count(&b_data), 1);
}

const CFG: &str = r#"
model:
  hnet: { arch_layout: ["c1", ["D1"], "c1"], d_model: [64, 64], num_heads: [4, 4], enc_dec_dim_factor: [2, null] }
data: { image_size: 64, num_classes: 10 }
"#;

#[test]
fn track_and_untrack_params() {
    let cfg = Config::from_yaml_str(CFG).unwrap();
    let spec = cfg.model_spec().unwrap();
    let (_, reg) = model::build(&spec);
    let w = model::init::init_weights(&spec, &reg, 1).unwrap();
    let p = Params::load(&RefBackend, reg, &w).unwrap();
    let ad = Ad::new(RefBackend);
    let tp = track_params(&ad, p.clone());
    for (info, t) in tp.registry.infos.iter().zip(&tp.tensors) {
        assert_eq!(t.is_tracked(), info.trainable, "{}", info.name);
    }
    assert_eq!(
        ad.tape_len(),
        tp.registry.infos.iter().filter(|i| i.trainable).count()
    );
    // Gradients come back per ParamId; a seed on one parameter reaches only it.
    let id = tp.registry.find("hnet.residual_proj.bias").unwrap();
    let t = tp.get(id).clone();
    let y = ad.affine(&t, 2.0, 0.0).unwrap();
    let n = ad.shape(&t)[0];
    let mut grads = ad
        .backward(&[(&y, RefBackend.from_f32(&vec![1.0; n], &[n]).unwrap())])
        .unwrap();
    let g = take_param_grads(&mut grads, &tp);
    assert_eq!(g.len(), tp.tensors.len());
    for (i, g) in g.iter().enumerate() {
        assert_eq!(g.is_some(), i == id.0);
    }
    let back = untrack_params(tp);
    for (a, b) in back.tensors.iter().zip(&p.tensors) {
        assert_eq!(a.data, b.data);
        assert_eq!(a.shape, b.shape);
    }
}
