//! Weights onto the GPU, once, from the checkpoint's bytes.
//!
//! A weight arrives as the memory-mapped bytes of one tensor (or of the parts of one canonical
//! tensor, uploaded one after another into consecutive rows) with its dtype and, for fp8, its
//! per-tensor scale. GEMM weights become bf16 on the GPU, except fp8 weights, which stay fp8
//! (1 byte per weight) with their f32 scale and are dequantised by `fp8.cu` into a bf16 scratch
//! buffer right before their GEMM. Parameter vectors (norm weights, QKNorm scales, GroupNorm
//! affine) become f32; biases take the GEMM output's type (bf16), as cuBLASLt's epilogue wants.
//! This crate knows nothing of files: the engine passes bytes from the loader's `WeightPart`s.

use crate::desc::DType;
use crate::error::{shape_err, Result};
use crate::gpu::{DeviceMat, Gpu};
use half::{bf16, f16};
use std::ops::Range;
use std::sync::Arc;

/// Element types a checkpoint stores floating-point tensors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostDType {
    F32,
    F16,
    Bf16,
    F8E4M3,
    F8E5M2,
}

impl HostDType {
    pub fn size(self) -> usize {
        match self {
            HostDType::F32 => 4,
            HostDType::F16 | HostDType::Bf16 => 2,
            HostDType::F8E4M3 | HostDType::F8E5M2 => 1,
        }
    }
}

/// A linear layer's weight on the GPU: `[out, in]`, bf16, or fp8 with its scales.
#[derive(Debug, Clone)]
pub struct DeviceWeight {
    pub data: DeviceMat,
    /// Row ranges and the scale of each: one range for a weight stored as one tensor, one per
    /// part for a weight assembled from parts with their own scales (diffusers' to_q, to_k, to_v
    /// in a scaled-fp8 file). bf16 weights have their scale applied on upload: `[(0..out, 1)]`.
    pub scales: Vec<(Range<usize>, f32)>,
}

impl DeviceWeight {
    /// A weight with one scale for every row.
    pub fn single(data: DeviceMat, scale: f32) -> DeviceWeight {
        let rows = data.rows();
        DeviceWeight {
            data,
            scales: vec![(0..rows, scale)],
        }
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self.data.dtype(), DType::F8E4M3 | DType::F8E5M2)
    }
}

/// Little-endian `bytes` of `dtype` → f32 values `value · scale` (one f32 multiply). fp8 e4m3
/// decodes through the loader's table (`kontext_loader::dtype::E4M3_TO_F32`), passed in because
/// this crate knows nothing of files; e5m2 is the top byte of an IEEE half.
pub fn to_f32(
    bytes: &[u8],
    dtype: HostDType,
    scale: f32,
    e4m3_lut: Option<&[u32; 256]>,
) -> Result<Vec<f32>> {
    if bytes.len() % dtype.size() != 0 {
        return Err(shape_err(
            "to_f32",
            format!("{} bytes are not whole {dtype:?} elements", bytes.len()),
        ));
    }
    let v: Vec<f32> = match dtype {
        HostDType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        HostDType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        HostDType::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        HostDType::F8E4M3 => {
            let lut = e4m3_lut.ok_or_else(|| {
                shape_err(
                    "to_f32",
                    "e4m3 needs the loader's decode table (E4M3_TO_F32)",
                )
            })?;
            bytes
                .iter()
                .map(|&b| f32::from_bits(lut[b as usize]))
                .collect()
        }
        HostDType::F8E5M2 => bytes
            .iter()
            .map(|&b| f16::from_bits((b as u16) << 8).to_f32())
            .collect(),
    };
    Ok(if scale == 1.0 {
        v
    } else {
        v.into_iter().map(|x| x * scale).collect()
    })
}

/// Little-endian `bytes` of `dtype` → bf16 bits of `value · scale` (f32 multiply, one rounding
/// to nearest even): what `fp8.cu` computes on the GPU. bf16 with scale 1 is copied bit for bit.
pub fn to_bf16_bits(
    bytes: &[u8],
    dtype: HostDType,
    scale: f32,
    e4m3_lut: Option<&[u32; 256]>,
) -> Result<Vec<u16>> {
    if dtype == HostDType::Bf16 && scale == 1.0 {
        if bytes.len() % 2 != 0 {
            return Err(shape_err(
                "to_bf16_bits",
                format!("{} bytes are not whole bf16 elements", bytes.len()),
            ));
        }
        return Ok(bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect());
    }
    Ok(to_f32(bytes, dtype, scale, e4m3_lut)?
        .into_iter()
        .map(|v| bf16::from_f32(v).to_bits())
        .collect())
}

/// Uploads a linear layer's weight `[rows, cols]` from its parts (bytes and scale each),
/// concatenated along rows (e.g. diffusers' to_q, to_k, to_v into one qkv; a single tensor is
/// one part). fp8 stays fp8, each part keeping its scale; other types become bf16 with the scale
/// applied. One counted allocation.
pub fn upload_weight(
    gpu: &Arc<Gpu>,
    parts: &[(&[u8], f32)],
    dtype: HostDType,
    rows: usize,
    cols: usize,
) -> Result<DeviceWeight> {
    let bytes: usize = parts.iter().map(|(p, _)| p.len()).sum();
    let row_bytes = cols * dtype.size();
    if parts
        .iter()
        .any(|(p, _)| row_bytes == 0 || p.len() % row_bytes != 0)
    {
        return Err(shape_err(
            "upload_weight",
            format!("a part is not a whole number of {cols}-wide {dtype:?} rows"),
        ));
    }
    if bytes != rows * row_bytes {
        return Err(shape_err(
            "upload_weight",
            format!(
                "{bytes} bytes of {dtype:?} in {} parts cannot be [{rows}, {cols}]",
                parts.len()
            ),
        ));
    }
    if let Some((_, s)) = parts.iter().find(|(_, s)| !s.is_finite()) {
        return Err(shape_err(
            "upload_weight",
            format!("scale {s} is not finite"),
        ));
    }
    let fp8 = match dtype {
        HostDType::F8E4M3 => Some(DType::F8E4M3),
        HostDType::F8E5M2 => Some(DType::F8E5M2),
        _ => None,
    };
    let data = gpu.alloc_mat(fp8.unwrap_or(DType::Bf16), rows, cols)?;
    let mut scales = Vec::with_capacity(parts.len());
    let mut row0 = 0;
    for &(part, scale) in parts {
        let part_rows = part.len() / row_bytes;
        let dst = data.rows_range(row0, row0 + part_rows)?;
        if fp8.is_some() {
            gpu.write_bytes(&dst, part)?;
            scales.push((row0..row0 + part_rows, scale));
        } else {
            let bits = to_bf16_bits(part, dtype, scale, None)?;
            let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            gpu.write_bytes(&dst, &raw)?;
        }
        row0 += part_rows;
    }
    if fp8.is_none() {
        scales.push((0..rows, 1.0));
    }
    Ok(DeviceWeight { data, scales })
}

/// Uploads a parameter vector `[n]` as f32 `[1, n]` (norm weights, QKNorm scales, GroupNorm
/// affine). fp8 vectors need the loader's e4m3 table.
pub fn upload_vector_f32(
    gpu: &Arc<Gpu>,
    bytes: &[u8],
    dtype: HostDType,
    scale: f32,
    fp8_lut: Option<&[u32; 256]>,
) -> Result<DeviceMat> {
    let v = to_f32(bytes, dtype, scale, fp8_lut)?;
    gpu.upload_f32(&v, 1, v.len())
}

/// Uploads a bias `[n]` as bf16 `[1, n]` (the GEMM epilogue's type for bf16 outputs).
pub fn upload_bias_bf16(
    gpu: &Arc<Gpu>,
    bytes: &[u8],
    dtype: HostDType,
    scale: f32,
    fp8_lut: Option<&[u32; 256]>,
) -> Result<DeviceMat> {
    let v = to_f32(bytes, dtype, scale, fp8_lut)?;
    gpu.upload_bf16(&v, 1, v.len())
}

/// A convolution weight `[Cout, Cin, kh, kw]` (the checkpoint's layout), as f32 values,
/// permuted to `[Cout, kh, kw, Cin]`: the column order of `conv.cu`'s im2col, so the convolution
/// is `col · Wᵀ` with a `[Cout, kh·kw·Cin]` weight.
pub fn conv_weight_khwc(
    w: &[f32],
    cout: usize,
    cin: usize,
    kh: usize,
    kw: usize,
) -> Result<Vec<f32>> {
    if w.len() != cout * cin * kh * kw {
        return Err(shape_err(
            "conv_weight_khwc",
            format!("{} values cannot be [{cout}, {cin}, {kh}, {kw}]", w.len()),
        ));
    }
    let mut out = vec![0.0f32; w.len()];
    for o in 0..cout {
        for i in 0..cin {
            for ky in 0..kh {
                for kx in 0..kw {
                    out[((o * kh + ky) * kw + kx) * cin + i] =
                        w[((o * cin + i) * kh + ky) * kw + kx];
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_conversion_rounds_once_after_scaling() {
        let vals = [1.0f32, -2.5, 3.140625, 1e-8, 65504.0];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bits = to_bf16_bits(&bytes, HostDType::F32, 0.5, None).unwrap();
        for (v, b) in vals.iter().zip(bits) {
            assert_eq!(b, bf16::from_f32(v * 0.5).to_bits());
        }
        // bf16 with scale 1 is copied bit for bit (NaN payloads included).
        let raw = [0x81u8, 0x7f, 0x00, 0x80];
        assert_eq!(
            to_bf16_bits(&raw, HostDType::Bf16, 1.0, None).unwrap(),
            vec![0x7f81, 0x8000]
        );
        assert!(to_bf16_bits(&[0u8; 3], HostDType::F32, 1.0, None).is_err());
        assert!(to_bf16_bits(&[0u8; 3], HostDType::F8E4M3, 1.0, None).is_err());
    }

    #[test]
    fn e5m2_is_the_top_byte_of_a_half() {
        let v = to_f32(&[0x3c, 0xc0, 0x7c, 0x01], HostDType::F8E5M2, 1.0, None).unwrap();
        assert_eq!(v[0], 1.0);
        assert_eq!(v[1], -2.0);
        assert!(v[2].is_infinite());
        assert_eq!(v[3], 2f32.powi(-16));
    }

    #[test]
    fn conv_weight_permutation() {
        // [Cout 2, Cin 3, 3, 3] with value = o·1000 + i·100 + ky·10 + kx.
        let (cout, cin, k) = (2, 3, 3);
        let mut w = Vec::new();
        for o in 0..cout {
            for i in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        w.push((o * 1000 + i * 100 + ky * 10 + kx) as f32);
                    }
                }
            }
        }
        let p = conv_weight_khwc(&w, cout, cin, k, k).unwrap();
        // Row o of the GEMM weight, column (ky·3 + kx)·Cin + i.
        for o in 0..cout {
            for ky in 0..k {
                for kx in 0..k {
                    for i in 0..cin {
                        let col = (ky * k + kx) * cin + i;
                        assert_eq!(
                            p[o * k * k * cin + col],
                            (o * 1000 + i * 100 + ky * 10 + kx) as f32
                        );
                    }
                }
            }
        }
        assert!(conv_weight_khwc(&w[1..], cout, cin, k, k).is_err());
    }
}
