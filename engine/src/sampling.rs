//! Host-side helpers of BFL's `sampling.py` that the denoising loop needs: latent packing
//! (spec 3.2), Kontext position ids and sequence assembly (spec 2.3, 2.4).

#![warn(missing_docs)]

use crate::error::{EngineError, Result};

/// Shape of one latent `[channels, height, width]` (batch 1), e.g. `[16, 128, 128]` for 1024².
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentShape {
    /// Latent channels `C` (16).
    pub channels: usize,
    /// Latent height `h` (even).
    pub height: usize,
    /// Latent width `w` (even).
    pub width: usize,
}

impl LatentShape {
    /// Tokens after packing: `(h/2)·(w/2)`.
    pub fn tokens(&self) -> usize {
        (self.height / 2) * (self.width / 2)
    }

    /// Features per token after packing: `4·C`.
    pub fn token_dim(&self) -> usize {
        4 * self.channels
    }

    fn numel(&self) -> usize {
        self.channels * self.height * self.width
    }

    fn check(&self, what: &'static str, len: usize, expected: usize) -> Result<()> {
        if self.height % 2 != 0 || self.width % 2 != 0 || len != expected {
            return Err(EngineError::Input {
                name: what,
                len,
                expected,
                shape: format!(
                    "latent [{}, {}, {}] with even height and width",
                    self.channels, self.height, self.width
                ),
            });
        }
        Ok(())
    }
}

/// `latent [C, h, w]` → `tokens [(h/2)·(w/2), 4C]`: token `(y/2)·(w/2) + x/2`, feature
/// `c·4 + (y%2)·2 + x%2` (einops `c (h ph) (w pw) -> (h w) (c ph pw)`).
pub fn pack(latent: &[f32], s: LatentShape) -> Result<Vec<f32>> {
    s.check("latent", latent.len(), s.numel())?;
    let (w2, f) = (s.width / 2, s.token_dim());
    let mut out = vec![0.0; latent.len()];
    for c in 0..s.channels {
        for y in 0..s.height {
            for x in 0..s.width {
                let token = (y / 2) * w2 + x / 2;
                let feature = c * 4 + (y % 2) * 2 + x % 2;
                out[token * f + feature] = latent[(c * s.height + y) * s.width + x];
            }
        }
    }
    Ok(out)
}

/// Inverse of [`pack`]: `tokens [(h/2)·(w/2), 4C]` → `latent [C, h, w]`.
pub fn unpack(tokens: &[f32], s: LatentShape) -> Result<Vec<f32>> {
    s.check("tokens", tokens.len(), s.numel())?;
    let (w2, f) = (s.width / 2, s.token_dim());
    let mut out = vec![0.0; tokens.len()];
    for c in 0..s.channels {
        for y in 0..s.height {
            for x in 0..s.width {
                let token = (y / 2) * w2 + x / 2;
                let feature = c * 4 + (y % 2) * 2 + x % 2;
                out[(c * s.height + y) * s.width + x] = tokens[token * f + feature];
            }
        }
    }
    Ok(out)
}

/// Position ids of an `rows × cols` token grid, row-major: `(index, r, c)` → `[rows·cols, 3]`.
/// Index 0 = the target image, 1 = the (first) context image (spec 2.3).
pub fn image_ids(rows: usize, cols: usize, index: f32) -> Vec<f32> {
    let mut ids = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            ids.extend_from_slice(&[index, r as f32, c as f32]);
        }
    }
    ids
}

/// Text position ids: `[Lt, 3]` zeros.
pub fn txt_ids(lt: usize) -> Vec<f32> {
    vec![0.0; lt * 3]
}

/// The image half of one Kontext forward (spec 2.4): target tokens then context tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct KontextImage {
    /// `[Nx + Nc, 4C]`: packed target, then packed context.
    pub img: Vec<f32>,
    /// `[Nx + Nc, 3]`: target `(0, r, c)`, then context `(1, r, c)`.
    pub img_ids: Vec<f32>,
    /// Target tokens `Nx` (the rows the sampler keeps; also the schedule's sequence length).
    pub nx: usize,
    /// Context tokens `Nc`.
    pub nc: usize,
}

/// Packs the target latent and the context latent and assembles `[target ‖ context]` with their
/// ids, like BFL's `prepare_kontext` + `denoise` (`img [C, h, w]` each, own sizes).
pub fn prepare_kontext(
    target: &[f32],
    target_shape: LatentShape,
    context: &[f32],
    context_shape: LatentShape,
) -> Result<KontextImage> {
    if target_shape.channels != context_shape.channels {
        return Err(EngineError::Input {
            name: "context latent",
            len: context_shape.channels,
            expected: target_shape.channels,
            shape: "channels equal to the target latent's".into(),
        });
    }
    let mut img = pack(target, target_shape)?; // [Nx, 4C]
    img.extend(pack(context, context_shape)?); // [Nx + Nc, 4C]
    let (th, tw) = (target_shape.height / 2, target_shape.width / 2);
    let (ch, cw) = (context_shape.height / 2, context_shape.width / 2);
    let mut img_ids = image_ids(th, tw, 0.0); // [Nx, 3]
    img_ids.extend(image_ids(ch, cw, 1.0)); // [Nx + Nc, 3]
    Ok(KontextImage {
        img,
        img_ids,
        nx: target_shape.tokens(),
        nc: context_shape.tokens(),
    })
}

/// The target rows `pred[:Nx]` of a model output `[Nx + Nc, channels]` (spec 2.4).
pub fn target_rows(pred: &[f32], nx: usize, channels: usize) -> Result<&[f32]> {
    pred.get(..nx * channels).ok_or(EngineError::Input {
        name: "pred",
        len: pred.len(),
        expected: nx * channels,
        shape: format!("at least [Nx = {nx}, {channels}]"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Rng;

    #[test]
    fn pack_matches_the_einops_formula_and_unpack_inverts_it() {
        // odd channel count, non-square, h/2 and w/2 odd
        let s = LatentShape {
            channels: 3,
            height: 6,
            width: 10,
        };
        let latent = Rng::new(1).normals(3 * 6 * 10);
        let tokens = pack(&latent, s).unwrap();
        assert_eq!(tokens.len(), s.tokens() * s.token_dim());
        // einops "c (h ph) (w pw) -> (h w) (c ph pw)" written as nested loops over the output
        let mut expect = Vec::new();
        for h in 0..3 {
            for w in 0..5 {
                for c in 0..3 {
                    for ph in 0..2 {
                        for pw in 0..2 {
                            expect.push(latent[(c * 6 + h * 2 + ph) * 10 + w * 2 + pw]);
                        }
                    }
                }
            }
        }
        assert_eq!(tokens, expect);
        assert_eq!(unpack(&tokens, s).unwrap(), latent);
    }

    #[test]
    fn pack_rejects_odd_sizes_and_wrong_lengths() {
        let odd = LatentShape {
            channels: 1,
            height: 3,
            width: 2,
        };
        assert!(pack(&[0.0; 6], odd).is_err());
        let s = LatentShape {
            channels: 1,
            height: 2,
            width: 2,
        };
        assert!(pack(&[0.0; 5], s).is_err());
        assert!(unpack(&[0.0; 3], s).is_err());
    }

    #[test]
    fn kontext_ids_put_target_at_index_0_and_context_at_index_1() {
        let t = LatentShape {
            channels: 2,
            height: 6,
            width: 8,
        };
        let c = LatentShape {
            channels: 2,
            height: 4,
            width: 6,
        };
        let k = prepare_kontext(&[1.0; 96], t, &[2.0; 48], c).unwrap();
        assert_eq!((k.nx, k.nc), (12, 6));
        assert_eq!(k.img.len(), 18 * 8);
        assert!(k.img[..12 * 8].iter().all(|&v| v == 1.0));
        assert!(k.img[12 * 8..].iter().all(|&v| v == 2.0));
        let row = |i: usize| &k.img_ids[i * 3..i * 3 + 3];
        assert_eq!(row(0), [0.0, 0.0, 0.0]);
        assert_eq!(row(5), [0.0, 1.0, 1.0]); // target grid 3 × 4
        assert_eq!(row(11), [0.0, 2.0, 3.0]);
        assert_eq!(row(12), [1.0, 0.0, 0.0]); // context starts at (1, 0, 0): no spatial offset
        assert_eq!(row(16), [1.0, 1.0, 1.0]); // context grid 2 × 3
        assert_eq!(row(17), [1.0, 1.0, 2.0]);
        assert_eq!(txt_ids(4), vec![0.0; 12]);
        let pred: Vec<f32> = (0..18 * 8).map(|i| i as f32).collect();
        assert_eq!(target_rows(&pred, 12, 8).unwrap(), &pred[..96]);
        assert!(target_rows(&pred, 19, 8).is_err());
    }
}
