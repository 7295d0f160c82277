//! Compiles `shaders/*.comp` (GLSL) to SPIR-V with `glslc` into `OUT_DIR`
//! and writes `shaders.rs`, a table of `(name, bytes, written)` the crate
//! embeds with `include_bytes!`; `written` has bit `i` set when storage buffer
//! binding `i` is not declared `readonly` (the engine's barrier tracking reads
//! it). Shaders whose first line is `// variants: subgroup` are
//! compiled twice: plain and with `-DSUBGROUP=1` (name suffix `_sg`); those whose
//! first line is `// variants: hd` once per head-dim bound (`_h16` .. `_h128`).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn hd_define(h: &str) -> &'static str {
    match h {
        "16" => "-DHDMAX=16",
        "32" => "-DHDMAX=32",
        "64" => "-DHDMAX=64",
        _ => "-DHDMAX=128",
    }
}

/// Bit mask of the storage-buffer bindings a shader may write: every
/// `layout(..., binding = N) ... buffer` declaration without `readonly`.
fn written_bindings(src: &str, path: &Path) -> u32 {
    let mut mask = 0u32;
    for line in src.lines() {
        let line = line.trim();
        if !line.starts_with("layout(") || !line.contains(" buffer ") {
            continue;
        }
        let n: u32 = line
            .split("binding")
            .nth(1)
            .and_then(|r| r.trim_start().strip_prefix('='))
            .and_then(|r| r.trim_start().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{}: cannot read the binding of `{line}`", path.display()));
        assert!(n < 32, "{}: binding {n} too large", path.display());
        let quals = line.split(')').nth(1).unwrap_or("");
        if !quals.contains("readonly") {
            mask |= 1 << n;
        }
    }
    mask
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=shaders");
    println!("cargo:rerun-if-env-changed=GLSLC");
    let glslc = env::var("GLSLC").unwrap_or_else(|_| "glslc".into());
    if Command::new(&glslc).arg("--version").output().is_err() {
        panic!(
            "dcdit-backend-vulkan: the GLSL compiler `{glslc}` was not found. \
             Install it with `apt-get install glslc` (or run `bash scripts/setup.sh`), \
             or point the GLSLC environment variable at a glslc binary."
        );
    }
    let mut entries: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("shaders directory")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    let mut table = String::from("/// Embedded SPIR-V modules: `(name, words as bytes, written-binding mask)`.\npub(crate) static SHADERS: &[(&str, &[u8], u32)] = &[\n");
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        println!("cargo:rerun-if-changed={}", path.display());
        if !name.ends_with(".comp") {
            continue;
        }
        let stem = name.trim_end_matches(".comp").to_string();
        let src = fs::read_to_string(&path).expect("read shader");
        let written = written_bindings(&src, &path);
        let mut variants = vec![(stem.clone(), Vec::<&str>::new())];
        if src.starts_with("// variants: subgroup") {
            variants.push((format!("{stem}_sg"), vec!["-DSUBGROUP=1"]));
        }
        if src.starts_with("// variants: hd") {
            variants = ["16", "32", "64", "128"]
                .iter()
                .map(|h| (format!("{stem}_h{h}"), vec![hd_define(h)]))
                .collect();
        }
        for (vname, defs) in variants {
            let spv = out.join(format!("{vname}.spv"));
            let status = Command::new(&glslc)
                .arg("-O")
                .arg("--target-env=vulkan1.1")
                .arg("-I")
                .arg(&dir)
                .args(&defs)
                .arg(&path)
                .arg("-o")
                .arg(&spv)
                .status()
                .expect("run glslc");
            if !status.success() {
                panic!("glslc failed on {}", path.display());
            }
            table.push_str(&format!(
                "    ({vname:?}, include_bytes!({:?}), {written:#x}),\n",
                spv.display().to_string()
            ));
        }
    }
    table.push_str("];\n");
    fs::write(out.join("shaders.rs"), table).expect("write shaders.rs");
}
