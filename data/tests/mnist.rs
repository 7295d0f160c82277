//! The bundled MNIST file: loading, corruption errors, the split.

use dcdit_data::mnist::{Mnist, HEADER_LEN};
use dcdit_data::Error;
use std::collections::HashSet;

fn bundled_bytes() -> Vec<u8> {
    std::fs::read(Mnist::bundled_path()).expect("bundled mnist.bin")
}

fn err_text(r: dcdit_data::Result<Mnist>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bundled_file_loads() {
    let m = Mnist::load_bundled().unwrap();
    assert_eq!(m.len(), 10_000);
    assert_eq!((m.rows, m.cols), (28, 28));
    assert_eq!(m.images.len(), 10_000 * 784);
    // Every class is present in roughly MNIST's proportions.
    let mut counts = [0usize; 10];
    for &l in &m.labels {
        counts[l as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (800..1200).contains(&c)),
        "{counts:?}"
    );
    // Background is black, strokes reach full white.
    let (px, _) = m.get(0).unwrap();
    assert_eq!(px[0], 0);
    assert!(m.images.contains(&255));
    assert!(std::fs::metadata(Mnist::bundled_path()).unwrap().len() < 3_000_000);
}

#[test]
fn image_f32_scaling() {
    let m = Mnist::load_bundled().unwrap();
    let (px, _) = m.get(5).unwrap();
    let x = m.image_f32(5);
    assert_eq!(x.len(), 784);
    for (p, v) in px.iter().zip(&x) {
        assert!((v - (*p as f32 / 127.5 - 1.0)).abs() < 1e-6);
    }
    assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
    assert!(x.contains(&-1.0));
    let (b, y) = m.batch_f32(&[5, 7]).unwrap();
    assert_eq!(&b[..784], &x[..]);
    assert_eq!(y, vec![m.labels[5], m.labels[7]]);
    assert!(m.batch_f32(&[10_000]).is_err());
    assert!(m.get(10_000).is_none());
}

#[test]
fn split_sizes_and_disjointness() {
    let m = Mnist::load_bundled().unwrap();
    let train = m.train_indices();
    let held = m.heldout_indices();
    assert_eq!(train.len(), 9_000);
    assert_eq!(held.len(), 1_000);
    let t: HashSet<_> = train.iter().copied().collect();
    let h: HashSet<_> = held.iter().copied().collect();
    assert!(t.is_disjoint(&h));
    assert_eq!(t.len() + h.len(), m.len());
    // The held-out split is the last 1,000 records and mixes every class.
    assert_eq!(held[0], 9_000);
    let classes: HashSet<u8> = held.iter().map(|&i| m.labels[i]).collect();
    assert_eq!(classes.len(), 10);
    for d in 0..10u8 {
        let n = held.iter().filter(|&&i| m.labels[i] == d).count();
        assert!((70..140).contains(&n), "class {d}: {n} held-out digits");
    }
}

#[test]
fn round_trip_small_file() {
    let m = Mnist {
        images: (0..3 * 4 * 5).map(|v| (v * 4) as u8).collect(),
        labels: vec![1, 2, 3],
        rows: 4,
        cols: 5,
    };
    let bytes = m.to_bytes().unwrap();
    let back = Mnist::from_bytes(&bytes, "small.bin").unwrap();
    assert_eq!(back, m);
    // A small file holds out half of it.
    assert_eq!(back.heldout_indices(), vec![2]);
    assert_eq!(back.train_indices(), vec![0, 1]);
}

#[test]
fn flipped_payload_byte_is_an_error() {
    let mut b = bundled_bytes();
    let mid = HEADER_LEN + (b.len() - HEADER_LEN) / 2;
    b[mid] ^= 0x40;
    let msg = err_text(Mnist::from_bytes(&b, "data/mnist/mnist.bin"));
    assert!(msg.starts_with("data/mnist/mnist.bin: "), "{msg}");
    assert!(
        msg.contains("corrupt compressed payload") || msg.contains("checksum mismatch"),
        "{msg}"
    );
}

#[test]
fn flipped_checksum_byte_is_a_checksum_error() {
    let mut b = bundled_bytes();
    b[50] ^= 1;
    let msg = err_text(Mnist::from_bytes(&b, "m.bin"));
    assert!(msg.contains("checksum mismatch"), "{msg}");
}

#[test]
fn corrupt_but_inflatable_payload_fails_the_checksum() {
    // A valid zlib stream of different data under the original header.
    let m = Mnist {
        images: vec![7; 2 * 9],
        labels: vec![0, 1],
        rows: 3,
        cols: 3,
    };
    let mut b = m.to_bytes().unwrap();
    let other = Mnist {
        images: vec![8; 2 * 9],
        ..m.clone()
    }
    .to_bytes()
    .unwrap();
    assert_eq!(b.len(), other.len());
    b[HEADER_LEN..].copy_from_slice(&other[HEADER_LEN..]);
    let msg = err_text(Mnist::from_bytes(&b, "m.bin"));
    assert!(msg.contains("checksum mismatch"), "{msg}");
}

#[test]
fn truncated_file_is_an_error() {
    let b = bundled_bytes();
    let msg = err_text(Mnist::from_bytes(&b[..b.len() - 1000], "m.bin"));
    assert!(msg.contains("truncated"), "{msg}");
    let msg = err_text(Mnist::from_bytes(&b[..40], "m.bin"));
    assert!(msg.contains("truncated") && msg.contains("header"), "{msg}");
    let msg = err_text(Mnist::from_bytes(&[], "m.bin"));
    assert!(msg.contains("truncated"), "{msg}");
}

#[test]
fn bad_header_fields_are_errors() {
    let b = bundled_bytes();
    let mut bad = b.clone();
    bad[0] = b'X';
    assert!(err_text(Mnist::from_bytes(&bad, "m.bin")).contains("bad magic"));
    let mut bad = b.clone();
    bad[8] = 9;
    assert!(err_text(Mnist::from_bytes(&bad, "m.bin")).contains("version 9"));
    let mut bad = b.clone();
    bad[12] ^= 1; // count
    assert!(err_text(Mnist::from_bytes(&bad, "m.bin")).contains("payload"));
    // A huge count with a consistent payload length.
    let mut bad = b.clone();
    let count = u32::MAX;
    bad[12..16].copy_from_slice(&count.to_le_bytes());
    bad[24..32].copy_from_slice(&(count as u64 * 785).to_le_bytes());
    let msg = err_text(Mnist::from_bytes(&bad, "m.bin"));
    assert!(msg.contains("corrupt header"), "{msg}");
    let mut bad = b.clone();
    bad.extend_from_slice(&[0, 0]);
    assert!(err_text(Mnist::from_bytes(&bad, "m.bin")).contains("trailing"));
}

#[test]
fn missing_file_names_the_path() {
    let e = Mnist::load("/nonexistent/dir/mnist.bin").unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/dir/mnist.bin"), "{e}");
    // It converts into the core error for callers that use dcdit_core::Result.
    let core: dcdit_core::Error = e.into();
    assert!(core.to_string().contains("mnist.bin"));
}
