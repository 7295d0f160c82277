#!/usr/bin/env bash
# The test command of README.md: installs what it needs on a fresh machine,
# then runs format, lint, docs and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Needs the Rust toolchain (cargo, rustfmt, clippy) and the packages of
# scripts/setup.sh (glslc for the Vulkan shaders; the Vulkan loader and Mesa's
# lavapipe so the differential suite CPU vs Vulkan runs without a GPU). Every
# crate comes from crates.io and all test data ships in the repository.
bash scripts/setup.sh
# The differential suite must not pass silently without a Vulkan device.
export DCDIT_REQUIRE_VULKAN=1
# CI runs the differential suite on a fixed quickcheck seed, so a run is
# reproducible; unset it (or pick another) to explore new random cases locally.
export DCDIT_DIFF_SEED="${DCDIT_DIFF_SEED:-7}"

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# The core must build without std.
RUSTFLAGS="-D warnings" cargo build -p dcdit-core --no-default-features --target-dir target/nostd
cargo test --release -p dcdit-core --no-default-features --lib
cargo test --workspace --release
# The Vulkan backend's other paths on the same cases: device-local buffers
# filled and read through staging copies (what a discrete GPU uses), and the
# kernels without subgroup operations (devices that lack them).
DCDIT_VK_STAGING=1 DCDIT_VK_NO_SUBGROUP=1 cargo test --release -p dcdit-tests --test differential --test differential_model
