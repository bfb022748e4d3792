//! `--dry-run` at the real Kontext size: sparse full-size checkpoints (real headers, no data,
//! kontext_loader::sparse) as ComfyUI single files; the plan for a 24, 12 and 2 GiB card
//! without a GPU, as one JSON object each (2 GiB: refused, as nothing fits).

use std::path::Path;
use std::process::{Command, Output};

fn dry_run(dir: &Path, vram: &str) -> Output {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    Command::new(env!("CARGO_BIN_EXE_kontext-fast"))
        .args([
            "--diffusion-model",
            &p("flux1-kontext-dev.safetensors"),
            "--vae",
            &p("ae.safetensors"),
            "--t5xxl",
            &p("t5xxl_fp16.safetensors"),
            "--clip-l",
            &p("clip_l.safetensors"),
            "--tokenizers",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/pipeline/tiny-kontext"
            ),
            "--image",
            &p("context.png"),
            "--resize",
            "none",
            "--dry-run",
            "--json",
            "--vram",
            vram,
        ])
        .output()
        .unwrap()
}

#[test]
fn dry_run_plans_the_real_model_for_24_12_and_2_gib_cards() {
    let d = tempfile::tempdir().unwrap();
    kontext_loader::sparse::write_full_size_model(d.path(), false).unwrap();
    image::RgbImage::new(1024, 1024)
        .save(d.path().join("context.png"))
        .unwrap();
    let gib = (1u64 << 30) as f64;
    for (vram, mode, limit) in [("24", "fp8", 20.0), ("12", "stream", 10.5)] {
        let out = dry_run(d.path(), vram);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let peak = j["peak_bytes"].as_u64().unwrap() as f64 / gib;
        println!("--vram {vram}: mode {} peak {peak:.2} GiB", j["mode"]);
        assert_eq!(j["mode"], mode, "{j}");
        assert!(peak <= limit, "{peak}");
        assert_eq!(j["tokens"]["target"], 4096);
        assert_eq!(j["tokens"]["context"], 4096);
        assert_eq!(j["modes"].as_array().unwrap().len(), 3);
        let f = j["flops_per_step"].as_f64().unwrap();
        assert!(
            f > 1.6e14 && f < 1.7e14,
            "spec 7: 165 TFLOP per 8,704-token step, {f}"
        );
    }
    let out = dry_run(d.path(), "2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("does not fit in any memory mode") && stderr.contains("HINT"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
