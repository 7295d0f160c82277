//! FLOPs per component, counted from what a forward actually computed (kept
//! tokens only), with the release's conventions: a multiply-add is 2 FLOPs,
//! matrix products and convolutions are counted, element-wise work is not,
//! and the attention kernel costs `heads * sum_i L_i^2 * (4 d_head + 3)`.

use core::fmt;
use core::ops::{Add, AddAssign};

/// Components of one forward pass, named as in the release's FLOP breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    /// Patch, timestep and class embeddings.
    Embeddings,
    /// Conv encoder (and residual branch).
    Encoder,
    /// Router scoring.
    Routing,
    /// Chunk (gather; no FLOPs in the release's convention).
    Chunk,
    /// DiT blocks.
    MainNetwork,
    /// Distance-weighted smoothing and plug-back.
    Dechunk,
    /// Conv decoder.
    Decoder,
    /// Final adaLN layer and projection.
    FinalLayer,
}

impl Component {
    /// All components, in forward order.
    pub const ALL: [Component; 8] = [
        Component::Embeddings,
        Component::Encoder,
        Component::Routing,
        Component::Chunk,
        Component::MainNetwork,
        Component::Dechunk,
        Component::Decoder,
        Component::FinalLayer,
    ];
    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Embeddings => "embeddings",
            Component::Encoder => "encoder",
            Component::Routing => "routing",
            Component::Chunk => "chunk",
            Component::MainNetwork => "main_network",
            Component::Dechunk => "dechunk",
            Component::Decoder => "decoder",
            Component::FinalLayer => "final_layer",
        }
    }
}

/// FLOPs per component.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlopCount {
    counts: [u64; 8],
}

impl FlopCount {
    /// FLOPs of one component.
    pub fn get(&self, c: Component) -> u64 {
        self.counts[c as usize]
    }
    /// Sum over components.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    /// Adds raw FLOPs to a component.
    pub fn add(&mut self, c: Component, flops: u64) {
        self.counts[c as usize] += flops;
    }
    /// A `(rows, k) x (k, m)` product.
    pub fn linear(&mut self, c: Component, rows: usize, k: usize, m: usize) {
        self.add(c, 2 * (rows * k * m) as u64);
    }
    /// A `k x k` convolution producing `rows` pixels of `cout` channels from `cin`.
    pub fn conv(&mut self, c: Component, rows: usize, cin: usize, cout: usize, k: usize) {
        self.add(c, 2 * (rows * cin * cout * k * k) as u64);
    }
    /// Packed attention over sequences of the given lengths.
    pub fn attention(
        &mut self,
        c: Component,
        lens: impl Iterator<Item = usize>,
        heads: usize,
        d_head: usize,
    ) {
        let pairs: u64 = lens.map(|l| (l * l) as u64).sum();
        self.add(c, pairs * (heads * (4 * d_head + 3)) as u64);
    }
}

impl Add for FlopCount {
    type Output = FlopCount;
    fn add(mut self, o: FlopCount) -> FlopCount {
        self += o;
        self
    }
}

impl AddAssign for FlopCount {
    fn add_assign(&mut self, o: FlopCount) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
    }
}

impl fmt::Display for FlopCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in Component::ALL {
            writeln!(
                f,
                "{:<14} {:>10.3} GFLOP",
                c.name(),
                self.get(c) as f64 / 1e9
            )?;
        }
        write!(
            f,
            "{:<14} {:>10.3} GFLOP",
            "total",
            self.total() as f64 / 1e9
        )
    }
}
