//! `kontext-fast --model … --prompt … --output …` as a user runs it, on the tiny committed
//! pipeline (random weights): the happy paths and every bad input a user can give.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pipeline"
    ))
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kontext-fast"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Fails unless the command failed with exactly one `error:` line and no panic.
fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(needle),
        "expected {needle:?} in {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn edit_writes_an_image_and_a_json_summary() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("edited.png");
    let model = fixtures().join("tiny-kontext");
    let image = fixtures().join("context.png");
    let r = run(&[
        "--model",
        s(&model),
        "--image",
        s(&image),
        "--prompt",
        "make the cat wear a hat",
        "--steps",
        "2",
        "--seed",
        "7",
        "--resize",
        "none",
        "--device",
        "cpu",
        "--output",
        s(&out),
        "--json",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["width"], 80);
    assert_eq!(summary["height"], 64);
    assert_eq!(summary["seed"], 7);
    assert_eq!(summary["device"], "cpu");
    assert!(summary["seconds"]["denoise"].as_f64().unwrap() > 0.0);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("step   2/2"), "{stderr}");
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (80, 64));
    // No temporary file left beside the output.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

#[test]
fn text_to_image_with_jpeg_output_and_rounded_size() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("gen.jpg");
    let model = fixtures().join("tiny-kontext");
    let r = run(&[
        "--model",
        s(&model),
        "--prompt",
        "a lighthouse",
        "--width",
        "70",
        "--height",
        "48",
        "--steps",
        "1",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--output",
        s(&out),
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(
        stderr.contains("width 70 is not a multiple of 16; using 64"),
        "{stderr}"
    );
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (64, 48));
}

#[test]
fn refuses_to_overwrite_the_input_image() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.png");
    std::fs::copy(fixtures().join("context.png"), &input).unwrap();
    let before = std::fs::read(&input).unwrap();
    let model = fixtures().join("tiny-kontext");
    let r = run(&[
        "--model",
        s(&model),
        "--image",
        s(&input),
        "--prompt",
        "x",
        "--output",
        s(&input),
        "--device",
        "cpu",
    ]);
    assert_one_line_error(&r, "refusing to overwrite the input image");
    assert_eq!(std::fs::read(&input).unwrap(), before);
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let model = fixtures().join("tiny-kontext");
    let out = d.path().join("o.png");
    let base = |extra: &[&str]| {
        let mut v = vec![
            "--model",
            s(&model),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--device",
            "cpu",
        ];
        v.extend_from_slice(extra);
        run(&v)
    };
    // Undecodable image.
    let bad = d.path().join("bad.png");
    std::fs::write(&bad, b"definitely not a png").unwrap();
    assert_one_line_error(&base(&["--image", s(&bad), "--output", s(&out)]), "bad.png");
    // Missing image file.
    assert_one_line_error(
        &base(&["--image", "/nonexistent/x.png", "--output", s(&out)]),
        "x.png",
    );
    // Unsupported output extension, and a folder that does not exist.
    assert_one_line_error(
        &base(&["--output", s(&d.path().join("o.bmp"))]),
        ".png, .jpg or .jpeg",
    );
    assert_one_line_error(
        &base(&["--output", "/nonexistent/dir/o.png"]),
        "does not exist",
    );
    // Absurd output size.
    assert_one_line_error(&base(&["--width", "100000", "--output", s(&out)]), "4096");
    // Noise of the wrong shape for the requested size.
    let noise = fixtures().join("t2i_noise.safetensors");
    assert_one_line_error(
        &base(&[
            "--noise",
            s(&noise),
            "--width",
            "128",
            "--height",
            "128",
            "--output",
            s(&out),
        ]),
        "noise is for a 64×48 output",
    );
    // Request mistakes are reported before any model is read (the model path does not exist).
    for (flag, value, needle) in [
        ("--steps", "0", "steps must be between 1 and 1000"),
        ("--guidance", "nan", "guidance must be a finite number"),
        ("--width", "5", "width 5 is below 16"),
    ] {
        let r = run(&[
            "--model",
            "/nonexistent/model",
            "--prompt",
            "x",
            "--device",
            "cpu",
            "--output",
            s(&out),
            flag,
            value,
        ]);
        assert_one_line_error(&r, needle);
    }
    // An output path that is a folder is refused before the work, not at the final rename.
    let dir_png = d.path().join("folder.png");
    std::fs::create_dir(&dir_png).unwrap();
    assert_one_line_error(&base(&["--output", s(&dir_png)]), "is a folder");
    // A model folder without its parts.
    let empty = d.path().join("empty-model");
    std::fs::create_dir(&empty).unwrap();
    let r = run(&[
        "--model",
        s(&empty),
        "--prompt",
        "x",
        "--output",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert_one_line_error(&r, "no model parts found");
    assert!(!out.exists(), "no output may be written by a failed run");
}

/// `--device cuda` where there is no usable GPU: one line with the probe's reason (on this
/// project's build machines: "the NVIDIA driver library (libcuda.so.1) is not installed …"),
/// before anything is loaded.
#[test]
fn device_cuda_without_a_gpu_says_why_in_one_line() {
    let Err(why) = kontext_kernels::cuda_available() else {
        return; // a GPU machine: the CUDA path is covered by kontext-gpu-check
    };
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.png");
    let model = fixtures().join("tiny-kontext");
    let r = run(&[
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--output",
        s(&out),
        "--device",
        "cuda",
    ]);
    assert_one_line_error(&r, "--device cuda: no usable CUDA GPU");
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains(&why), "{stderr}");
    assert!(!out.exists(), "no output may be written by a failed run");
}

/// Without `--device`, a machine without a usable GPU runs on the CPU and says so.
#[test]
fn default_device_falls_back_to_the_cpu_with_a_note() {
    if kontext_kernels::cuda_available().is_ok() {
        return; // a GPU machine runs on the GPU
    }
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.png");
    let model = fixtures().join("tiny-kontext");
    let r = run(&[
        "--model",
        s(&model),
        "--prompt",
        "a lighthouse",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "1",
        "--seed",
        "2",
        "--output",
        s(&out),
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    let notes: Vec<&str> = stderr.lines().filter(|l| l.starts_with("note:")).collect();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("no usable CUDA GPU") && n.contains("on the CPU")),
        "{stderr}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(summary["device"], "cpu");
    assert!(out.exists());
}

#[test]
fn bad_memory_flags_are_one_line_errors_before_any_load() {
    let model = fixtures().join("tiny-kontext");
    for (flag, value, needle) in [
        ("--vram", "abc", "expected GiB"),
        ("--vram", "12X", "expected GiB"),
        ("--vram", "0", "between 1 byte and 1 PB"),
        ("--vram", "-4", "between 1 byte and 1 PB"),
        ("--memory-mode", "huge", "unknown memory mode"),
        ("--weights", "int4", "unknown weight type"),
    ] {
        // FLAG=VALUE, so that a value such as -4 is not read as a flag.
        let arg = format!("{flag}={value}");
        let out = run(&[
            "--model",
            s(&model),
            "--prompt",
            "a cat",
            "--output",
            "/tmp/never-written.png",
            "--device",
            "cpu",
            &arg,
        ]);
        assert_one_line_error(&out, needle);
    }
}
