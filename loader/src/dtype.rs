//! Element types found in Flux checkpoints and their exact decoding to f32.

use half::{bf16, f16};

/// A safetensors element type the engine can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// float8 e4m3fn: no infinities, NaN only at `S.1111.111`, max 448.
    F8E4M3,
    /// float8 e5m2: IEEE-like, with infinities.
    F8E5M2,
    /// Integer tensors appear as metadata (`comfy_quant` JSON bytes, `position_ids`); never weights.
    U8,
    I64,
}

impl DType {
    /// Parses the dtype string of a safetensors header; `None` for types the engine does not read.
    pub fn from_safetensors(s: &str) -> Option<DType> {
        Some(match s {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F8_E4M3" => DType::F8E4M3,
            "F8_E5M2" => DType::F8E5M2,
            "U8" => DType::U8,
            "I64" => DType::I64,
            _ => return None,
        })
    }

    /// The safetensors header spelling.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::U8 => "U8",
            DType::I64 => "I64",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 | DType::F8E5M2 | DType::U8 => 1,
            DType::I64 => 8,
        }
    }

    pub fn is_fp8(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F8E5M2)
    }

    /// Whether this dtype holds real-valued weights (as opposed to integer metadata).
    pub fn is_float(self) -> bool {
        !matches!(self, DType::U8 | DType::I64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes one e4m3fn byte. Computed from the bit fields (spec 6.1) rather than through a
/// lookup table so that the table in [`E4M3_TO_F32`] has something independent to be checked
/// against.
pub const fn e4m3fn_to_f32_bits(code: u8) -> u32 {
    let sign = ((code >> 7) as u32) << 31;
    let exp = ((code >> 3) & 0xF) as u32;
    let man = (code & 0x7) as u32;
    if exp == 0xF && man == 0x7 {
        return sign | 0x7FC0_0000; // the only NaN encodings
    }
    if exp == 0 {
        if man == 0 {
            return sign;
        }
        // Subnormal m/8 · 2^-6: normalise into an f32 normal (always representable).
        let mut e: i32 = -6;
        let mut m = man;
        while m & 0x8 == 0 {
            m <<= 1;
            e -= 1;
        }
        let m = m & 0x7;
        return sign | (((e + 127) as u32) << 23) | (m << 20);
    }
    sign | ((exp + 120) << 23) | (man << 20) // rebias 7 → 127
}

/// Decodes one e5m2 byte: it is the top byte of an IEEE half.
pub fn e5m2_to_f32(code: u8) -> f32 {
    f16::from_bits((code as u16) << 8).to_f32()
}

const fn build_e4m3_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3fn_to_f32_bits(i as u8);
        i += 1;
    }
    t
}

/// The 256 e4m3fn values as f32 bit patterns (exact: every e4m3fn value is an f32).
pub static E4M3_TO_F32: [u32; 256] = build_e4m3_table();

/// Decodes little-endian `bytes` of `dtype` into f32, multiplying by `scale` (1.0 for none).
/// The multiplication happens in f32, as in the reference's `_scaled_mm` path.
pub fn decode_into(dtype: DType, bytes: &[u8], scale: f32, out: &mut Vec<f32>) {
    out.reserve(bytes.len() / dtype.size_bytes());
    let s = scale;
    match dtype {
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * s),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32() * s),
        ),
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32() * s),
        ),
        DType::F8E4M3 => out.extend(
            bytes
                .iter()
                .map(|&b| f32::from_bits(E4M3_TO_F32[b as usize]) * s),
        ),
        DType::F8E5M2 => out.extend(bytes.iter().map(|&b| e5m2_to_f32(b) * s)),
        DType::U8 => out.extend(bytes.iter().map(|&b| b as f32 * s)),
        DType::I64 => out.extend(bytes.chunks_exact(8).map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            i64::from_le_bytes(a) as f32 * s
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// e4m3fn value of `code` computed by plain arithmetic on the spec's formula (an independent
    /// route from the bit manipulation above).
    fn e4m3_by_formula(code: u8) -> f64 {
        let s = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xF) as i32;
        let m = (code & 7) as f64;
        if e == 15 && m == 7.0 {
            return f64::NAN;
        }
        if e == 0 {
            s * 2f64.powi(-6) * m / 8.0
        } else {
            s * 2f64.powi(e - 7) * (1.0 + m / 8.0)
        }
    }

    #[test]
    fn e4m3fn_all_256_codes_match_formula() {
        let mut nans = 0;
        for code in 0..=255u8 {
            let got = f32::from_bits(E4M3_TO_F32[code as usize]);
            let want = e4m3_by_formula(code);
            if want.is_nan() {
                assert!(got.is_nan(), "code {code:#04x} should be NaN, got {got}");
                nans += 1;
            } else {
                assert_eq!(got as f64, want, "code {code:#04x}");
                // Signed zero is kept.
                assert_eq!(
                    got.is_sign_negative(),
                    code & 0x80 != 0,
                    "sign of {code:#04x}"
                );
            }
        }
        assert_eq!(nans, 2, "only 0x7F and 0xFF are NaN");
    }

    #[test]
    fn e4m3fn_landmarks() {
        let v = |c: u8| f32::from_bits(E4M3_TO_F32[c as usize]);
        assert_eq!(v(0x7E), 448.0);
        assert_eq!(v(0xFE), -448.0);
        assert_eq!(v(0x08), 0.015625); // min normal 2^-6
        assert_eq!(v(0x01), 0.001953125); // min subnormal 2^-9
        assert_eq!(v(0x7D), 416.0); // 1111.101
        assert_eq!(v(0x78), 256.0); // 1111.000 is a normal number, not inf
        assert_eq!(v(0x38), 1.0);
    }

    #[test]
    fn e5m2_landmarks() {
        assert_eq!(e5m2_to_f32(0x3C), 1.0);
        assert_eq!(e5m2_to_f32(0x7B), 57344.0);
        assert!(e5m2_to_f32(0x7C).is_infinite());
        assert!(e5m2_to_f32(0x7D).is_nan());
        assert_eq!(e5m2_to_f32(0x01), 2f32.powi(-16));
    }

    #[test]
    fn decode_applies_scale_and_little_endian() {
        let mut out = Vec::new();
        decode_into(
            DType::BF16,
            &bf16::from_f32(1.5).to_le_bytes(),
            2.0,
            &mut out,
        );
        decode_into(DType::F32, &(-3.25f32).to_le_bytes(), 1.0, &mut out);
        decode_into(DType::F16, &f16::from_f32(0.5).to_le_bytes(), 1.0, &mut out);
        decode_into(DType::F8E4M3, &[0x38], 0.25, &mut out);
        assert_eq!(out, vec![3.0, -3.25, 0.5, 0.25]);
    }
}
