//! Whole-model gradients: a tiny DC-DiT (`["c1", ["D1"], "c1"]`, d_model 64,
//! 8x8 latent grid, batch 2) runs through `Model<Autodiff<CpuBackend>>` with
//! its parameters made leaves (`track_model`); the loss
//! `sum(r * out) + sum(r_p * p)` is seeded into the output and into the
//! router probabilities `Routing::p` (as training seeds the ratio loss), and
//! gradients of parameters all over the network (router included) are
//! checked against f32 central finite differences on the plain CPU model,
//! perturbing one weight entry in the `TensorMap` and reloading.
//!
//! The forward value of the straight-through estimator is exactly 1, so a
//! finite difference of the plain model cannot see the gate path. The oracle
//! model therefore runs on [`SteProbe`], a CPU backend whose `ste(q)` returns
//! `1 + (q - q0)`, `q0` the gate input of the unperturbed run: the same
//! forward value at the base point, and derivative 1 w.r.t. `q`, as the STE
//! defines. The test also checks that finite differences with the plain STE
//! (ones) miss a large part of the router's gradient, i.e. the router does
//! get a gradient through the gate.

#![allow(clippy::type_complexity)]

use std::cell::RefCell;
use std::rc::Rc;

use dcdit_autodiff::{take_param_grads, track_model, untrack_model, Autodiff};
use dcdit_backend_cpu::{CpuBackend, CpuTensor};
use dcdit_core::backend::{Backend, Binary, DType, Grid, Segments, Unary};
use dcdit_core::config::Config;
use dcdit_core::model::params::download;
use dcdit_core::model::{self, Model, TailDrop};
use dcdit_core::rng::Rng;
use dcdit_core::weights::TensorMap;
use dcdit_core::Result;

/// What `SteProbe::ste` does.
#[derive(Clone, Debug)]
enum SteMode {
    /// Exactly ones (the real STE forward).
    Ones,
    /// Ones, and remember the input.
    Record,
    /// `1 + (q - q0)`.
    Linear(Vec<f32>),
}

/// The CPU backend with an instrumented straight-through estimator.
#[derive(Clone, Debug)]
struct SteProbe {
    cpu: CpuBackend,
    mode: Rc<RefCell<SteMode>>,
    recorded: Rc<RefCell<Option<Vec<f32>>>>,
}

impl Backend for SteProbe {
    type Tensor = CpuTensor;
    fn name(&self) -> String {
        "ste-probe".into()
    }
    fn shape(&self, t: &CpuTensor) -> Vec<usize> {
        self.cpu.shape(t)
    }
    fn dtype(&self, t: &CpuTensor) -> DType {
        self.cpu.dtype(t)
    }
    fn from_f32(&self, d: &[f32], s: &[usize]) -> Result<CpuTensor> {
        self.cpu.from_f32(d, s)
    }
    fn to_f32(&self, t: &CpuTensor) -> Result<Vec<f32>> {
        self.cpu.to_f32(t)
    }
    fn cast(&self, t: &CpuTensor, d: DType) -> Result<CpuTensor> {
        self.cpu.cast(t, d)
    }
    fn reshape(&self, t: &CpuTensor, s: &[usize]) -> Result<CpuTensor> {
        self.cpu.reshape(t, s)
    }
    fn linear(&self, x: &CpuTensor, w: &CpuTensor, b: Option<&CpuTensor>) -> Result<CpuTensor> {
        self.cpu.linear(x, w, b)
    }
    fn conv2d(
        &self,
        x: &CpuTensor,
        g: Grid,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        k: usize,
    ) -> Result<CpuTensor> {
        self.cpu.conv2d(x, g, w, b, k)
    }
    fn depthwise_conv3x3(&self, x: &CpuTensor, g: Grid, w: &CpuTensor) -> Result<CpuTensor> {
        self.cpu.depthwise_conv3x3(x, g, w)
    }
    fn group_norm(
        &self,
        x: &CpuTensor,
        g: Grid,
        n: usize,
        ga: &CpuTensor,
        be: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        self.cpu.group_norm(x, g, n, ga, be, eps)
    }
    fn layer_norm(&self, x: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        self.cpu.layer_norm(x, eps)
    }
    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        self.cpu.rms_norm(x, w, eps)
    }
    fn l2_normalize(&self, x: &CpuTensor) -> Result<CpuTensor> {
        self.cpu.l2_normalize(x)
    }
    fn unary(&self, x: &CpuTensor, op: Unary) -> Result<CpuTensor> {
        self.cpu.unary(x, op)
    }
    fn binary(&self, a: &CpuTensor, b: &CpuTensor, op: Binary) -> Result<CpuTensor> {
        self.cpu.binary(a, b, op)
    }
    fn affine(&self, x: &CpuTensor, a: f32, b: f32) -> Result<CpuTensor> {
        self.cpu.affine(x, a, b)
    }
    fn row_sum(&self, x: &CpuTensor) -> Result<CpuTensor> {
        self.cpu.row_sum(x)
    }
    fn scale_rows(&self, x: &CpuTensor, s: &CpuTensor) -> Result<CpuTensor> {
        self.cpu.scale_rows(x, s)
    }
    fn ste(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let mode = self.mode.borrow().clone();
        match mode {
            SteMode::Ones => self.cpu.ste(x),
            SteMode::Record => {
                *self.recorded.borrow_mut() = Some(self.cpu.to_f32(x)?);
                self.cpu.ste(x)
            }
            SteMode::Linear(q0) => {
                let q = self.cpu.to_f32(x)?;
                let v: Vec<f32> = q.iter().zip(&q0).map(|(a, b)| 1.0 + (a - b)).collect();
                self.cpu.from_f32(&v, &self.cpu.shape(x))
            }
        }
    }
    fn add_segment(&self, x: &CpuTensor, v: &CpuTensor, seg: Segments) -> Result<CpuTensor> {
        self.cpu.add_segment(x, v, seg)
    }
    fn modulate(
        &self,
        x: &CpuTensor,
        a: &CpuTensor,
        s0: usize,
        s1: usize,
        seg: Segments,
    ) -> Result<CpuTensor> {
        self.cpu.modulate(x, a, s0, s1, seg)
    }
    fn gated_add(
        &self,
        x: &CpuTensor,
        y: &CpuTensor,
        a: &CpuTensor,
        g: usize,
        seg: Segments,
    ) -> Result<CpuTensor> {
        self.cpu.gated_add(x, y, a, g, seg)
    }
    fn gather_rows(&self, x: &CpuTensor, idx: &[u32]) -> Result<CpuTensor> {
        self.cpu.gather_rows(x, idx)
    }
    fn scatter_add_rows(&self, x: &CpuTensor, idx: &[u32], rows: usize) -> Result<CpuTensor> {
        self.cpu.scatter_add_rows(x, idx, rows)
    }
    fn attention(&self, qkv: &CpuTensor, heads: usize, seg: Segments) -> Result<CpuTensor> {
        self.cpu.attention(qkv, heads, seg)
    }
    fn dechunk_smooth(
        &self,
        h: &CpuTensor,
        p: &CpuTensor,
        pos: &[u32],
        w: usize,
        s: f32,
        seg: Segments,
    ) -> Result<CpuTensor> {
        self.cpu.dechunk_smooth(h, p, pos, w, s, seg)
    }
}

fn config(router: &str) -> Config {
    Config::from_yaml_str(&format!(
        r#"
model:
  hnet: {{ arch_layout: ["c1", ["D1"], "c1"], d_model: [64, 64], num_heads: [4, 4], enc_dec_dim_factor: [2, null], router: {router} }}
data: {{ image_size: 64, num_classes: 10 }}
"#
    ))
    .unwrap()
}

/// SPEC 10 initial values plus noise, so that no path is switched off by a
/// zero initialisation (adaLN-Zero, the zero final layer) and the router
/// keeps a mix of tokens.
fn weights(cfg: &Config, seed: u64) -> TensorMap {
    let spec = cfg.model_spec().unwrap();
    let (_, reg) = model::build(&spec);
    let mut w = model::init::init_weights(&spec, &reg, seed).unwrap();
    let mut rng = Rng::new(seed + 100);
    for (name, t) in w.tensors.iter_mut() {
        if name == "pos_embed" {
            continue;
        }
        let std = if name.contains("adaLN") || name.starts_with("final_layer") {
            0.1
        } else if name.contains("routing_module") {
            0.3
        } else {
            0.05
        };
        for v in t.data.iter_mut() {
            *v += (rng.normal() * std) as f32;
        }
        if name == "hnet.routing_module.residual_scorer.3.bias" {
            t.data.iter_mut().for_each(|v| *v = 0.0);
        }
    }
    w
}

struct Setup {
    cfg: Config,
    w: TensorMap,
    x: Vec<f32>,
    t: Vec<f32>,
    y: Vec<u32>,
    tail: TailDrop,
    r_out: Vec<f32>,
    r_p: Vec<f32>,
}

impl Setup {
    fn new(router: &str, tail: TailDrop, seed: u64) -> Setup {
        let cfg = config(router);
        let w = weights(&cfg, seed);
        let spec = cfg.model_spec().unwrap();
        let (b, l) = (2, spec.tokens());
        let mut rng = Rng::new(seed + 7);
        let mut nrm = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        Setup {
            x: nrm(b * spec.in_channels * l),
            r_out: nrm(b * l * spec.out_channels),
            r_p: nrm(b * l),
            t: vec![37.0, 640.0],
            y: vec![3, 8],
            tail,
            cfg,
            w,
        }
    }

    /// The loss on a plain backend (f64 sum of f32 outputs) and the routing mask.
    fn loss<B: Backend>(&self, b: &B, w: &TensorMap) -> (f64, Vec<bool>, Vec<bool>) {
        let m = Model::load(b, &self.cfg, w).unwrap();
        let x = m.input_from_nchw(b, &self.x, 2).unwrap();
        let out = m.forward(b, &x, &self.t, &self.y, &self.tail).unwrap();
        let o = b.to_f32(&out.out).unwrap();
        let r = out.routing.unwrap();
        let p = b.to_f32(&r.p).unwrap();
        let dot = |a: &[f32], c: &[f32]| {
            a.iter()
                .zip(c)
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum::<f64>()
        };
        (dot(&o, &self.r_out) + dot(&p, &self.r_p), r.mask, r.natural)
    }
}

/// Autodiff gradients of every parameter (release layout), and the kept counts.
fn autodiff_grads(s: &Setup) -> (Vec<(String, bool, Option<Vec<f32>>)>, Vec<usize>) {
    let cpu = CpuBackend::with_threads(2);
    let ad = Autodiff::new(cpu.clone());
    let plain = Model::load(&cpu, &s.cfg, &s.w).unwrap();
    let m = track_model(&ad, plain);
    let x = m.input_from_nchw(&ad, &s.x, 2).unwrap();
    let out = m.forward(&ad, &x, &s.t, &s.y, &s.tail).unwrap();
    let routing = out.routing.as_ref().unwrap();
    assert!(out.out.is_tracked() && routing.p.is_tracked());
    let seeds = [
        (
            &out.out,
            cpu.from_f32(&s.r_out, &ad.shape(&out.out)).unwrap(),
        ),
        (
            &routing.p,
            cpu.from_f32(&s.r_p, &ad.shape(&routing.p)).unwrap(),
        ),
    ];
    let mut grads = ad.backward(&seeds).unwrap();
    assert_eq!(ad.tape_len(), 0);
    let g = take_param_grads(&mut grads, &m.params);
    let kept = routing.kept.clone();
    let res = m
        .params
        .registry
        .infos
        .iter()
        .zip(g)
        .map(|(info, g)| {
            let host = g.map(|g| {
                assert_eq!(
                    cpu.shape(&g),
                    cpu.shape(
                        &m.params.tensors[m.params.registry.find(&info.name).unwrap().0].value
                    ),
                    "{}",
                    info.name
                );
                download(&cpu, info, &g).unwrap()
            });
            (info.name.clone(), info.trainable, host)
        })
        .collect();
    // The plain model comes back unchanged.
    let back = untrack_model(m);
    assert_eq!(back.params.to_host(&cpu).unwrap(), s.w);
    (res, kept)
}

/// Central differences of the loss w.r.t. one entry, on `b`; `None` when the
/// perturbation changes a routing decision (the loss is discontinuous there).
fn fd_entry<B: Backend>(
    s: &Setup,
    b: &B,
    name: &str,
    i: usize,
    eps: f32,
    base: &(Vec<bool>, Vec<bool>),
) -> Option<f64> {
    let at = |d: f32| {
        let mut w = s.w.clone();
        w.tensors.get_mut(name).unwrap().data[i] += d;
        let (l, mask, nat) = s.loss(b, &w);
        (l, mask == base.0 && nat == base.1)
    };
    let (lp, okp) = at(eps);
    let (lm, okm) = at(-eps);
    (okp && okm).then(|| (lp - lm) / (2.0 * eps as f64))
}

/// [`fd_entry`] with a smaller step when a routing decision flips (f32
/// noise grows as the step shrinks, so the largest step that works is used).
fn fd_adaptive<B: Backend>(
    s: &Setup,
    b: &B,
    name: &str,
    i: usize,
    eps: f32,
    base: &(Vec<bool>, Vec<bool>),
) -> Option<(f64, f32)> {
    [eps, eps / 4.0, eps / 10.0]
        .iter()
        .find_map(|&e| fd_entry(s, b, name, i, e, base).map(|fd| (fd, e)))
}

/// Indices of the largest-|g| entries and a few random ones with |g| above
/// a tenth of the largest.
fn pick(g: &[f32], rng: &mut Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..g.len()).collect();
    idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let mx = g[idx[0]].abs();
    let mut out: Vec<usize> = idx.iter().take(3).copied().collect();
    let big: Vec<usize> = idx
        .iter()
        .copied()
        .filter(|&i| g[i].abs() > 0.1 * mx)
        .collect();
    for _ in 0..2 {
        let c = big[rng.below(big.len())];
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

fn probe(cpu: &CpuBackend) -> SteProbe {
    SteProbe {
        cpu: cpu.clone(),
        mode: Rc::new(RefCell::new(SteMode::Ones)),
        recorded: Rc::new(RefCell::new(None)),
    }
}

fn check_model(router: &str, tail: TailDrop, seed: u64, names: &[&str], router_names: &[&str]) {
    let s = Setup::new(router, tail, seed);
    let (grads, kept) = autodiff_grads(&s);
    let l = s.cfg.model_spec().unwrap().tokens();
    assert!(
        kept.iter().all(|&k| k > 2 && k < l) && kept[0] != kept[1],
        "want a mix of kept tokens and different segment lengths, got {kept:?}"
    );

    // Every trainable parameter gets a gradient, fixed buffers none.
    for (name, trainable, g) in &grads {
        assert_eq!(g.is_some(), *trainable, "{name}");
        if let Some(g) = g {
            assert!(g.iter().all(|v| v.is_finite()), "{name}");
        }
    }
    let grad = |n: &str| {
        grads
            .iter()
            .find(|(k, _, _)| k == n)
            .unwrap_or_else(|| panic!("no parameter {n}"))
            .2
            .clone()
            .unwrap()
    };

    // The oracle: the plain model with the STE's derivative made visible.
    let cpu = CpuBackend::with_threads(2);
    let pb = probe(&cpu);
    *pb.mode.borrow_mut() = SteMode::Record;
    let (_, mask, nat) = s.loss(&pb, &s.w);
    let q0 = pb.recorded.borrow_mut().take().unwrap();
    *pb.mode.borrow_mut() = SteMode::Linear(q0);
    let base = (mask, nat);

    let eps = 1e-2;
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    let mut checked_total = 0;
    for &name in names.iter().chain(router_names) {
        let g = grad(name);
        let mx = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(mx > 1e-4, "{name}: gradient is (nearly) zero everywhere");
        let mut checked = 0;
        for i in pick(&g, &mut rng) {
            let Some((fd, e)) = fd_adaptive(&s, &pb, name, i, eps, &base) else {
                continue;
            };
            checked += 1;
            let err = (g[i] as f64 - fd).abs();
            let ok = err <= 2e-2 * fd.abs() + 2e-3 * mx as f64;
            report.push(format!(
                "{name}[{i}]: autodiff {:.6} fd {:.6} (rel {:.1e}, eps {e})",
                g[i],
                fd,
                err / fd.abs().max(1e-12)
            ));
            if !ok {
                failures.push(report.last().unwrap().clone());
            }
        }
        assert!(
            checked >= 1,
            "{name}: routing flipped under every perturbation"
        );
        checked_total += checked;
    }
    if std::env::var("AD_REPORT").is_ok() {
        eprintln!("{}", report.join("\n"));
    }
    assert!(
        failures.is_empty(),
        "{} of {checked_total} entries off:\n{}\nall:\n{}",
        failures.len(),
        failures.join("\n"),
        report.join("\n")
    );

    // The STE gives the router a gradient through the gate: finite
    // differences with the true STE forward (ones) miss it.
    let ones = probe(&cpu);
    let mut gate_share = Vec::new();
    for &name in router_names {
        let g = grad(name);
        let (mut diff, mut norm) = (0f64, 0f64);
        for i in pick(&g, &mut rng) {
            let Some((fd, _)) = fd_adaptive(&s, &ones, name, i, eps, &base) else {
                continue;
            };
            diff += (g[i] as f64 - fd).powi(2);
            norm += (g[i] as f64).powi(2);
        }
        assert!(
            norm > 0.0,
            "{name}: routing flipped under every perturbation"
        );
        gate_share.push((name, (diff / norm).sqrt()));
    }
    // Per parameter the share can be small (the bias of the scorer moves every
    // gate of a token in one direction, and natural tokens' gates (q = p) and
    // the others' (q = 1 - p) cancel), so ask for a sizeable share somewhere.
    if std::env::var("AD_REPORT").is_ok() {
        eprintln!("gate-path share of the router gradient: {gate_share:?}");
    }
    assert!(
        gate_share.iter().any(|(_, r)| *r > 0.2),
        "the gate path should carry a sizeable part of the router's gradient: {gate_share:?}"
    );
}

const COMMON: &[&str] = &[
    "x_embedder.proj.weight",
    "t_embedder.mlp.0.weight",
    "y_embedder.embedding_table.weight",
    "hnet.encoder.layers.0.conv1.weight",
    "hnet.encoder.layers.0.norm1.weight",
    "hnet.encoder.rmsnorm.weight",
    "hnet.residual_proj.weight",
    "hnet.main_network.main_network.layers.0.adaLN_modulation.1.weight",
    "hnet.main_network.main_network.layers.0.attn.qkv.weight",
    "hnet.main_network.main_network.layers.0.mlp.fc1.weight",
    "hnet.main_network.main_network.rmsnorm.weight",
    "hnet.decoder.layers.0.conv2.weight",
    "hnet.decoder.layers.0.skip_proj.weight",
    "final_layer.adaLN_modulation.1.weight",
    "final_layer.linear.bias",
];

#[test]
fn predictability_router_model_gradients() {
    check_model(
        "predictability",
        TailDrop::None,
        1,
        COMMON,
        &[
            "hnet.routing_module.proj.weight",
            "hnet.routing_module.context_predictor.weight",
            "hnet.routing_module.residual_scorer.1.weight",
            "hnet.routing_module.residual_scorer.3.weight",
            "hnet.routing_module.residual_scorer.3.bias",
        ],
    );
}

#[test]
fn cosine_router_model_gradients() {
    check_model(
        "cosine",
        TailDrop::None,
        2,
        COMMON,
        &[
            "hnet.routing_module.q_proj.weight",
            "hnet.routing_module.k_proj.weight",
            "hnet.routing_module.k_smooth.weight",
        ],
    );
}

/// With tail dropping, kept tokens differ from the natural boundaries (the
/// gate follows the natural ones).
#[test]
fn tail_drop_model_gradients() {
    check_model(
        "predictability",
        TailDrop::PerSample(vec![0.3, 0.5]),
        3,
        &[
            "hnet.main_network.main_network.layers.0.attn.qkv.weight",
            "hnet.residual_proj.weight",
            "final_layer.adaLN_modulation.1.weight",
        ],
        &[
            "hnet.routing_module.residual_scorer.3.weight",
            "hnet.routing_module.proj.weight",
        ],
    );
}
