//! The `.npy` reader and the release's feature-directory layout, on files the
//! tests write (as `np.save` would) and on broken ones.

use dcdit_data::features::FeatureDataset;
use dcdit_data::npy::{parse_npy, read_npy, write_npy_f32, write_npy_i64, Kind};
use std::path::{Path, PathBuf};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("dcdit_data_{tag}_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `.npy` file with an arbitrary header dict and data bytes.
fn raw_npy(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    let pre = if version == 1 { 10 } else { 12 };
    while !(pre + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[version, 0]);
    if version == 1 {
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Writes a release-style dataset: `n` images of (1, 4, 4, 4) f32 with value
/// `k + i / 100`, labels `(1,)` int64 `= 10 * k`.
fn make_dataset(root: &Path, size: usize, n: usize) {
    let fdir = root.join(format!("imagenet{size}_features"));
    let ldir = root.join(format!("imagenet{size}_labels"));
    std::fs::create_dir_all(&fdir).unwrap();
    std::fs::create_dir_all(&ldir).unwrap();
    for k in 0..n {
        let x: Vec<f32> = (0..64).map(|i| k as f32 + i as f32 / 100.0).collect();
        write_npy_f32(fdir.join(format!("{k}.npy")), &[1, 4, 4, 4], &x).unwrap();
        write_npy_i64(ldir.join(format!("{k}.npy")), &[1], &[10 * k as i64]).unwrap();
    }
}

#[test]
fn npy_round_trip_and_header_forms() {
    let d = TempDir::new("npy_rt");
    let p = d.0.join("a.npy");
    write_npy_f32(&p, &[1, 2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.5]).unwrap();
    let a = read_npy(&p).unwrap();
    assert_eq!(a.shape, vec![1, 2, 3]);
    assert_eq!((a.kind, a.item_size), (Kind::Float, 4));
    assert_eq!(a.to_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.5]);
    // A float array is not an integer array.
    assert!(a
        .to_i64()
        .unwrap_err()
        .to_string()
        .contains("not an integer"));

    // Version 2 header, big-endian float64, 0-d int64 and int32 arrays.
    let data: Vec<u8> = [1.5f64, -2.0]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let b = raw_npy(
        2,
        "{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }",
        &data,
    );
    assert_eq!(
        parse_npy(&b, "b.npy").unwrap().to_f32().unwrap(),
        vec![1.5, -2.0]
    );
    let b = raw_npy(
        1,
        "{'descr': '<i8', 'fortran_order': False, 'shape': (), }",
        &(-7i64).to_le_bytes(),
    );
    let a = parse_npy(&b, "c.npy").unwrap();
    assert!(a.shape.is_empty());
    assert_eq!(a.to_i64().unwrap(), vec![-7]);
    let b = raw_npy(
        1,
        "{'descr': '<i4', 'fortran_order': False, 'shape': (1,), }",
        &(-3i32).to_le_bytes(),
    );
    assert_eq!(parse_npy(&b, "d.npy").unwrap().to_i64().unwrap(), vec![-3]);
    let half: Vec<u8> = [half::f16::from_f32(0.25)]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let b = raw_npy(
        1,
        "{'descr': '<f2', 'fortran_order': False, 'shape': (1,), }",
        &half,
    );
    assert_eq!(
        parse_npy(&b, "e.npy").unwrap().to_f32().unwrap(),
        vec![0.25]
    );
}

#[test]
fn npy_bad_files_are_clear_errors() {
    let f4 =
        |shape: &str| format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not numpy at all".to_vec(), "bad magic"),
        (raw_npy(1, &f4("(2, 2)"), &[0u8; 12]), "truncated"),
        (raw_npy(1, &f4("(2,)"), &[0u8; 12]), "trailing bytes"),
        (
            raw_npy(
                1,
                "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
                &[0u8; 16],
            ),
            "Fortran",
        ),
        (
            raw_npy(
                1,
                "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }",
                &[0u8; 8],
            ),
            "unsupported dtype `<c8`",
        ),
        (
            raw_npy(
                1,
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,), }",
                &[0u8; 4],
            ),
            "structured",
        ),
        (
            raw_npy(
                1,
                "{'descr': '<f4', 'fortran_order': False, 'shape': 7, }",
                &[],
            ),
            "shape",
        ),
        (raw_npy(7, &f4("(1,)"), &[0u8; 4]), "version 7"),
    ];
    for (bytes, want) in cases {
        let e = parse_npy(&bytes, "x/y.npy").unwrap_err().to_string();
        assert!(e.starts_with("x/y.npy: "), "{e}");
        assert!(e.contains(want), "want `{want}` in: {e}");
    }
    // A header longer than the file.
    let mut b = raw_npy(1, &f4("(1,)"), &[0u8; 4]);
    b.truncate(30);
    assert!(parse_npy(&b, "t.npy")
        .unwrap_err()
        .to_string()
        .contains("truncated .npy header"));
}

#[test]
fn dataset_reads_release_layout_in_release_order() {
    let d = TempDir::new("feat_ok");
    make_dataset(&d.0, 32, 12);
    let ds = FeatureDataset::open(&d.0, 32).unwrap();
    assert_eq!(ds.len(), 12);
    // Names sorted as strings, like the release's sorted(os.listdir(...)).
    assert_eq!(&ds.names()[..4], &["0.npy", "1.npy", "10.npy", "11.npy"]);
    let (x, shape, y) = ds.get(2).unwrap(); // 10.npy
    assert_eq!(shape, [4, 4, 4]);
    assert_eq!(y, 100);
    assert_eq!(x.len(), 64);
    assert!((x[5] - 10.05).abs() < 1e-6);
    // Out of range.
    assert!(ds.get(12).unwrap_err().to_string().contains("out of range"));
    // Another size has no directories.
    let e = FeatureDataset::open(&d.0, 256).unwrap_err().to_string();
    assert!(e.contains("imagenet256_features"), "{e}");
}

#[test]
fn dataset_accepts_squeezed_shapes() {
    let d = TempDir::new("feat_sq");
    make_dataset(&d.0, 64, 1);
    write_npy_f32(
        d.0.join("imagenet64_features/0.npy"),
        &[4, 2, 3],
        &[0.5; 24],
    )
    .unwrap();
    write_npy_i64(d.0.join("imagenet64_labels/0.npy"), &[], &[3]).unwrap();
    let ds = FeatureDataset::open(&d.0, 64).unwrap();
    let (x, shape, y) = ds.get(0).unwrap();
    assert_eq!((x.len(), shape, y), (24, [4, 2, 3], 3));
}

#[test]
fn dataset_bad_files_are_clear_errors() {
    let d = TempDir::new("feat_bad");
    make_dataset(&d.0, 32, 6);
    let fdir = d.0.join("imagenet32_features");
    let ldir = d.0.join("imagenet32_labels");
    // Wrong feature dtype (int64 instead of float32).
    write_npy_i64(fdir.join("1.npy"), &[1, 4, 2, 2], &[1; 16]).unwrap();
    // Wrong label dtype (float32 instead of int64).
    write_npy_f32(ldir.join("2.npy"), &[1], &[3.0]).unwrap();
    // Truncated feature file.
    let bytes = std::fs::read(fdir.join("3.npy")).unwrap();
    std::fs::write(fdir.join("3.npy"), &bytes[..bytes.len() - 10]).unwrap();
    // Wrong feature rank, label with two values, negative label.
    write_npy_f32(fdir.join("4.npy"), &[2, 4, 4, 4], &[0.0; 128]).unwrap();
    write_npy_i64(ldir.join("5.npy"), &[2], &[1, 2]).unwrap();
    let ds = FeatureDataset::open(&d.0, 32).unwrap();
    let err = |i: usize| ds.get(i).unwrap_err().to_string();
    assert!(ds.get(0).is_ok());
    let e = err(1);
    assert!(
        e.contains("1.npy") && e.contains("not a float array"),
        "{e}"
    );
    let e = err(2);
    assert!(
        e.contains("2.npy") && e.contains("not an integer array"),
        "{e}"
    );
    let e = err(3);
    assert!(e.contains("3.npy") && e.contains("truncated"), "{e}");
    let e = err(4);
    assert!(
        e.contains("4.npy") && e.contains("feature shape [2, 4, 4, 4]"),
        "{e}"
    );
    let e = err(5);
    assert!(e.contains("5.npy") && e.contains("label shape [2]"), "{e}");
    write_npy_i64(ldir.join("5.npy"), &[1], &[-1]).unwrap();
    let e = err(5);
    assert!(e.contains("negative label -1"), "{e}");
}

#[test]
fn dataset_missing_files_are_clear_errors() {
    let d = TempDir::new("feat_missing");
    make_dataset(&d.0, 32, 3);
    std::fs::remove_file(d.0.join("imagenet32_labels/1.npy")).unwrap();
    let e = FeatureDataset::open(&d.0, 32).unwrap_err().to_string();
    assert!(
        e.contains("imagenet32_labels/1.npy") && e.contains("has no label file"),
        "{e}"
    );
    write_npy_i64(d.0.join("imagenet32_labels/1.npy"), &[1], &[0]).unwrap();
    write_npy_i64(d.0.join("imagenet32_labels/9.npy"), &[1], &[0]).unwrap();
    let e = FeatureDataset::open(&d.0, 32).unwrap_err().to_string();
    assert!(
        e.contains("9.npy") && e.contains("has no feature file"),
        "{e}"
    );
    std::fs::remove_dir_all(d.0.join("imagenet32_labels")).unwrap();
    let e = FeatureDataset::open(&d.0, 32).unwrap_err().to_string();
    assert!(
        e.contains("imagenet32_labels") && e.contains("cannot list"),
        "{e}"
    );
    // Empty directories.
    let d2 = TempDir::new("feat_empty");
    std::fs::create_dir_all(d2.0.join("imagenet32_features")).unwrap();
    std::fs::create_dir_all(d2.0.join("imagenet32_labels")).unwrap();
    let e = FeatureDataset::open(&d2.0, 32).unwrap_err().to_string();
    assert!(e.contains("holds no .npy file"), "{e}");
}
