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

/// [`image_ids`] of a grid whose first token sits at `(row0, col0)` (a placed reference).
pub fn image_ids_at(rows: usize, cols: usize, index: f32, row0: usize, col0: usize) -> Vec<f32> {
    let mut ids = Vec::with_capacity(rows * cols * 3);
    for r in 0..rows {
        for c in 0..cols {
            ids.extend_from_slice(&[index, (row0 + r) as f32, (col0 + c) as f32]);
        }
    }
    ids
}

/// Where several context images sit in RoPE position space. Kontext dev was trained with one
/// context image; these are ComfyUI's two conventions for more (`comfy/ldm/flux/model.py`,
/// `ref_latents_method`). With one reference both give the single-image ids `(1, r, c)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RefLayout {
    /// ComfyUI's default ("offset"): every reference has axis 0 = 1; reference k is placed to
    /// the right of or below the ones before it, so no two share a spatial position.
    #[default]
    Offset,
    /// Reference k has axis 0 = k + 1 and no spatial offset.
    Index,
}

impl RefLayout {
    /// `"offset"` or `"index"`.
    pub fn name(self) -> &'static str {
        match self {
            RefLayout::Offset => "offset",
            RefLayout::Index => "index",
        }
    }
}

/// Axis 0 and the spatial offset `(rows, cols)` in patch units of each reference, in order.
///
/// Offset layout: a running extent `(h, w)` in latent pixels of what is placed so far; the next
/// reference goes right of it (column offset `w`) when its height plus `h` exceeds its width plus
/// `w`, else below it (row offset `h`), and the extent grows to cover it. Offsets are converted to
/// 2×2 patches as `(off + 1) / 2`, ComfyUI's rounding (exact here: latent sizes are even).
pub fn reference_placement(shapes: &[LatentShape], layout: RefLayout) -> Vec<(f32, usize, usize)> {
    let (mut h, mut w) = (0usize, 0usize);
    shapes
        .iter()
        .enumerate()
        .map(|(k, s)| match layout {
            RefLayout::Index => ((k + 1) as f32, 0, 0),
            RefLayout::Offset => {
                let (dh, dw) = if s.height + h > s.width + w {
                    (0, w)
                } else {
                    (h, 0)
                };
                h = h.max(s.height + dh);
                w = w.max(s.width + dw);
                (1.0, dh.div_ceil(2), dw.div_ceil(2))
            }
        })
        .collect()
}

/// Position ids of all references in order, `[ΣNc, 3]` ([`reference_placement`]).
pub fn reference_ids(shapes: &[LatentShape], layout: RefLayout) -> Vec<f32> {
    let mut ids = Vec::new();
    for (s, (index, row0, col0)) in shapes.iter().zip(reference_placement(shapes, layout)) {
        ids.extend(image_ids_at(s.height / 2, s.width / 2, index, row0, col0));
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
    /// `[Nx + Nc, 4C]`: packed target, then each packed context in order.
    pub img: Vec<f32>,
    /// `[Nx + Nc, 3]`: target `(0, r, c)`, then the contexts' ids ([`reference_ids`]).
    pub img_ids: Vec<f32>,
    /// Target tokens `Nx` (the rows the sampler keeps; also the schedule's sequence length).
    pub nx: usize,
    /// Context tokens `Nc`, all references together.
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
    prepare_kontext_refs(
        target,
        target_shape,
        &[(context, context_shape)],
        RefLayout::Offset,
    )
}

/// [`prepare_kontext`] with any number of context latents (`[C, h_k, w_k]` each, own sizes),
/// appended in order and placed by `layout`.
pub fn prepare_kontext_refs(
    target: &[f32],
    target_shape: LatentShape,
    contexts: &[(&[f32], LatentShape)],
    layout: RefLayout,
) -> Result<KontextImage> {
    let mut img = pack(target, target_shape)?; // [Nx, 4C]
    let mut shapes = Vec::with_capacity(contexts.len());
    for (latent, s) in contexts {
        if s.channels != target_shape.channels {
            return Err(EngineError::Input {
                name: "context latent",
                len: s.channels,
                expected: target_shape.channels,
                shape: "channels equal to the target latent's".into(),
            });
        }
        img.extend(pack(latent, *s)?); // [Nx + Σ Nc_k, 4C]
        shapes.push(*s);
    }
    let mut img_ids = image_ids(target_shape.height / 2, target_shape.width / 2, 0.0); // [Nx, 3]
    img_ids.extend(reference_ids(&shapes, layout)); // [Nx + Nc, 3]
    Ok(KontextImage {
        img,
        img_ids,
        nx: target_shape.tokens(),
        nc: shapes.iter().map(LatentShape::tokens).sum(),
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

    fn shape(height: usize, width: usize) -> LatentShape {
        LatentShape {
            channels: 1,
            height,
            width,
        }
    }

    #[test]
    fn offset_layout_places_each_reference_beside_the_ones_before_it() {
        // Latent sizes (h, w): a 6×8, a tall 10×4, a wide 4×12. Extent after each: (6, 8) →
        // tall: 10 + 6 > 4 + 8, so right at w = 8 → (10, 12) → wide: 4 + 10 > 12 + 12 is false,
        // so below at h = 10. Patch units: offsets / 2.
        let shapes = [shape(6, 8), shape(10, 4), shape(4, 12)];
        let p = reference_placement(&shapes, RefLayout::Offset);
        assert_eq!(p, vec![(1.0, 0, 0), (1.0, 0, 4), (1.0, 5, 0)]);
        let ids = reference_ids(&shapes, RefLayout::Offset);
        assert_eq!(ids.len(), (12 + 10 + 12) * 3);
        let row = |i: usize| &ids[i * 3..i * 3 + 3];
        assert_eq!(row(0), [1.0, 0.0, 0.0]);
        assert_eq!(row(11), [1.0, 2.0, 3.0]);
        assert_eq!(row(12), [1.0, 0.0, 4.0]); // second: 5 × 2 grid from column 4
        assert_eq!(row(21), [1.0, 4.0, 5.0]);
        assert_eq!(row(22), [1.0, 5.0, 0.0]); // third: 2 × 6 grid from row 5
        assert_eq!(row(33), [1.0, 6.0, 5.0]);
        // A square second reference of equal size goes below (ties go below).
        let p = reference_placement(&[shape(4, 4), shape(4, 4)], RefLayout::Offset);
        assert_eq!(p, vec![(1.0, 0, 0), (1.0, 2, 0)]);
    }

    #[test]
    fn index_layout_counts_axis_0_and_one_reference_is_the_single_image_case() {
        let shapes = [shape(6, 8), shape(10, 4), shape(4, 12)];
        let p = reference_placement(&shapes, RefLayout::Index);
        assert_eq!(p, vec![(1.0, 0, 0), (2.0, 0, 0), (3.0, 0, 0)]);
        for layout in [RefLayout::Offset, RefLayout::Index] {
            assert_eq!(reference_ids(&shapes[1..2], layout), image_ids(5, 2, 1.0));
        }
        let t = shape(4, 4);
        let one = prepare_kontext(&[0.5; 16], t, &[1.0; 48], shape(6, 8)).unwrap();
        let refs = prepare_kontext_refs(
            &[0.5; 16],
            t,
            &[(&[1.0; 48], shape(6, 8)), (&[2.0; 40], shape(10, 4))],
            RefLayout::Index,
        )
        .unwrap();
        assert_eq!((refs.nx, refs.nc), (4, 22));
        assert_eq!(refs.img[..one.img.len()], one.img[..]);
        assert_eq!(refs.img_ids[..one.img_ids.len()], one.img_ids[..]);
        assert!(refs.img[one.img.len()..].iter().all(|&v| v == 2.0));
        assert_eq!(refs.img_ids[one.img_ids.len()..], image_ids(5, 2, 2.0)[..]);
        let bad = LatentShape {
            channels: 2,
            ..shape(2, 2)
        };
        assert!(
            prepare_kontext_refs(&[0.0; 16], t, &[(&[0.0; 8], bad)], RefLayout::Offset).is_err()
        );
    }
}
