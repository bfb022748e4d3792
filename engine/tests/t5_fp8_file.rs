//! A ComfyUI-style `t5xxl_fp8_e4m3fn_scaled.safetensors` (scaled fp8 linears with
//! `scale_weight`, 16-bit embeddings and norms, the `scaled_fp8` marker) loads as T5 with the
//! same config and, dequantised, the original weights within e4m3 rounding.

use half::bf16;
use kontext_engine::weights::quantise_e4m3;
use kontext_loader::{load_t5, DType, Quant, TensorSet};
use std::path::Path;

/// Writes a safetensors file from `(name, dtype, shape, bytes)` entries.
fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let json = serde_json::Value::Object(header).to_string();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    for (.., bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn comfyui_scaled_fp8_t5_loads_within_e4m3_rounding() {
    let src = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/encoders/t5/t5xxl.safetensors"
    ));
    let original = load_t5(src).unwrap();
    let set = TensorSet::open(src).unwrap();
    let mut tensors = vec![("scaled_fp8".to_string(), "F32", vec![0], vec![])];
    for key in set.keys() {
        let info = set.info(key).unwrap();
        let mut v = Vec::new();
        kontext_loader::dtype::decode_into(
            info.dtype,
            set.bytes(key).unwrap().as_slice(),
            1.0,
            &mut v,
        );
        let is_linear = info.shape.len() == 2
            && key.ends_with(".weight")
            && !key.contains("shared")
            && !key.contains("relative_attention_bias");
        if is_linear {
            let (codes, scale) = quantise_e4m3(&v);
            tensors.push((key.clone(), "F8_E4M3", info.shape.clone(), codes));
            let stem = key.strip_suffix(".weight").unwrap();
            tensors.push((
                format!("{stem}.scale_weight"),
                "F32",
                vec![],
                scale.to_le_bytes().to_vec(),
            ));
        } else {
            let bytes = v
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect();
            tensors.push((key.clone(), "BF16", info.shape.clone(), bytes));
        }
    }
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("t5xxl_fp8_e4m3fn_scaled.safetensors");
    write_safetensors(&path, &tensors);

    let fp8 = load_t5(&path).unwrap();
    assert_eq!(fp8.config, original.config);
    assert_eq!(fp8.weights.quant, Quant::ScaledFp8 { fp8_matmul: true });
    let mut fp8_count = 0;
    for (key, w) in &original.weights.weights {
        let q = fp8.weights.get(key).unwrap();
        let scale = q.parts[0].scale;
        if q.dtype == DType::F8E4M3 {
            fp8_count += 1;
            assert!(scale.is_some(), "{key}: scale_weight not attached");
        }
        for (i, (a, b)) in w.to_f32().iter().zip(q.to_f32()).enumerate() {
            // e4m3: half a step of 3 mantissa bits (2^-4 relative) or half the subnormal step
            // (2^-10 · scale); bf16: 2^-8 relative.
            let bound = match q.dtype {
                DType::F8E4M3 => {
                    (a.abs() * 2f32.powi(-4)).max(scale.unwrap_or(1.0) * 2f32.powi(-10)) * 1.0001
                }
                _ => a.abs() * 2f32.powi(-8),
            };
            assert!((a - b).abs() <= bound, "{key}[{i}]: {a} vs {b}");
        }
    }
    // 2 layers × (q, k, v, o, wi_0, wi_1, wo)
    assert_eq!(fp8_count, 14);
}
