//! What users actually have, as they run it: ComfyUI-style single component files (found by
//! bare name in a ComfyUI install), tokenizers from elsewhere, several images from one load
//! (`--count`), and a quiet run. The single files are written here from the committed tiny
//! pipeline's weights (the same f32 values under the names the single files use), so the image
//! must equal the model folder's exactly.

use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pipeline"
    ))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kontext-fast"))
        .args(args)
        .output()
        .unwrap()
}

/// Writes `weights` (canonical name → weight) as one f32 safetensors file, names prefixed.
fn save(weights: &BTreeMap<String, kontext_loader::Weight>, prefix: &str, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(k, w)| {
            let bytes: Vec<u8> = w.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect();
            (format!("{prefix}{k}"), w.shape.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(k, shape, b)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A ComfyUI install holding the tiny pipeline's transformer (ComfyUI prefix) and T5 as single
/// files, and the tokenizers where ComfyUI keeps them. (Its VAE and CLIP have no single-file
/// config: the real ones' 32 norm groups and 64-wide heads do not fit the tiny widths, so they
/// are given as folders.)
fn comfy_install(root: &Path) {
    let m = fixtures().join("tiny-kontext");
    let tr = kontext_loader::load_transformer(&m.join("transformer"), &Default::default()).unwrap();
    save(
        &tr.weights.weights,
        "model.diffusion_model.",
        &root.join("models/diffusion_models/flux1-dev-kontext-tiny.safetensors"),
    );
    // An empty stand-in where ComfyUI keeps the VAE: found by bare name, never loaded here.
    std::fs::create_dir_all(root.join("models/vae")).unwrap();
    std::fs::write(root.join("models/vae/ae.safetensors"), b"").unwrap();
    let t5 = kontext_loader::load_t5(&m.join("text_encoder_2")).unwrap();
    save(
        &t5.weights.weights,
        "",
        &root.join("models/text_encoders/t5xxl_tiny.safetensors"),
    );
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&m.join("tokenizer"), &root.join("comfy/sd1_tokenizer"));
    copy(
        &m.join("tokenizer_2"),
        &root.join("comfy/text_encoders/t5_tokenizer"),
    );
}

fn edit_args<'a>(out: &'a str, image: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--image",
        image,
        "--prompt",
        "Give the cat a space helmet",
        "--steps",
        "2",
        "--seed",
        "42",
        "--resize",
        "none",
        "--device",
        "cpu",
        "--output",
        out,
    ];
    a.extend_from_slice(extra);
    a
}

fn pixels(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

#[test]
fn a_comfyui_install_gives_the_model_folders_image() {
    let d = tempfile::tempdir().unwrap();
    let comfy = d.path().join("ComfyUI");
    comfy_install(&comfy);
    let image = fixtures().join("context.png");
    let model = fixtures().join("tiny-kontext");
    let (clip, vae) = (model.join("text_encoder"), model.join("vae"));
    let (a, b) = (d.path().join("comfy.png"), d.path().join("folder.png"));
    let r = run(&edit_args(
        s(&a),
        s(&image),
        &[
            "--comfyui",
            s(&comfy),
            "--diffusion-model",
            "flux1-dev-kontext-tiny.safetensors",
            "--vae",
            s(&vae),
            "--t5xxl",
            "t5xxl_tiny.safetensors",
            "--clip_l",
            s(&clip),
            "--axes-dim",
            "4,6,6",
            "--json",
        ],
    ));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(
        stderr.contains("(--diffusion-model in --comfyui models/diffusion_models/)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("(--comfyui comfy/sd1_tokenizer/)"),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let parts = summary["parts"].as_array().unwrap();
    assert!(parts
        .iter()
        .any(|p| p["part"] == "t5" && p["from"] == "--t5xxl in --comfyui models/text_encoders/"));
    assert!(parts
        .iter()
        .any(|p| p["part"] == "vae" && p["from"] == "--vae"));
    let r = run(&edit_args(s(&b), s(&image), &["--model", s(&model)]));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        pixels(&a),
        pixels(&b),
        "the same weights from other files give the same image"
    );

    // inspect reports the same resolution.
    let r = run(&[
        "inspect",
        "--comfyui",
        s(&comfy),
        "--diffusion-model",
        "flux1-dev-kontext-tiny.safetensors",
        "--vae",
        s(&vae),
        "--t5xxl",
        "t5xxl_tiny.safetensors",
        "--clip-l",
        s(&clip),
        "--axes-dim",
        "4,6,6",
    ]);
    let stdout = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        stdout.contains("t5 [from --t5xxl in --comfyui models/text_encoders/]:"),
        "{stdout}"
    );
    assert!(stdout.contains("vae [from --vae]:"), "{stdout}");
    assert!(
        stdout.contains("t5 tokenizer: ")
            && stdout.contains("[from --comfyui comfy/text_encoders/t5_tokenizer/]"),
        "{stdout}"
    );
}

#[test]
fn components_without_tokenizers_are_one_error_naming_the_flags() {
    let d = tempfile::tempdir().unwrap();
    let comfy = d.path().join("ComfyUI");
    comfy_install(&comfy);
    let image = fixtures().join("context.png");
    let out = d.path().join("x.png");
    let f = |p: &str| comfy.join(p).to_string_lossy().into_owned();
    let (t, t5) = (
        f("models/diffusion_models/flux1-dev-kontext-tiny.safetensors"),
        f("models/text_encoders/t5xxl_tiny.safetensors"),
    );
    let v = fixtures()
        .join("tiny-kontext/vae")
        .to_string_lossy()
        .into_owned();
    let clip = fixtures().join("tiny-kontext/text_encoder");
    let r = run(&edit_args(
        s(&out),
        s(&image),
        &[
            "--diffusion-model",
            &t,
            "--vae",
            &v,
            "--t5xxl",
            &t5,
            "--clip-l",
            s(&clip),
        ],
    ));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success());
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("no CLIP tokenizer") && errors[0].contains("--tokenizers DIR"),
        "{stderr}"
    );
    assert!(!out.exists());
}

#[test]
fn count_makes_several_images_from_one_load_and_quiet_says_nothing() {
    let d = tempfile::tempdir().unwrap();
    let image = fixtures().join("context.png");
    let model = fixtures().join("tiny-kontext");
    let pattern = d.path().join("edit-{seed}.png");
    let r = run(&edit_args(
        s(&pattern),
        s(&image),
        &["--model", s(&model), "--count", "2", "--json", "--quiet"],
    ));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        r.stderr.is_empty(),
        "--quiet: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    let outputs = summary["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    assert_eq!(outputs[1]["seed"], 43);
    let (a, b) = (d.path().join("edit-42.png"), d.path().join("edit-43.png"));
    assert!(a.is_file() && b.is_file());
    // The second image is the one a run with --seed 43 makes.
    let single = d.path().join("single.png");
    let mut args = edit_args(s(&single), s(&image), &["--model", s(&model)]);
    let i = args.iter().position(|a| *a == "42").unwrap();
    args[i] = "43";
    let r = run(&args);
    assert!(r.status.success());
    assert_eq!(pixels(&single), pixels(&b));
    assert_ne!(pixels(&a), pixels(&b));
    // Without {seed}, the seed goes before the extension; the log names every image.
    let plain = d.path().join("plain.png");
    let r = run(&edit_args(
        s(&plain),
        s(&image),
        &["--model", s(&model), "--count", "2"],
    ));
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(d.path().join("plain-42.png").is_file() && d.path().join("plain-43.png").is_file());
    assert!(
        stderr.contains("image 2/2 (seed 43): step   2/2"),
        "{stderr}"
    );
}

#[test]
fn count_and_seed_mistakes_are_clear_errors_and_seed_folders_work() {
    let d = tempfile::tempdir().unwrap();
    let image = fixtures().join("context.png");
    let model = fixtures().join("tiny-kontext");
    let out = d.path().join("o.png");
    let one_error = |r: &Output, needle: &str| {
        let stderr = String::from_utf8_lossy(&r.stderr);
        assert!(
            !r.status.success() && !stderr.contains("panicked"),
            "{stderr}"
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(
            errors.len() == 1 && errors[0].contains(needle),
            "{needle}: {stderr}"
        );
    };
    let r = run(&edit_args(
        s(&out),
        s(&image),
        &["--model", s(&model), "--count", "100000000000"],
    ));
    one_error(&r, "give 1 to 100000 images per run");
    let mut args = edit_args(s(&out), s(&image), &["--model", s(&model), "--count", "2"]);
    let i = args.iter().position(|a| *a == "42").unwrap();
    args[i] = "18446744073709551615";
    one_error(&run(&args), "the seeds pass 2^64 − 1");
    // `{seed}` in a folder name: every folder must exist, and each image lands in its own.
    for seed in ["42", "43"] {
        std::fs::create_dir(d.path().join(seed)).unwrap();
    }
    let pattern = d.path().join("{seed}").join("o.png");
    let r = run(&edit_args(
        s(&pattern),
        s(&image),
        &["--model", s(&model), "--count", "2"],
    ));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(d.path().join("42/o.png").is_file() && d.path().join("43/o.png").is_file());
    let r = run(&edit_args(
        s(&pattern),
        s(&image),
        &["--model", s(&model), "--count", "3"],
    ));
    one_error(&r, "44 does not exist");
}
