//! The shipped classifier and the Fréchet distance.

use dcdit_data::classifier::{
    frechet_distance, Classifier, FeatureStats, SplitMix64, FEATURE_DIM, INPUT_DIM,
};
use dcdit_data::mnist::Mnist;

#[test]
fn shipped_weights_reach_95_percent_on_heldout() {
    let m = Mnist::load_bundled().unwrap();
    let clf = Classifier::load_bundled().unwrap();
    let acc = clf.accuracy(&m, &m.heldout_indices()).unwrap();
    assert!(acc > 0.95, "held-out accuracy {acc}");
    assert!(clf.about.contains("784-256-128-10"));
    let size = std::fs::metadata(Classifier::bundled_path()).unwrap().len();
    assert!(size < 500_000, "{size} bytes");
}

#[test]
fn frechet_separates_digits_from_noise() {
    let m = Mnist::load_bundled().unwrap();
    let clf = Classifier::load_bundled().unwrap();
    let (x, _) = m.batch_f32(&m.heldout_indices()).unwrap();
    let f = clf.features(&x).unwrap();
    assert_eq!(f.len(), 1000 * FEATURE_DIM);
    let half = f.len() / 2;
    let same = frechet_distance(&f[..half], &f[half..], FEATURE_DIM).unwrap();
    let mut rng = SplitMix64::new(7);
    let noise: Vec<f32> = (0..x.len()).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    let fnoise = clf.features(&noise).unwrap();
    let far = frechet_distance(&f, &fnoise, FEATURE_DIM).unwrap();
    assert!(same < 20.0, "held-out halves: {same}");
    assert!(far > 20.0 * same, "noise {far} vs halves {same}");
    // Identical sets.
    let zero = frechet_distance(&f, &f, FEATURE_DIM).unwrap();
    assert!(zero < 1e-6 * far, "identical sets: {zero}");
}

#[test]
fn frechet_one_dimensional_gaussians() {
    // (mu1 - mu2)^2 + (s1 - s2)^2 with unbiased sample statistics.
    let a: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0];
    let b: Vec<f32> = vec![10.0, 14.0, 18.0];
    let (mu_a, var_a) = (3.0f64, 2.5f64);
    let (mu_b, var_b) = (14.0f64, 16.0f64);
    let want = (mu_a - mu_b).powi(2) + (var_a.sqrt() - var_b.sqrt()).powi(2);
    let got = frechet_distance(&a, &b, 1).unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
}

#[test]
fn frechet_two_dimensional_closed_form() {
    // For 2x2 SPD matrices, Tr sqrt(S1^1/2 S2 S1^1/2) = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2)).
    let s1 = [2.0, 0.7, 0.7, 1.0];
    let s2 = [0.5, -0.3, -0.3, 3.0];
    let a = FeatureStats {
        dim: 2,
        count: 10,
        mean: vec![0.5, -1.0],
        cov: s1.to_vec(),
    };
    let b = FeatureStats {
        dim: 2,
        count: 10,
        mean: vec![1.5, 2.0],
        cov: s2.to_vec(),
    };
    let tr12 = s1[0] * s2[0] + s1[1] * s2[2] + s1[2] * s2[1] + s1[3] * s2[3];
    let det = |s: [f64; 4]| s[0] * s[3] - s[1] * s[2];
    let tr_sqrt = (tr12 + 2.0 * (det(s1) * det(s2)).sqrt()).sqrt();
    let want = 1.0 + 9.0 + (s1[0] + s1[3]) + (s2[0] + s2[3]) - 2.0 * tr_sqrt;
    let got = a.frechet_distance(&b).unwrap();
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");
    // Symmetric.
    assert!((b.frechet_distance(&a).unwrap() - want).abs() < 1e-10);
}

#[test]
fn frechet_bad_input_is_an_error() {
    assert!(frechet_distance(&[1.0, 2.0, 3.0], &[1.0, 2.0], 2).is_err());
    assert!(frechet_distance(&[1.0], &[1.0, 2.0], 1).is_err());
    assert!(frechet_distance(&[1.0, f32::NAN], &[1.0, 2.0], 1).is_err());
    assert!(frechet_distance(&[], &[], 0).is_err());
    let a = FeatureStats::from_features(&[0.0, 1.0, 2.0, 3.0], 2).unwrap();
    let b = FeatureStats::from_features(&[0.0, 1.0], 1).unwrap();
    assert!(a.frechet_distance(&b).is_err());
}

#[test]
fn save_load_round_trip_and_errors() {
    let clf = Classifier::load_bundled().unwrap();
    let dir = std::env::temp_dir().join(format!("dcdit_clf_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("c.safetensors");
    clf.save(&p).unwrap();
    let back = Classifier::load(&p).unwrap();
    // Already f16-representable: the round trip is exact.
    assert_eq!(back, clf);
    // Truncated file.
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = Classifier::load(&p).unwrap_err().to_string();
    assert!(e.contains("c.safetensors"), "{e}");
    // A file of other tensors.
    let mut map = clf.to_tensor_map().unwrap();
    map.tensors.remove("fc2.bias");
    std::fs::write(&p, map.to_safetensors(None).unwrap()).unwrap();
    let e = Classifier::load(&p).unwrap_err().to_string();
    assert!(e.contains("c.safetensors") && e.contains("fc2.bias"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
    // Inputs that are not whole images.
    assert!(clf.predict(&[0.0; INPUT_DIM + 1]).is_err());
    assert!(clf.features(&[0.0; 3]).is_err());
}

#[test]
fn training_is_deterministic_and_learns() {
    let m = Mnist::load_bundled().unwrap();
    // A 2,000-digit file: 1,000 to train on, 1,000 held out.
    let small = Mnist {
        images: m.images[..2000 * 784].to_vec(),
        labels: m.labels[..2000].to_vec(),
        rows: 28,
        cols: 28,
    };
    let a = Classifier::train(&small, 5, 5).unwrap();
    let b = Classifier::train(&small, 5, 5).unwrap();
    assert_eq!(a, b);
    let acc = a.accuracy(&small, &small.heldout_indices()).unwrap();
    assert!(acc > 0.75, "accuracy after 5 small epochs: {acc}");
    let c = Classifier::train(&small, 5, 6).unwrap();
    assert_ne!(a, c);
}
