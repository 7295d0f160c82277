//! Configuration: the release's YAML format (`model.hnet.*`, `training.*`,
//! `data.*`) plus a few keys of our own, and its validation into a
//! [`ModelSpec`] with every derived size.
//!
//! ```
//! # #[cfg(feature = "std")] {
//! let cfg = dcdit_core::config::Config::from_yaml_str(r#"
//! model:
//!   hnet: { arch_layout: ["c2", ["D2"], "c2"], d_model: [64, 64], num_heads: [4, 4],
//!           enc_dec_dim_factor: [2, null] }
//! data: { image_size: 64, num_classes: 10 }
//! "#).unwrap();
//! let spec = cfg.model_spec().unwrap();
//! assert_eq!((spec.width_d, spec.enc_dim, spec.height), (64, 32, 8));
//! # }
//! ```

use crate::error::{Error, Result};
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// One entry of `arch_layout`: a block string (`"c2"`) or a nested stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Layout {
    /// Block string such as `"c2"` or `"D12"`.
    Blocks(String),
    /// A nested stage.
    Stage(Vec<Layout>),
}

/// Which router scores boundaries (SPEC 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    /// The release's predictability router (conv residual scorer).
    #[default]
    Predictability,
    /// The paper's cosine-similarity router.
    Cosine,
}

/// `model.hnet.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HnetConfig {
    /// e.g. `["c2", ["D12"], "c2"]`.
    pub arch_layout: Vec<Layout>,
    /// Width per stage.
    pub d_model: Vec<usize>,
    /// Attention heads per stage.
    pub num_heads: Vec<usize>,
    /// Encoder/decoder width divisor per stage (`null` = none).
    pub enc_dec_dim_factor: Option<Vec<Option<usize>>>,
    /// Gaussian sigma of the de-chunk smoothing.
    pub dechunk_kernel_sigma: f32,
    /// Router and de-chunk in f32 (always true here; kept for the format).
    pub fp32_router_dechunk: bool,
    /// Our key: which router.
    pub router: RouterKind,
}

impl Default for HnetConfig {
    fn default() -> Self {
        HnetConfig {
            arch_layout: vec![
                Layout::Blocks("c2".into()),
                Layout::Stage(vec![Layout::Blocks("D12".into())]),
                Layout::Blocks("c2".into()),
            ],
            d_model: vec![768, 768],
            num_heads: vec![12, 12],
            enc_dec_dim_factor: None,
            dechunk_kernel_sigma: 1.0,
            fp32_router_dechunk: true,
            router: RouterKind::Predictability,
        }
    }
}

/// `model.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// `"DC-DiT"` (default) or `"DiT"` for the fixed-patch baseline.
    pub name: String,
    /// The H-Net scaffold.
    pub hnet: HnetConfig,
    /// MLP hidden width ratio of the DiT blocks.
    pub mlp_ratio: f32,
    /// Our key: latent channels (4 for the SD VAE, 1 for MNIST pixels).
    pub in_channels: usize,
    /// Our key: patch size of the DiT baseline.
    pub patch_size: usize,
    /// Our key: standard deviation of the class table's initial values
    /// (the release's 0.02 by default). A small model trained briefly
    /// learns class conditioning faster from a larger start, since Adam
    /// moves each entry by at most about the learning rate per step.
    pub class_embed_init_std: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            name: "DC-DiT".into(),
            hnet: HnetConfig::default(),
            mlp_ratio: 4.0,
            in_channels: 4,
            patch_size: 2,
            class_embed_init_std: 0.02,
        }
    }
}

/// `training.*` (the release's keys; used by training).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainingConfig {
    /// Global batch size.
    pub global_batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// EMA decay.
    pub ema_decay: f64,
    /// Gradient-norm clip.
    pub max_grad_norm: f64,
    /// Gradient accumulation steps.
    pub gradient_accumulation_steps: usize,
    /// Probability of replacing a label by the null class.
    pub class_dropout_prob: f32,
    /// Whether the model predicts the variance (2C output channels).
    pub learn_sigma: bool,
    /// lambda of the ratio loss.
    pub ratio_loss_weight: f32,
    /// Ratio loss group size (`null` = whole batch).
    pub ratio_batch_size: Option<usize>,
    /// Target compression N.
    pub downsample_factor: f32,
    /// Curriculum start N.
    pub downsample_factor_start: Option<f32>,
    /// Curriculum length in steps.
    pub downsample_factor_warmup_steps: usize,
    /// Multi-budget (elastic) training.
    pub multi_budget_training: bool,
    /// Drop fractions drawn in multi-budget training.
    pub multi_budget_drop_fractions: Vec<f32>,
    /// First step of multi-budget training.
    pub multi_budget_start_step: Option<usize>,
    /// Our key: seed of initialisation, data order, timesteps and noise.
    pub seed: u64,
    /// Our key: optimiser steps of a run.
    pub steps: u64,
    /// Our key: steps between log lines.
    pub log_every: u64,
    /// Our key: steps between checkpoints.
    pub ckpt_every: u64,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        TrainingConfig {
            global_batch_size: 256,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            ema_decay: 0.9999,
            max_grad_norm: 1.0,
            gradient_accumulation_steps: 1,
            class_dropout_prob: 0.1,
            learn_sigma: true,
            ratio_loss_weight: 0.03,
            ratio_batch_size: Some(16),
            downsample_factor: 4.0,
            downsample_factor_start: None,
            downsample_factor_warmup_steps: 0,
            multi_budget_training: false,
            multi_budget_drop_fractions: vec![0.0, 0.1, 0.2, 0.3],
            multi_budget_start_step: None,
            seed: 0,
            steps: 1000,
            log_every: 50,
            ckpt_every: 500,
        }
    }
}

/// `data.*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// Image side in pixels; the latent side is `image_size / 8`.
    pub image_size: usize,
    /// Number of classes (the null class is one more).
    pub num_classes: usize,
    /// Our key: latent grid height, overriding `image_size / 8` (non-square grids, pixel space).
    pub latent_height: Option<usize>,
    /// Our key: latent grid width, overriding `image_size / 8`.
    pub latent_width: Option<usize>,
    /// Our key: `mnist` (the bundled digits, pixel space) or `features`
    /// (the release's extracted latents under `feature_path`).
    pub source: String,
    /// Root of `imagenet{size}_features/` and `imagenet{size}_labels/`.
    pub feature_path: String,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            image_size: 256,
            num_classes: 1000,
            latent_height: None,
            latent_width: None,
            source: "features".into(),
            feature_path: "features".into(),
        }
    }
}

/// A whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Config {
    /// `model.*`.
    pub model: ModelConfig,
    /// `training.*`.
    pub training: TrainingConfig,
    /// `data.*`.
    pub data: DataConfig,
}

/// Which network a config describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// DC-DiT with the learned encoder/router/chunk/de-chunk/decoder.
    DcDit,
    /// The fixed-patch DiT baseline (SPEC 8).
    Dit,
}

/// A block of the encoder/decoder (`c`/`C`) or main network (`d`/`D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Convolutional residual block.
    Conv,
    /// DiT block with attention and MLP (`D`).
    Dit,
    /// DiT block with attention only (`d`).
    DitNoMlp,
}

/// Every size of a validated model, derived from a [`Config`].
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// DC-DiT or DiT.
    pub kind: ModelKind,
    /// Input latent channels C.
    pub in_channels: usize,
    /// Output channels (2C with learned sigma).
    pub out_channels: usize,
    /// Latent grid height.
    pub height: usize,
    /// Latent grid width.
    pub width: usize,
    /// Transformer width D.
    pub width_d: usize,
    /// Encoder/decoder width E.
    pub enc_dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Encoder blocks.
    pub encoder: Vec<BlockKind>,
    /// Main-network blocks.
    pub main: Vec<BlockKind>,
    /// Decoder blocks.
    pub decoder: Vec<BlockKind>,
    /// MLP hidden width.
    pub mlp_hidden: usize,
    /// Classes.
    pub num_classes: usize,
    /// Whether the class table has the extra null-class row (the release adds it
    /// only when `training.class_dropout_prob > 0`).
    pub null_class: bool,
    /// De-chunk sigma.
    pub sigma: f32,
    /// Router kind.
    pub router: RouterKind,
    /// Whether sigma is learned.
    pub learn_sigma: bool,
    /// Patch size (DiT baseline only; 1 for DC-DiT).
    pub patch: usize,
    /// Initial standard deviation of the class table (`model.class_embed_init_std`).
    pub class_embed_init_std: f64,
}

impl ModelSpec {
    /// Tokens per sample on the full grid.
    pub fn tokens(&self) -> usize {
        self.height * self.width
    }
    /// Router bottleneck width (`D / 4`).
    pub fn router_dim(&self) -> usize {
        self.width_d / 4
    }
}

fn parse_blocks(s: &str, field: &str) -> Result<Vec<BlockKind>> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    if b.is_empty() {
        return Err(Error::config(field, "empty block string"));
    }
    while i < b.len() {
        let kind = match b[i] {
            b'c' | b'C' => BlockKind::Conv,
            b'D' => BlockKind::Dit,
            b'd' => BlockKind::DitNoMlp,
            b't' | b'T' => {
                return Err(Error::config(
                    field,
                    format!("`{s}`: transformer (t/T) encoder blocks are not supported"),
                ))
            }
            _ => {
                return Err(Error::config(
                    field,
                    format!("`{s}`: expected blocks like \"c2\" or \"D12\""),
                ))
            }
        };
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let n: usize = s[start..i]
            .parse()
            .map_err(|_| Error::config(field, format!("`{s}`: missing block count")))?;
        out.extend(core::iter::repeat_n(kind, n));
    }
    Ok(out)
}

fn positive(v: usize, field: &str) -> Result<usize> {
    if v == 0 {
        Err(Error::config(field, "must be > 0"))
    } else {
        Ok(v)
    }
}

impl Config {
    /// Parses the YAML text of a config file.
    #[cfg(feature = "std")]
    pub fn from_yaml_str(text: &str) -> Result<Config> {
        serde_norway::from_str(text)
            .map_err(|e| Error::config("<yaml>", alloc::string::ToString::to_string(&e)))
    }

    /// Serialises back to YAML (e.g. to save the config used by a run).
    #[cfg(feature = "std")]
    pub fn to_yaml_string(&self) -> Result<String> {
        serde_norway::to_string(self)
            .map_err(|e| Error::config("<yaml>", alloc::string::ToString::to_string(&e)))
    }

    /// Latent grid `(height, width)`.
    pub fn grid(&self) -> Result<(usize, usize)> {
        let d = &self.data;
        let side = d.image_size / 8;
        let h = d.latent_height.unwrap_or(side);
        let w = d.latent_width.unwrap_or(side);
        if d.latent_height.is_none() && !d.image_size.is_multiple_of(8) {
            return Err(Error::config(
                "data.image_size",
                format!("{} is not a multiple of 8", d.image_size),
            ));
        }
        let field = |set: bool, key| if set { key } else { "data.image_size" };
        positive(h, field(d.latent_height.is_some(), "data.latent_height"))?;
        positive(w, field(d.latent_width.is_some(), "data.latent_width"))?;
        Ok((h, w))
    }

    /// Validates the config and derives every size.
    pub fn model_spec(&self) -> Result<ModelSpec> {
        let m = &self.model;
        let hn = &m.hnet;
        let kind = match m.name.as_str() {
            "DiT" | "dit" => ModelKind::Dit,
            "DC-DiT" | "dcdit" | "DCDiT" | "" => ModelKind::DcDit,
            other => {
                return Err(Error::config(
                    "model.name",
                    format!("unknown model `{other}` (expected DC-DiT or DiT)"),
                ))
            }
        };
        let (height, width) = self.grid()?;
        let d = *hn
            .d_model
            .first()
            .ok_or_else(|| Error::config("model.hnet.d_model", "empty"))?;
        positive(d, "model.hnet.d_model")?;
        if hn.d_model.iter().any(|&x| x != d) {
            return Err(Error::config(
                "model.hnet.d_model",
                "stages of different widths need a multi-stage hierarchy, which is not supported",
            ));
        }
        let heads = *hn
            .num_heads
            .first()
            .ok_or_else(|| Error::config("model.hnet.num_heads", "empty"))?;
        positive(heads, "model.hnet.num_heads")?;
        if d % heads != 0 {
            return Err(Error::config(
                "model.hnet.num_heads",
                format!("{heads} heads do not divide d_model {d}"),
            ));
        }
        let factor = hn
            .enc_dec_dim_factor
            .as_ref()
            .and_then(|f| f.first().copied().flatten());
        let enc_dim = match factor {
            Some(0) => {
                return Err(Error::config(
                    "model.hnet.enc_dec_dim_factor",
                    "must be > 0",
                ))
            }
            Some(f) if d % f != 0 => {
                return Err(Error::config(
                    "model.hnet.enc_dec_dim_factor",
                    format!("{f} does not divide d_model {d}"),
                ))
            }
            Some(f) => d / f,
            None => d,
        };
        let in_channels = positive(m.in_channels, "model.in_channels")?;
        positive(self.data.num_classes, "data.num_classes")?;
        if !(m.mlp_ratio > 0.0 && m.mlp_ratio.is_finite()) {
            return Err(Error::config(
                "model.mlp_ratio",
                "must be a positive number",
            ));
        }
        let mlp_hidden = (d as f32 * m.mlp_ratio) as usize;
        positive(mlp_hidden, "model.mlp_ratio")?;
        if d % 4 != 0 {
            return Err(Error::config(
                "model.hnet.d_model",
                format!("{d} must be divisible by 4 (2D sin-cos position table)"),
            ));
        }
        let lay = &hn.arch_layout;
        let field = "model.hnet.arch_layout";
        let (encoder, main, decoder) = match lay.as_slice() {
            [Layout::Blocks(e), Layout::Stage(inner), Layout::Blocks(dec)] => {
                let main = match inner.as_slice() {
                    [Layout::Blocks(s)] => parse_blocks(s, field)?,
                    _ => {
                        return Err(Error::config(
                            field,
                            "nested multi-stage hierarchies are not supported (one stage only)",
                        ))
                    }
                };
                (parse_blocks(e, field)?, main, parse_blocks(dec, field)?)
            }
            [Layout::Blocks(s)] => (Vec::new(), parse_blocks(s, field)?, Vec::new()),
            _ => {
                return Err(Error::config(
                    field,
                    "expected [\"cN\", [\"DM\"], \"cK\"] (or [\"DM\"] for the DiT baseline)",
                ))
            }
        };
        if encoder
            .iter()
            .chain(&decoder)
            .any(|b| *b != BlockKind::Conv)
        {
            return Err(Error::config(
                field,
                "encoder/decoder must be conv blocks (c/C)",
            ));
        }
        if main.contains(&BlockKind::Conv) {
            return Err(Error::config(
                field,
                "main network must be DiT blocks (d/D)",
            ));
        }
        if main.is_empty() {
            return Err(Error::config(field, "main network has no blocks"));
        }
        let sigma = hn.dechunk_kernel_sigma;
        let out_channels = if self.training.learn_sigma {
            2 * in_channels
        } else {
            in_channels
        };
        let mut spec = ModelSpec {
            kind,
            in_channels,
            out_channels,
            height,
            width,
            width_d: d,
            enc_dim,
            heads,
            encoder,
            main,
            decoder,
            mlp_hidden,
            num_classes: self.data.num_classes,
            null_class: self.training.class_dropout_prob > 0.0,
            sigma,
            router: hn.router,
            learn_sigma: self.training.learn_sigma,
            patch: 1,
            class_embed_init_std: m.class_embed_init_std,
        };
        if !(m.class_embed_init_std.is_finite() && m.class_embed_init_std >= 0.0) {
            return Err(Error::config(
                "model.class_embed_init_std",
                format!(
                    "{} is not a finite non-negative number",
                    m.class_embed_init_std
                ),
            ));
        }
        match kind {
            ModelKind::Dit => {
                let p = positive(m.patch_size, "model.patch_size")?;
                if height % p != 0 || width % p != 0 {
                    return Err(Error::config(
                        "model.patch_size",
                        format!("{p} does not divide the {height}x{width} grid"),
                    ));
                }
                spec.patch = p;
                spec.encoder.clear();
                spec.decoder.clear();
            }
            ModelKind::DcDit => {
                if spec.encoder.is_empty() || spec.decoder.is_empty() {
                    return Err(Error::config(
                        field,
                        "DC-DiT needs encoder and decoder blocks, e.g. [\"c2\", [\"D12\"], \"c2\"]",
                    ));
                }
                if !(sigma > 0.0 && sigma.is_finite()) {
                    return Err(Error::config(
                        "model.hnet.dechunk_kernel_sigma",
                        "must be a positive number",
                    ));
                }
                for (c, what) in [(enc_dim, "encoder/decoder width"), (d, "d_model")] {
                    if c % 32 != 0 {
                        return Err(Error::config(
                            "model.hnet.enc_dec_dim_factor",
                            format!("GroupNorm(32) needs the {what} ({c}) divisible by 32"),
                        ));
                    }
                }
                if spec.router == RouterKind::Predictability && !spec.router_dim().is_multiple_of(8)
                {
                    return Err(Error::config(
                        "model.hnet.d_model",
                        format!(
                            "the predictability router's GroupNorm(8) needs d_model/4 ({}) divisible by 8",
                            spec.router_dim()
                        ),
                    ));
                }
            }
        }
        Ok(spec)
    }
}
