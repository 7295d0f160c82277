#!/usr/bin/env bash
# The test command of README.md: installs what it needs on a fresh machine,
# then runs format, lint, docs and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

# Toolchain components (rustup ships them; no-ops when present).
if command -v rustup >/dev/null 2>&1; then
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# The core must build without std.
RUSTFLAGS="-D warnings" cargo build -p dcdit-core --no-default-features --target-dir target/nostd
cargo test --release -p dcdit-core --no-default-features --lib
cargo test --workspace --release
