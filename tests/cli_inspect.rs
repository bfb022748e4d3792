//! `kontext-fast inspect` as a user runs it: a whole model folder, single files, damage.

use std::path::Path;
use std::process::Command;

const PIPELINE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/pipeline/tiny-kontext"
);

fn inspect(path: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kontext-fast"))
        .arg("inspect")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn inspects_a_diffusers_saved_kontext_folder() {
    let (ok, stdout, stderr) = inspect(Path::new(PIPELINE));
    assert!(ok, "{stderr}");
    for want in [
        "transformer:",
        "(diffusers folder)",
        "vae:",
        "t5:",
        "clip:",
        "clip tokenizer:",
        "depth: 1",
        "F32 ×60",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in\n{stdout}");
    }
}

#[test]
fn truncated_transformer_shard_is_a_one_line_error() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(Path::new(PIPELINE), d.path());
    let shard = std::fs::read_dir(d.path().join("transformer"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let (ok, _, stderr) = inspect(d.path());
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: transformer:") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn missing_path_and_non_checkpoint_fail_cleanly() {
    let (ok, _, stderr) = inspect(Path::new("/nonexistent/model"));
    assert!(!ok && stderr.contains("no such file"), "{stderr}");
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("photo.safetensors");
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n not a checkpoint").unwrap();
    let (ok, _, stderr) = inspect(&p);
    assert!(
        !ok && stderr.lines().count() == 1 && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn pickle_only_component_folder_says_so() {
    let d = tempfile::tempdir().unwrap();
    copy_dir(Path::new(PIPELINE), d.path());
    let te = d.path().join("text_encoder");
    for e in std::fs::read_dir(&te).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(p).unwrap();
        }
    }
    std::fs::write(te.join("pytorch_model.bin"), b"pickle").unwrap();
    let (ok, _, stderr) = inspect(d.path());
    assert!(!ok);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("text_encoder/ holds PyTorch pickle weights") && stderr.contains("HINT"),
        "{stderr}"
    );
}
