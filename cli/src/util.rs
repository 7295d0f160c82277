//! File helpers shared by the subcommands.

use anyhow::{Context, Result};
use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::Config;
use dcdit_core::weights::TensorMap;
use std::path::Path;

/// Reads and validates a YAML config.
pub fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    let cfg = Config::from_yaml_str(&text)
        .with_context(|| format!("parsing config {}", path.display()))?;
    cfg.model_spec()
        .with_context(|| format!("config {}", path.display()))?;
    Ok(cfg)
}

/// Reads a safetensors file.
pub fn read_tensors(path: &Path) -> Result<TensorMap> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    TensorMap::from_safetensors(&bytes).with_context(|| format!("loading {}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder,
/// fsync, rename, fsync of the folder. A run killed at any instant leaves
/// either the old file or the new one, never a partial one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res.with_context(|| format!("writing {}", path.display()))
}

/// Compute backends.
#[derive(Clone, Copy, clap::ValueEnum, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// Multi-threaded CPU backend.
    #[default]
    Cpu,
    /// Vulkan compute (any Vulkan 1.1 device; see `dcdit-cli devices`).
    Vulkan,
}

/// Backend selection shared by the commands.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct Dev {
    /// Compute backend.
    #[arg(long, value_enum, default_value = "cpu")]
    pub backend: BackendKind,
    /// Vulkan device index (see `dcdit-cli devices`).
    #[arg(long, default_value = "0")]
    pub device: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Runs `$body` with `$b` bound to the backend `$dev` selects (the body is
/// compiled once per backend type, so it is written once, generically).
#[macro_export]
macro_rules! with_backend {
    ($dev:expr, $b:ident, $body:block) => {{
        let dev: $crate::util::Dev = $dev;
        match dev.backend {
            $crate::util::BackendKind::Cpu => {
                let $b = $crate::util::cpu(dev.threads)?;
                // The body runs on the pool's first thread: each op then runs
                // inline instead of being handed to a worker (see
                // `CpuBackend::install`).
                $b.clone().install(|| -> anyhow::Result<_> { Ok($body) })?
            }
            $crate::util::BackendKind::Vulkan => {
                let $b = $crate::util::vulkan(dev.device)?;
                $body
            }
        }
    }};
}

/// The Vulkan backend on device `index`.
pub fn vulkan(index: usize) -> Result<dcdit_backend_vulkan::VulkanBackend> {
    let b = dcdit_backend_vulkan::VulkanBackend::new(index)?;
    eprintln!("backend: {}", dcdit_core::Backend::name(&b));
    Ok(b)
}

/// The CPU backend with `threads` threads (default: all cores).
pub fn cpu(threads: Option<usize>) -> Result<CpuBackend> {
    Ok(match threads {
        Some(n) => CpuBackend::try_with_threads(n)?,
        None => CpuBackend::new(),
    })
}

/// Parses `0.3` or `0,0.5,0.9` into fractions.
pub fn parse_fractions(s: &str, flag: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<f32>()
                .with_context(|| format!("{flag}: `{p}` is not a number"))
        })
        .collect()
}
