//! Bad input gets a clear error naming what is wrong, and never a panic.

use dcdit_backend_cpu::CpuBackend;
use dcdit_core::config::Config;
use dcdit_core::model::{self, Model, TailDrop};
use dcdit_core::weights::{HostTensor, TensorMap};
use dcdit_core::Error;

const CFG: &str = r#"
model:
  hnet: { arch_layout: ["c1", ["D1"], "c1"], d_model: [64, 64], num_heads: [4, 4], enc_dec_dim_factor: [2, null] }
data: { image_size: 32, num_classes: 10 }
"#;

fn cfg() -> Config {
    Config::from_yaml_str(CFG).unwrap()
}

fn weights() -> TensorMap {
    let spec = cfg().model_spec().unwrap();
    let (_, reg) = model::build(&spec);
    model::init::init_weights(&spec, &reg, 3).unwrap()
}

fn load_err(w: &TensorMap) -> Error {
    Model::load(&CpuBackend::with_threads(1), &cfg(), w).unwrap_err()
}

fn config_err(yaml: &str) -> String {
    let c = Config::from_yaml_str(yaml);
    match c.and_then(|c| c.model_spec()) {
        Ok(_) => panic!("config accepted:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn fresh_weights_load_and_run() {
    let b = CpuBackend::with_threads(1);
    let m = Model::load(&b, &cfg(), &weights()).unwrap();
    let x = m.input_from_nchw(&b, &vec![0.5; 2 * 4 * 16], 2).unwrap();
    let out = m
        .forward(&b, &x, &[10.0, 999.0], &[3, 10], &TailDrop::None)
        .unwrap();
    assert_eq!(dcdit_core::Backend::shape(&b, &out.out), vec![32, 8]);
}

#[test]
fn missing_key_is_named() {
    let mut w = weights();
    w.tensors.remove("hnet.routing_module.proj.weight");
    assert_eq!(
        load_err(&w),
        Error::MissingKey("hnet.routing_module.proj.weight".into())
    );
}

#[test]
fn unexpected_key_is_named() {
    let mut w = weights();
    w.insert(
        "blocks.0.attn.qkv.weight",
        HostTensor::new(vec![1], vec![0.0]).unwrap(),
    );
    assert_eq!(
        load_err(&w),
        Error::UnexpectedKey("blocks.0.attn.qkv.weight".into())
    );
}

#[test]
fn wrong_shape_is_named() {
    let mut w = weights();
    w.insert(
        "hnet.residual_proj.weight",
        HostTensor::new(vec![64, 32], vec![0.0; 64 * 32]).unwrap(),
    );
    let e = load_err(&w).to_string();
    assert!(
        e.contains("hnet.residual_proj.weight") && e.contains("[64, 64]") && e.contains("[64, 32]"),
        "{e}"
    );
}

#[test]
fn nan_weights_are_rejected() {
    let mut w = weights();
    w.tensors.get_mut("final_layer.linear.bias").unwrap().data[0] = f32::NAN;
    assert!(load_err(&w).to_string().contains("final_layer.linear.bias"));
}

#[test]
fn truncated_and_corrupt_files_are_errors() {
    let bytes = weights().to_safetensors(None).unwrap();
    for cut in [0, 4, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let e = TensorMap::from_safetensors(&bytes[..cut]).unwrap_err();
        assert!(matches!(e, Error::Format(_)), "cut at {cut}: {e}");
    }
    let mut bad = bytes.clone();
    bad[8] = b'#'; // the header JSON no longer parses
    assert!(TensorMap::from_safetensors(&bad).is_err());
    let mut huge = bytes;
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(TensorMap::from_safetensors(&huge).is_err());
}

#[test]
fn wrong_dtype_is_named() {
    // A u8 tensor in an otherwise valid file.
    let header = br#"{"x_embedder.proj.bias":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&[1, 2]);
    let e = TensorMap::from_safetensors(&bytes).unwrap_err().to_string();
    assert!(
        e.contains("x_embedder.proj.bias") && e.contains("U8"),
        "{e}"
    );
}

#[test]
fn f16_and_bf16_weights_load() {
    let w = weights();
    for dt in [dcdit_core::DType::F16, dcdit_core::DType::BF16] {
        let back = TensorMap::from_safetensors(&w.to_safetensors(Some(dt)).unwrap()).unwrap();
        Model::load(&CpuBackend::with_threads(1), &cfg(), &back).unwrap();
        assert_eq!(back.get("pos_embed").unwrap().stored, dt);
    }
}

#[test]
fn nonsense_configs_name_the_field() {
    let cases = [
        ("num_heads: [5, 5]", "model.hnet.num_heads"),
        ("num_heads: [0, 0]", "model.hnet.num_heads"),
        ("d_model: [0, 0]", "model.hnet.d_model"),
        ("d_model: [48, 48]", "enc_dec_dim_factor"),
        ("enc_dec_dim_factor: [4, null]", "enc_dec_dim_factor"),
        ("enc_dec_dim_factor: [0, null]", "enc_dec_dim_factor"),
        ("arch_layout: [\"c2\", [\"c2\"], \"c2\"]", "arch_layout"),
        (
            "arch_layout: [\"c2\", [\"c2\", [\"D2\"], \"c2\"], \"c2\"]",
            "arch_layout",
        ),
        ("arch_layout: [\"x2\", [\"D2\"], \"c2\"]", "arch_layout"),
        ("dechunk_kernel_sigma: -1.0", "dechunk_kernel_sigma"),
    ];
    for (line, field) in cases {
        let yaml = format!(
            "model:\n  hnet:\n    arch_layout: [\"c1\", [\"D1\"], \"c1\"]\n    d_model: [64, 64]\n    num_heads: [4, 4]\n    enc_dec_dim_factor: [2, null]\n    {line}\ndata: {{ image_size: 32, num_classes: 10 }}\n"
        );
        // Later keys override earlier ones in our YAML reader? No: duplicates are errors, so build cleanly.
        let yaml = dedupe(&yaml);
        let e = config_err(&yaml);
        assert!(
            e.contains(field),
            "`{line}`: error `{e}` does not name {field}"
        );
    }
    for (yaml, field) in [
        ("data: { image_size: 0 }", "data.image_size"),
        ("data: { image_size: 30 }", "data.image_size"),
        ("data: { num_classes: 0 }", "data.num_classes"),
        ("model: { in_channels: 0 }", "model.in_channels"),
        ("model: { mlp_ratio: 0.0 }", "model.mlp_ratio"),
        ("model: { name: Foo }", "model.name"),
        ("model: { name: DiT, patch_size: 3 }", "model.patch_size"),
        (
            "model: { class_embed_init_std: -1.0 }",
            "model.class_embed_init_std",
        ),
        (
            "model: { class_embed_init_std: .nan }",
            "model.class_embed_init_std",
        ),
        ("model: [1, 2]", "<yaml>"),
    ] {
        let e = config_err(yaml);
        assert!(
            e.contains(field),
            "`{yaml}`: error `{e}` does not name {field}"
        );
    }
}

/// Keeps the last of repeated `key:` lines under `hnet`.
fn dedupe(yaml: &str) -> String {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let key = l.trim().split(':').next().unwrap_or("");
        let repeated = l.starts_with("    ")
            && lines[i + 1..]
                .iter()
                .any(|m| m.starts_with("    ") && m.trim().split(':').next() == Some(key));
        if !repeated {
            out.push(*l);
        }
    }
    out.join("\n")
}

#[test]
fn bad_inputs_are_errors() {
    let b = CpuBackend::with_threads(1);
    let m = Model::load(&b, &cfg(), &weights()).unwrap();
    let x = m.input_from_nchw(&b, &vec![0.5; 4 * 16], 1).unwrap();
    // Label past the null class.
    assert!(m
        .forward(&b, &x, &[1.0], &[11], &TailDrop::None)
        .unwrap_err()
        .to_string()
        .contains("label 11"));
    // Count mismatches.
    assert!(m
        .forward(&b, &x, &[1.0, 2.0], &[1, 2], &TailDrop::None)
        .is_err());
    assert!(m.forward(&b, &x, &[1.0], &[1, 2], &TailDrop::None).is_err());
    assert!(m
        .forward(&b, &x, &[1.0], &[1], &TailDrop::PerSample(vec![0.1, 0.2]))
        .is_err());
    assert!(m
        .forward(&b, &x, &[1.0], &[1], &TailDrop::Uniform(1.5))
        .is_err());
    assert!(m
        .forward(&b, &x, &[f32::NAN], &[1], &TailDrop::None)
        .is_err());
    assert!(m.input_from_nchw(&b, &[0.0; 3], 1).is_err());
}
