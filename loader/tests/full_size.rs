//! Opening a full-size (12 GB) scaled-fp8 Kontext checkpoint maps it without reading it.
//! The file is sparse: only the header and the scale values occupy disk.

use kontext_loader::transformer::expected_shapes;
use kontext_loader::{load_transformer, FluxConfig, Quant, TransformerOptions};
use std::io::Write;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn opening_a_12_gb_scaled_fp8_checkpoint_reads_nothing() {
    let shapes = expected_shapes(&FluxConfig::kontext_dev());
    let prefix = "model.diffusion_model.";
    // Scales first (real bytes), then the weights (a hole in the sparse file).
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    let mut entry = |name: String, dtype: &str, shape: Vec<usize>, bytes: u64| {
        header.insert(name, serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    };
    entry(format!("{prefix}scaled_fp8"), "F32", vec![0], 0);
    let mut scale_count = 0u64;
    for (name, shape) in &shapes {
        if shape.len() == 2 {
            let stem = name.strip_suffix(".weight").unwrap();
            entry(format!("{prefix}{stem}.scale_weight"), "F32", vec![], 4);
            scale_count += 1;
        }
    }
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        if shape.len() == 2 {
            entry(
                format!("{prefix}{name}"),
                "F8_E4M3",
                shape.clone(),
                n as u64,
            );
        } else {
            entry(
                format!("{prefix}{name}"),
                "BF16",
                shape.clone(),
                2 * n as u64,
            );
        }
    }
    let json = serde_json::Value::Object(header).to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flux1-kontext-dev-fp8-scaled.safetensors");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&(json.len() as u64).to_le_bytes()).unwrap();
    f.write_all(json.as_bytes()).unwrap();
    for _ in 0..scale_count {
        f.write_all(&0.01f32.to_le_bytes()).unwrap();
    }
    f.set_len(8 + json.len() as u64 + offset).unwrap();
    drop(f);
    let file_len = std::fs::metadata(&path).unwrap().len();
    assert!(file_len > 11_900_000_000, "{file_len}");

    let before = rss_kib();
    let t = load_transformer(&path, &TransformerOptions::default()).unwrap();
    let grown_mib = rss_kib().saturating_sub(before) as f64 / 1024.0;
    println!(
        "opened {:.2} GB checkpoint: RSS grew {grown_mib:.1} MiB",
        file_len as f64 / 1e9
    );

    assert_eq!(t.config, FluxConfig::kontext_dev());
    assert_eq!(t.weights.quant, Quant::ScaledFp8 { fp8_matmul: true });
    assert_eq!(t.weights.param_count(), 11_901_408_320);
    assert_eq!(
        t.weights.get("img_in.weight").unwrap().parts[0].scale,
        Some(0.01)
    );
    // Mapping is lazy: opening must not page in the 12 GB (a header is ~100 KB).
    assert!(grown_mib < 64.0, "opening grew RSS by {grown_mib:.1} MiB");
}
