//! Which file serves each part: an HF folder, component files, a tokenizer folder, a ComfyUI
//! install with bare file names; and the one error naming the flag for a part nobody supplies.
//! The resolver only finds files (the loaders read them), so the files here are empty stand-ins.

use kontext_loader::{ModelSources, Origin};
use std::fs;
use std::path::{Path, PathBuf};

fn touch(p: &Path) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, b"").unwrap();
}

/// A ComfyUI install: the four files people download, and the tokenizers ComfyUI ships.
fn comfy_install(root: &Path) {
    touch(&root.join("models/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"));
    touch(&root.join("models/vae/ae.safetensors"));
    touch(&root.join("models/text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors"));
    touch(&root.join("models/clip/clip_l.safetensors"));
    touch(&root.join("comfy/sd1_tokenizer/vocab.json"));
    touch(&root.join("comfy/text_encoders/t5_tokenizer/tokenizer.json"));
}

fn how<'a>(origins: &'a [Origin], part: &str) -> (&'a Path, &'a str) {
    let o = origins
        .iter()
        .find(|o| o.part == part)
        .unwrap_or_else(|| panic!("no origin for {part}: {origins:?}"));
    (&o.path, &o.how)
}

fn hf_folder() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pipeline/tiny-kontext"
    ))
}

#[test]
fn an_hf_folder_serves_every_part() {
    let r = ModelSources {
        model: Some(hf_folder()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    for part in [
        "transformer",
        "vae",
        "t5",
        "clip",
        "clip tokenizer",
        "t5 tokenizer",
        "scheduler",
    ] {
        assert_eq!(how(&r.origins, part).1, "--model", "{part}");
    }
    assert!(r.paths.clip_tokenizer.unwrap().ends_with("tokenizer"));
}

#[test]
fn a_comfyui_install_with_bare_names() {
    let d = tempfile::tempdir().unwrap();
    comfy_install(d.path());
    let r = ModelSources {
        diffusion_model: Some("flux1-dev-kontext_fp8_scaled.safetensors".into()),
        vae: Some("ae.safetensors".into()),
        t5xxl: Some("t5xxl_fp8_e4m3fn_scaled.safetensors".into()),
        clip_l: Some("clip_l.safetensors".into()),
        comfyui: Some(d.path().to_path_buf()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    let (p, h) = how(&r.origins, "transformer");
    assert!(p.ends_with("models/diffusion_models/flux1-dev-kontext_fp8_scaled.safetensors"));
    assert_eq!(h, "--diffusion-model in --comfyui models/diffusion_models/");
    // text_encoders/ first, then clip/ (older installs keep the text encoders there).
    assert_eq!(
        how(&r.origins, "t5").1,
        "--t5xxl in --comfyui models/text_encoders/"
    );
    assert_eq!(
        how(&r.origins, "clip").1,
        "--clip-l in --comfyui models/clip/"
    );
    assert_eq!(
        how(&r.origins, "clip tokenizer").1,
        "--comfyui comfy/sd1_tokenizer/"
    );
    assert_eq!(
        how(&r.origins, "t5 tokenizer").1,
        "--comfyui comfy/text_encoders/t5_tokenizer/"
    );
    assert!(r.paths.scheduler.is_none(), "the schedule's defaults apply");
}

#[test]
fn a_component_flag_overrides_the_model_folder() {
    let d = tempfile::tempdir().unwrap();
    let vae = d.path().join("my-ae.safetensors");
    touch(&vae);
    let r = ModelSources {
        model: Some(hf_folder()),
        vae: Some(vae.clone()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(r.paths.vae, Some(vae.clone()));
    assert_eq!(how(&r.origins, "vae"), (vae.as_path(), "--vae"));
    assert_eq!(how(&r.origins, "transformer").1, "--model");
}

#[test]
fn a_tokenizer_folder_serves_the_tokenizers() {
    let d = tempfile::tempdir().unwrap();
    comfy_install(d.path());
    let tok = d.path().join("toks");
    fs::create_dir_all(tok.join("tokenizer")).unwrap();
    fs::create_dir_all(tok.join("tokenizer_2")).unwrap();
    let r = ModelSources {
        diffusion_model: Some("flux1-dev-kontext_fp8_scaled.safetensors".into()),
        vae: Some("ae.safetensors".into()),
        t5xxl: Some("t5xxl_fp8_e4m3fn_scaled.safetensors".into()),
        clip_l: Some("clip_l.safetensors".into()),
        comfyui: Some(d.path().to_path_buf()),
        tokenizers: Some(tok.clone()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert_eq!(
        how(&r.origins, "clip tokenizer"),
        (tok.join("tokenizer").as_path(), "--tokenizers")
    );
    assert_eq!(r.paths.t5_tokenizer, Some(tok.join("tokenizer_2")));
}

#[test]
fn a_missing_tokenizer_is_one_error_naming_the_flags() {
    let d = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = [
        "t.safetensors",
        "ae.safetensors",
        "t5.safetensors",
        "clip.safetensors",
    ]
    .iter()
    .map(|n| d.path().join(n))
    .collect();
    files.iter().for_each(|f| touch(f));
    let e = ModelSources {
        diffusion_model: Some(files[0].clone()),
        vae: Some(files[1].clone()),
        t5xxl: Some(files[2].clone()),
        clip_l: Some(files[3].clone()),
        ..Default::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no CLIP tokenizer") && e.contains("no T5 tokenizer"),
        "{e}"
    );
    assert!(
        e.contains("--tokenizers DIR") && e.contains("--comfyui DIR"),
        "{e}"
    );
    assert!(!e.contains("no VAE"), "{e}");
}

#[test]
fn nothing_given_names_every_part() {
    let e = ModelSources::default().resolve().unwrap_err().to_string();
    for part in [
        "transformer",
        "VAE",
        "T5 encoder",
        "CLIP text encoder",
        "CLIP tokenizer",
    ] {
        assert!(e.contains(&format!("no {part}")), "{part}: {e}");
    }
}

#[test]
fn a_bare_name_not_in_the_install_says_where_it_looked() {
    let d = tempfile::tempdir().unwrap();
    comfy_install(d.path());
    let e = ModelSources {
        vae: Some("flux_vae.safetensors".into()),
        comfyui: Some(d.path().to_path_buf()),
        ..Default::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--vae: no such file here, nor in models/vae/"),
        "{e}"
    );
    let e = ModelSources {
        vae: Some("flux_vae.safetensors".into()),
        ..Default::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("--comfyui DIR"),
        "a bare name without an install hints at it: {e}"
    );
    let e = ModelSources {
        comfyui: Some(d.path().join("nope")),
        ..Default::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(e.contains("--comfyui: not a folder"), "{e}");
}

#[test]
fn a_name_in_a_comfyui_subfolder_and_a_replaced_empty_part() {
    let d = tempfile::tempdir().unwrap();
    comfy_install(d.path());
    touch(
        &d.path()
            .join("models/diffusion_models/flux/kontext.safetensors"),
    );
    let r = ModelSources {
        diffusion_model: Some("flux/kontext.safetensors".into()),
        vae: Some("ae.safetensors".into()),
        t5xxl: Some("t5xxl_fp8_e4m3fn_scaled.safetensors".into()),
        clip_l: Some("clip_l.safetensors".into()),
        comfyui: Some(d.path().to_path_buf()),
        ..Default::default()
    }
    .resolve()
    .unwrap();
    assert!(how(&r.origins, "transformer")
        .0
        .ends_with("models/diffusion_models/flux/kontext.safetensors"));
    // A model folder whose transformer/ holds only a config: --diffusion-model supplies it.
    let hf = d.path().join("hf");
    touch(&hf.join("transformer/config.json"));
    touch(&hf.join("vae/diffusion_pytorch_model.safetensors"));
    let file = d.path().join("t.safetensors");
    touch(&file);
    let r = ModelSources {
        model: Some(hf.clone()),
        diffusion_model: Some(file.clone()),
        ..Default::default()
    };
    let e = r.resolve().unwrap_err().to_string();
    assert!(
        !e.contains("holds no .safetensors"),
        "the replaced part is not a problem: {e}"
    );
    assert!(e.contains("no T5 encoder"), "{e}");
    let e = ModelSources {
        model: Some(hf),
        ..Default::default()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("transformer/ holds no .safetensors"),
        "unreplaced, it is: {e}"
    );
}
