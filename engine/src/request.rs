//! What one edit or generation asks for, resolved into concrete sizes and noise before any model
//! runs: the context image's working size (spec 2.1), the output size, and the starting noise.

use crate::error::{EngineError, Result};
use crate::image::{preferred_resolution, RgbImage, MAX_OUTPUT_SIDE};
use crate::noise::randn;
use std::path::{Path, PathBuf};

/// How the context image is sized before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizePolicy {
    /// Snap to the closest preferred Kontext resolution (spec 2.1), Lanczos.
    #[default]
    Preferred,
    /// Keep the size, floored to a multiple of 16 (Lanczos to that size when it changes).
    None,
}

/// Where the starting noise comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum NoiseSource {
    /// PyTorch-compatible seeded normals ([`crate::noise::randn`]).
    Seed(u64),
    /// Explicit noise `[C, H/8, W/8]` in latent space (unpacked), e.g. from `--noise FILE`.
    Tensor(Vec<f32>),
}

/// Options of one request. Defaults: 28 steps, guidance 2.5, seed 0, the context's size.
#[derive(Debug, Clone, PartialEq)]
pub struct EditOptions {
    pub steps: usize,
    pub guidance: f32,
    pub noise: NoiseSource,
    /// Output width in pixels (multiple of 16; rounded down otherwise, with a note).
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub resize: ResizePolicy,
}

impl Default for EditOptions {
    fn default() -> Self {
        EditOptions {
            steps: 28,
            guidance: 2.5,
            noise: NoiseSource::Seed(0),
            width: None,
            height: None,
            resize: ResizePolicy::Preferred,
        }
    }
}

impl EditOptions {
    /// Checks what can be checked without the model and the image: step count, guidance,
    /// explicit sizes. Callers run it before loading a model so a typo costs no load.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.steps > 1000 {
            return Err(EngineError::Config(format!(
                "steps must be between 1 and 1000, got {}",
                self.steps
            )));
        }
        if !self.guidance.is_finite() || self.guidance.abs() > 1000.0 {
            return Err(EngineError::Config(format!(
                "guidance must be a finite number of sensible size (Kontext uses 2.5), got {}",
                self.guidance
            )));
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            match v {
                Some(v) if v < 16 => {
                    return Err(EngineError::Config(format!("{name} {v} is below 16 pixels")))
                }
                Some(v) if v > MAX_OUTPUT_SIDE => {
                    return Err(EngineError::Config(format!(
                        "{name} {v} exceeds the {MAX_OUTPUT_SIDE}-pixel limit per side (Kontext works at about 1 MP)"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Output size of a text-to-image request without `--width/--height` (diffusers' default).
pub const DEFAULT_T2I_SIDE: usize = 1024;

/// Image tokens one request may put into the transformer, target and references together:
/// what a single-image request at the per-side limit asks for (a 4096² output and a 4096²
/// context, 2 × 256²). Attention grows with the square of it, so references share this budget
/// rather than each bringing their own.
pub const MAX_IMAGE_TOKENS: usize = 2 * (MAX_OUTPUT_SIDE / 16) * (MAX_OUTPUT_SIDE / 16);

/// Sizes resolved for one request. `notes` says what was adjusted, for the user.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Context images at their working sizes (multiples of 16), in order; empty for
    /// text-to-image.
    pub references: Vec<RgbImage>,
    pub width: usize,
    pub height: usize,
    pub notes: Vec<String>,
}

/// [`Plan`] before any pixel is touched: the working size of each reference and the output.
#[derive(Debug, Clone, PartialEq)]
pub struct SizePlan {
    /// `(width, height)` of each reference after snapping, in order.
    pub references: Vec<(usize, usize)>,
    pub width: usize,
    pub height: usize,
    pub notes: Vec<String>,
}

impl SizePlan {
    /// Image tokens of the transformer's sequence: target plus every reference (2×2 patches of
    /// the 8× latent, i.e. one token per 16×16 pixels).
    pub fn image_tokens(&self) -> usize {
        let tokens = |(w, h): (usize, usize)| (w / 16) * (h / 16);
        tokens((self.width, self.height))
            + self.references.iter().copied().map(tokens).sum::<usize>()
    }
}

fn too_small(what: &str, w: usize, h: usize) -> EngineError {
    EngineError::Config(format!(
        "{what} is {w}×{h}; both sides must be at least 16 pixels"
    ))
}

/// Floors `v` to a multiple of 16, noting it when it changes.
fn floor16(v: usize, what: &str, notes: &mut Vec<String>) -> usize {
    let f = v / 16 * 16;
    if f != v {
        notes.push(format!("{what} {v} is not a multiple of 16; using {f}"));
    }
    f
}

/// Resolves the context's working size and the output size (spec 2.1, 2.5).
pub fn plan(context: Option<&RgbImage>, opts: &EditOptions) -> Result<Plan> {
    plan_references(context.as_slice(), opts)
}

/// [`plan`] for any number of context images: each is snapped on its own, the output defaults
/// to the first one's working size, and all of them count towards [`MAX_IMAGE_TOKENS`].
pub fn plan_references(references: &[&RgbImage], opts: &EditOptions) -> Result<Plan> {
    let sizes: Vec<(usize, usize)> = references.iter().map(|r| (r.width, r.height)).collect();
    let s = plan_sizes(&sizes, opts)?;
    Ok(Plan {
        references: references
            .iter()
            .zip(&s.references)
            .map(|(img, &(w, h))| img.resize_lanczos(w, h))
            .collect(),
        width: s.width,
        height: s.height,
        notes: s.notes,
    })
}

/// [`plan_references`] from the references' `(width, height)` alone, so that a request can be
/// checked before any model loads or any image is resized.
pub fn plan_sizes(references: &[(usize, usize)], opts: &EditOptions) -> Result<SizePlan> {
    opts.validate()?;
    let mut notes = Vec::new();
    let several = references.len() > 1;
    let mut working = Vec::with_capacity(references.len());
    for (k, &(iw, ih)) in references.iter().enumerate() {
        let what = if several {
            format!("context image {}", k + 1)
        } else {
            "context image".to_string()
        };
        let (w, h) = match opts.resize {
            ResizePolicy::Preferred => preferred_resolution(iw, ih),
            ResizePolicy::None => (iw / 16 * 16, ih / 16 * 16),
        };
        if w < 16 || h < 16 {
            return Err(too_small(&format!("the {what}"), iw, ih));
        }
        if (w, h) != (iw, ih) {
            notes.push(format!("{what} resized from {iw}×{ih} to {w}×{h}"));
        }
        working.push((w, h));
    }
    let (dw, dh) = working
        .first()
        .copied()
        .unwrap_or((DEFAULT_T2I_SIDE, DEFAULT_T2I_SIDE));
    let width = floor16(opts.width.unwrap_or(dw), "width", &mut notes);
    let height = floor16(opts.height.unwrap_or(dh), "height", &mut notes);
    if width < 16 || height < 16 {
        return Err(too_small("the output", width, height));
    }
    if width > MAX_OUTPUT_SIDE || height > MAX_OUTPUT_SIDE {
        return Err(EngineError::Config(format!(
            "output {width}×{height} exceeds the {MAX_OUTPUT_SIDE}-pixel limit per side (Kontext works at about 1 MP)"
        )));
    }
    let s = SizePlan {
        references: working,
        width,
        height,
        notes,
    };
    let total = s.image_tokens();
    if total > MAX_IMAGE_TOKENS {
        let refs: Vec<String> = s
            .references
            .iter()
            .map(|&(w, h)| format!("{w}×{h} ({} tokens)", (w / 16) * (h / 16)))
            .collect();
        let hint = match opts.resize {
            ResizePolicy::None => {
                "use smaller or fewer context images, or --resize preferred (about 1 MP each)"
            }
            ResizePolicy::Preferred => "use fewer context images or a smaller output",
        };
        return Err(EngineError::Config(format!(
            "the output {width}×{height} ({} tokens) and the context images {} make {total} image tokens; \
             the limit is {MAX_IMAGE_TOKENS} (one token per 16×16 pixels). HINT: {hint}",
            (width / 16) * (height / 16),
            refs.join(", ")
        )));
    }
    Ok(s)
}

/// The starting noise `[C, H/8, W/8]` for an output of `width × height` (multiples of 16).
pub fn initial_noise(
    source: &NoiseSource,
    channels: usize,
    width: usize,
    height: usize,
) -> Result<Vec<f32>> {
    let n = channels * (height / 8) * (width / 8);
    match source {
        NoiseSource::Seed(seed) => Ok(randn(*seed, n)),
        NoiseSource::Tensor(t) if t.len() == n => Ok(t.clone()),
        NoiseSource::Tensor(t) => Err(EngineError::Config(format!(
            "the noise holds {} values but a {width}×{height} output needs [1, {channels}, {}, {}] = {n}",
            t.len(),
            height / 8,
            width / 8
        ))),
    }
}

/// Reads `--noise FILE`: a safetensors file with one f32 tensor `noise` `[1, C, H/8, W/8]`.
/// Returns the values and `(C, H/8, W/8)`.
pub fn read_noise_file(path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
    let bad = |reason: String| EngineError::Image {
        path: PathBuf::from(path),
        reason,
    };
    if !path.is_file() {
        return Err(bad("not a file (expected a .safetensors noise file)".into()));
    }
    let set = kontext_loader::TensorSet::open(path)?;
    let info = set
        .info("noise")
        .ok_or_else(|| bad("no tensor named \"noise\" (expected f32 [1, C, H/8, W/8])".into()))?;
    if info.dtype != kontext_loader::DType::F32 {
        return Err(bad(format!(
            "tensor \"noise\" is {}, expected F32",
            info.dtype
        )));
    }
    let dims = match info.shape.as_slice() {
        [1, c, h, w] => [*c, *h, *w],
        s => {
            return Err(bad(format!(
                "tensor \"noise\" has shape {s:?}, expected [1, C, H/8, W/8]"
            )))
        }
    };
    let [c, h, w] = dims;
    let max = MAX_OUTPUT_SIDE / 8;
    if c == 0 || h == 0 || w == 0 || h % 2 != 0 || w % 2 != 0 || h > max || w > max {
        return Err(bad(format!(
            "tensor \"noise\" has shape [1, {c}, {h}, {w}]: C must be > 0 and H/8, W/8 even (2×2 patches), between 2 and {max}"
        )));
    }
    let mut v = Vec::new();
    kontext_loader::dtype::decode_into(
        info.dtype,
        set.bytes("noise").expect("present").as_slice(),
        1.0,
        &mut v,
    );
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(bad(format!(
            "tensor \"noise\" holds a non-finite value at index {i}"
        )));
    }
    Ok((v, dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize) -> RgbImage {
        RgbImage {
            width: w,
            height: h,
            pixels: vec![100; w * h * 3],
        }
    }

    #[test]
    fn preferred_snaps_and_output_follows_context() {
        let p = plan(Some(&img(1920, 1080)), &EditOptions::default()).unwrap();
        let c = &p.references[0];
        assert_eq!((c.width, c.height), (1392, 752));
        assert_eq!((p.width, p.height), (1392, 752));
        assert_eq!(p.notes.len(), 1);
    }

    #[test]
    fn resize_none_floors_to_16() {
        let opts = EditOptions {
            resize: ResizePolicy::None,
            ..Default::default()
        };
        let p = plan(Some(&img(100, 70)), &opts).unwrap();
        assert_eq!((p.width, p.height), (96, 64));
        let p = plan(Some(&img(96, 64)), &opts).unwrap();
        assert!(p.notes.is_empty());
        assert!(plan(Some(&img(100, 15)), &opts).is_err());
    }

    #[test]
    fn explicit_sizes_round_down_with_a_note_and_limits_hold() {
        let opts = EditOptions {
            width: Some(100),
            height: Some(64),
            ..Default::default()
        };
        let p = plan(None, &opts).unwrap();
        assert_eq!((p.width, p.height), (96, 64));
        assert!(p.notes[0].contains("width 100"));
        let p = plan(None, &EditOptions::default()).unwrap();
        assert_eq!((p.width, p.height), (1024, 1024));
        let huge = EditOptions {
            width: Some(100_000),
            ..Default::default()
        };
        assert!(plan(None, &huge).unwrap_err().to_string().contains("4096"));
        let zero = EditOptions {
            steps: 0,
            ..Default::default()
        };
        assert!(plan(None, &zero).is_err());
    }

    #[test]
    fn references_are_snapped_one_by_one_and_the_output_follows_the_first() {
        let (a, b) = (img(1920, 1080), img(300, 500));
        let p = plan_references(&[&a, &b], &EditOptions::default()).unwrap();
        let sizes: Vec<_> = p.references.iter().map(|r| (r.width, r.height)).collect();
        assert_eq!(sizes, [(1392, 752), (800, 1328)]);
        assert_eq!((p.width, p.height), (1392, 752));
        assert!(
            p.notes[1].contains("context image 2 resized from 300×500"),
            "{:?}",
            p.notes
        );
        let s = plan_sizes(&[(1920, 1080), (300, 500)], &EditOptions::default()).unwrap();
        assert_eq!(s.image_tokens(), 2 * 87 * 47 + 50 * 83);
        let none = EditOptions {
            resize: ResizePolicy::None,
            ..Default::default()
        };
        let e = plan_sizes(&[(64, 64), (300, 8)], &none).unwrap_err();
        assert!(e.to_string().contains("context image 2 is 300×8"), "{e}");
    }

    #[test]
    fn too_many_image_tokens_is_an_error_naming_every_size() {
        let opts = EditOptions {
            resize: ResizePolicy::None,
            ..Default::default()
        };
        // One 4096² context with a 4096² output is the limit itself.
        let at = plan_sizes(&[(4096, 4096)], &opts).unwrap();
        assert_eq!(at.image_tokens(), MAX_IMAGE_TOKENS);
        let e = plan_sizes(&[(4096, 4096), (32, 16)], &opts)
            .unwrap_err()
            .to_string();
        for needle in [
            "4096×4096 (65536 tokens)",
            "32×16 (2 tokens)",
            "131074",
            "--resize preferred",
        ] {
            assert!(e.contains(needle), "{needle:?} in {e}");
        }
        assert!(plan_sizes(&[(1024, 1024); 3], &EditOptions::default()).is_ok());
    }

    #[test]
    fn noise_files_are_checked() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_noise_file(d.path())
            .unwrap_err()
            .to_string()
            .contains("not a file"));
        let write = |shape: &[usize]| {
            let n: usize = shape.iter().product();
            let header = format!(
                r#"{{"noise":{{"dtype":"F32","shape":{shape:?},"data_offsets":[0,{}]}}}}"#,
                4 * n
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.resize(bytes.len() + 4 * n, 0);
            let p = d.path().join("n.safetensors");
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert_eq!(read_noise_file(&write(&[1, 4, 6, 8])).unwrap().1, [4, 6, 8]);
        for bad in [[1, 4, 3, 5], [1, 0, 2, 2], [1, 4, 0, 0], [1, 4, 2, 1024]] {
            let e = read_noise_file(&write(&bad)).unwrap_err().to_string();
            assert!(e.contains("even (2×2 patches)"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn noise_length_is_checked() {
        let n = initial_noise(&NoiseSource::Seed(1), 16, 64, 48).unwrap();
        assert_eq!(n.len(), 16 * 6 * 8);
        let e = initial_noise(&NoiseSource::Tensor(vec![0.0; 10]), 16, 64, 48).unwrap_err();
        assert!(e.to_string().contains("[1, 16, 6, 8]"), "{e}");
    }
}
