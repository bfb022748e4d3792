//! Images in and out: decoding any common format to RGB, the Kontext preferred-resolution rule,
//! PIL-exact Lanczos resizing, conversion to and from the VAE's [-1, 1] tensors, and atomic
//! writes.

use crate::error::{EngineError, Result};
use image::ImageDecoder;
use std::path::Path;

/// Largest side accepted for an input image. Larger images are refused with this limit in the
/// message rather than decoded into gigabytes (a 16384² RGB image is 0.8 GB).
pub const MAX_INPUT_SIDE: u32 = 16384;

/// Largest side of an output image: 4 MP-class outputs are already far outside what Kontext
/// was trained on (about 1 MP), and the step cost grows with the square of the token count.
pub const MAX_OUTPUT_SIDE: usize = 4096;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}×{})", self.width, self.height)
    }
}

/// (width, height) pairs Kontext was trained on (`PREFERRED_KONTEXT_RESOLUTIONS`, spec 2.1).
pub const PREFERRED_KONTEXT_RESOLUTIONS: [(usize, usize); 17] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
];

/// The preferred resolution whose aspect ratio is closest to `width / height` (first in table
/// order on ties, as the reference's `min`).
pub fn preferred_resolution(width: usize, height: usize) -> (usize, usize) {
    let ar = width as f64 / height as f64;
    let mut best = PREFERRED_KONTEXT_RESOLUTIONS[0];
    let mut best_d = f64::INFINITY;
    for &(w, h) in &PREFERRED_KONTEXT_RESOLUTIONS {
        let d = (ar - w as f64 / h as f64).abs();
        if d < best_d {
            best = (w, h);
            best_d = d;
        }
    }
    best
}

impl RgbImage {
    /// Decodes PNG, JPEG or WebP (any colour mode: grey, palette, alpha, 16-bit) to 8-bit RGB.
    /// Alpha is dropped, as PIL's `convert("RGB")` does.
    pub fn open(path: &Path) -> Result<RgbImage> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::Image {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::decode(&bytes).map_err(|reason| EngineError::Image {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Decodes an in-memory PNG, JPEG or WebP; the error says why in one line.
    pub fn decode(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?;
        let format = reader
            .format()
            .ok_or("not a PNG, JPEG or WebP image (unrecognised header)")?;
        if !matches!(
            format,
            image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP
        ) {
            return Err(format!(
                "{format:?} images are not supported; use PNG, JPEG or WebP"
            ));
        }
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| format!("cannot read {format:?} header: {e}"))?;
        if w == 0 || h == 0 || w > MAX_INPUT_SIDE || h > MAX_INPUT_SIDE {
            return Err(format!(
                "image is {w}×{h}; sides must be between 1 and {MAX_INPUT_SIDE} pixels"
            ));
        }
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        // The side limit above is the real limit; the decoder's default 512 MiB budget would
        // refuse large legal images (a 12000² RGBA PNG) with an unclear message.
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_INPUT_SIDE);
        limits.max_image_height = Some(MAX_INPUT_SIDE);
        limits.max_alloc = Some(MAX_INPUT_SIDE as u64 * MAX_INPUT_SIDE as u64 * 8);
        reader.limits(limits);
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
        // Phone photos store their rotation in EXIF; show the picture the way viewers do
        // (diffusers' `load_image` applies the same `exif_transpose`).
        let orientation = decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        let mut img = image::DynamicImage::from_decoder(decoder)
            .map_err(|e| format!("cannot decode {format:?}: {e}"))?;
        img.apply_orientation(orientation);
        let rgb = img.to_rgb8();
        Ok(RgbImage {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            pixels: rgb.into_raw(),
        })
    }

    /// Resizes with PIL's Lanczos filter, reproducing `Image.resize(size, LANCZOS)` exactly:
    /// separable passes, coefficients normalised then fixed-point with 22 fractional bits, 8-bit
    /// rounding and clamping after each pass. A side that does not change is not filtered.
    /// Pillow runs the horizontal pass first, except when the width grows while the height
    /// shrinks (then the shrinking pass goes first); checked against Pillow 13 on every mix of
    /// growing and shrinking sides.
    pub fn resize_lanczos(&self, width: usize, height: usize) -> RgbImage {
        if width > self.width && height < self.height {
            self.resize_rows(height).resize_columns(width)
        } else {
            self.resize_columns(width).resize_rows(height)
        }
    }

    /// Horizontal pass: every row resampled to `width`.
    fn resize_columns(&self, width: usize) -> RgbImage {
        if width == self.width {
            return self.clone();
        }
        let coeffs = pil_coeffs(self.width, width);
        let mut out = vec![0u8; width * self.height * 3];
        for y in 0..self.height {
            let row = &self.pixels[y * self.width * 3..(y + 1) * self.width * 3];
            for (x, (start, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let taps = k
                        .iter()
                        .enumerate()
                        .map(|(i, &w)| (row[(start + i) * 3 + c], w));
                    out[(y * width + x) * 3 + c] = convolve(taps);
                }
            }
        }
        RgbImage {
            width,
            height: self.height,
            pixels: out,
        }
    }

    /// Vertical pass: every column resampled to `height`.
    fn resize_rows(&self, height: usize) -> RgbImage {
        if height == self.height {
            return self.clone();
        }
        let coeffs = pil_coeffs(self.height, height);
        let stride = self.width * 3;
        let mut out = vec![0u8; stride * height];
        for (y, (start, k)) in coeffs.iter().enumerate() {
            for x in 0..stride {
                let taps = k
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| (self.pixels[(start + i) * stride + x], w));
                out[y * stride + x] = convolve(taps);
            }
        }
        RgbImage {
            width: self.width,
            height,
            pixels: out,
        }
    }

    /// The VAE input: [3, H, W] f32 in [-1, 1], `2·(p/255) − 1` (diffusers' normalisation).
    pub fn to_tensor(&self) -> Vec<f32> {
        let (w, h) = (self.width, self.height);
        let mut t = vec![0f32; 3 * h * w];
        for i in 0..h * w {
            for c in 0..3 {
                t[c * h * w + i] = 2.0 * (self.pixels[i * 3 + c] as f32 / 255.0) - 1.0;
            }
        }
        t
    }

    /// From the VAE output [3, H, W] in [-1, 1]: `round(255 · clamp(x/2 + 0.5, 0, 1))`
    /// (diffusers' rule, spec 3.6).
    /// Fails on a length other than `3·H·W` or on NaN/Inf (a broken model must not become a
    /// black picture).
    pub fn from_tensor(t: &[f32], width: usize, height: usize) -> Result<RgbImage> {
        let hw = width * height;
        if t.len() != 3 * hw {
            return Err(EngineError::Input {
                name: "pixels",
                len: t.len(),
                expected: 3 * hw,
                shape: format!("[3, {height}, {width}]"),
            });
        }
        if let Some(i) = t.iter().position(|v| !v.is_finite()) {
            return Err(EngineError::Config(format!(
                "the decoder produced a non-finite value (pixel value {i} of [3, {height}, {width}]); the autoencoder weights or config are broken"
            )));
        }
        let mut pixels = vec![0u8; 3 * hw];
        for i in 0..hw {
            for c in 0..3 {
                let v = (t[c * hw + i] / 2.0 + 0.5).clamp(0.0, 1.0);
                pixels[i * 3 + c] = (v * 255.0).round() as u8;
            }
        }
        Ok(RgbImage {
            width,
            height,
            pixels,
        })
    }

    /// Writes PNG or JPEG (quality 95) by the extension of `path`, atomically: the image goes to
    /// a temporary file in the same folder, which is then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let err = |reason: String| EngineError::Image {
            path: path.to_path_buf(),
            reason,
        };
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .unwrap_or_default();
        let format = match ext.as_str() {
            "png" => image::ImageFormat::Png,
            "jpg" | "jpeg" => image::ImageFormat::Jpeg,
            _ => return Err(err("output must end in .png, .jpg or .jpeg".into())),
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(err(format!("folder {} does not exist", dir.display())));
        }
        let buf =
            image::RgbImage::from_raw(self.width as u32, self.height as u32, self.pixels.clone())
                .ok_or_else(|| err("pixel buffer does not match the image size".into()))?;
        let mut encoded = Vec::new();
        let mut cursor = std::io::Cursor::new(&mut encoded);
        match format {
            image::ImageFormat::Jpeg => {
                let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut cursor, 95);
                buf.write_with_encoder(enc)
                    .map_err(|e| err(e.to_string()))?;
            }
            _ => buf
                .write_to(&mut cursor, format)
                .map_err(|e| err(e.to_string()))?,
        }
        // A uniquely named temporary file in the destination folder, synced, then renamed over
        // `path`: readers see the old file or the whole new one, never a part.
        let mut tmp = tempfile::Builder::new()
            .prefix(".kontext-fast-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| {
                err(format!(
                    "cannot create a temporary file in {}: {e}",
                    dir.display()
                ))
            })?;
        std::io::Write::write_all(&mut tmp, &encoded)
            .and_then(|_| tmp.as_file().sync_all())
            .map_err(|e| err(format!("cannot write the image: {e}")))?;
        tmp.persist(path).map_err(|e| {
            err(format!(
                "cannot move the finished image into place: {}",
                e.error
            ))
        })?;
        Ok(())
    }
}

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// One output value: fixed-point sum with PIL's rounding offset, then clamped to 8 bits.
fn convolve(taps: impl Iterator<Item = (u8, i32)>) -> u8 {
    let acc = taps.fold(1i64 << (PRECISION_BITS - 1), |a, (p, w)| {
        a + p as i64 * w as i64
    });
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output pixel: the first input index and the fixed-point weights (PIL's
/// `precompute_coeffs` + `normalize_coeffs_8bpc` for a full-image box).
fn pil_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero; both bounds are then clamped.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| lanczos((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let f = v * (1u64 << PRECISION_BITS) as f64;
                    (if f < 0.0 { f - 0.5 } else { f + 0.5 }) as i32
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_resolution_picks_closest_aspect() {
        assert_eq!(preferred_resolution(1000, 1000), (1024, 1024));
        assert_eq!(preferred_resolution(1920, 1080), (1392, 752));
        assert_eq!(preferred_resolution(1080, 1920), (752, 1392));
        assert_eq!(preferred_resolution(100, 10_000), (672, 1568));
        for (w, h) in PREFERRED_KONTEXT_RESOLUTIONS {
            assert_eq!((w % 16, h % 16), (0, 0));
            assert_eq!(preferred_resolution(w, h), (w, h));
        }
    }

    #[test]
    fn resize_to_same_size_is_identity_and_constant_stays_constant() {
        let img = RgbImage {
            width: 5,
            height: 3,
            pixels: (0..45).map(|i| (i * 5) as u8).collect(),
        };
        assert_eq!(img.resize_lanczos(5, 3), img);
        let flat = RgbImage {
            width: 7,
            height: 9,
            pixels: vec![77; 7 * 9 * 3],
        };
        let r = flat.resize_lanczos(3, 4);
        assert!(r.pixels.iter().all(|&p| p == 77), "{:?}", r.pixels);
        let up = flat.resize_lanczos(20, 17);
        assert!(up.pixels.iter().all(|&p| p == 77));
    }

    #[test]
    fn tensor_round_trip() {
        let img = RgbImage {
            width: 4,
            height: 2,
            pixels: (0..24).map(|i| (i * 11) as u8).collect(),
        };
        let t = img.to_tensor();
        assert_eq!(t.len(), 24);
        assert_eq!(t[0], -1.0);
        assert_eq!(RgbImage::from_tensor(&t, 4, 2).unwrap(), img);
        assert!(RgbImage::from_tensor(&t[1..], 4, 2).is_err());
        let mut nan = t.clone();
        nan[5] = f32::NAN;
        assert!(RgbImage::from_tensor(&nan, 4, 2).is_err());
    }

    #[test]
    fn decode_rejects_garbage_and_absurd_sizes() {
        assert!(RgbImage::decode(b"not an image")
            .unwrap_err()
            .contains("not a PNG"));
        // A valid PNG one pixel wider than the limit (it compresses to a few bytes).
        let mut png = Vec::new();
        image::RgbImage::new(MAX_INPUT_SIDE + 1, 1)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let e = RgbImage::decode(&png).unwrap_err();
        assert!(e.contains("16385×1") && e.contains("16384"), "{e}");
        // Truncated PNG.
        let mut ok = Vec::new();
        image::RgbImage::new(8, 8)
            .write_to(&mut std::io::Cursor::new(&mut ok), image::ImageFormat::Png)
            .unwrap();
        assert!(RgbImage::decode(&ok[..ok.len() / 2]).is_err());
    }

    #[test]
    fn save_is_atomic_and_checks_extension() {
        let d = tempfile::tempdir().unwrap();
        let img = RgbImage {
            width: 2,
            height: 2,
            pixels: vec![9; 12],
        };
        let p = d.path().join("out.png");
        img.save(&p).unwrap();
        assert_eq!(RgbImage::open(&p).unwrap(), img);
        assert!(img.save(&d.path().join("out.bmp")).is_err());
        assert!(img.save(&d.path().join("missing/out.png")).is_err());
        let leftovers: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
        img.save(&d.path().join("out.jpg")).unwrap();
    }
}
