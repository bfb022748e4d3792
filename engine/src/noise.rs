//! The sampler's starting noise from a seed: PyTorch's CPU `torch.randn` for f32, reproduced
//! (MT19937, 24-bit uniforms, Box–Muller in blocks of 16; spec 3.1). The same seed gives the
//! same noise on every machine, and the same noise as
//! `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)`
//! up to the last bit or two of the transcendental functions (PyTorch's vectorised log/sin/cos
//! are accurate to 1 ulp, like the ones used here). With a diffusers pipeline running in f32 and
//! a CPU generator, `--seed` therefore starts from the reference's noise.

/// MT19937, the generator behind `torch.Generator("cpu")`.
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// Seeded as `manual_seed(seed)`: PyTorch keeps the low 32 bits.
    pub fn new(seed: u64) -> Mt19937 {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }

    /// Next 32 random bits.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Uniform on the 2^-24 grid in [0, 1), as `uniform_real_distribution<float>`.
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }
}

/// Box–Muller over 16 uniforms: pairs (j, j + 8), as PyTorch's `normal_fill_16`.
fn normal_fill_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// `n` standard normal f32 values, as `torch.randn(n)` with `manual_seed(seed)` on the CPU.
pub fn randn(seed: u64, n: usize) -> Vec<f32> {
    let mut rng = Mt19937::new(seed);
    if n < 16 {
        // PyTorch takes another (scalar, f64) path below 16 values. No latent is that small
        // (the smallest is C × 2 × 2 with C ≥ 4), so these are simply the first n of a block.
        let mut v: Vec<f32> = (0..16).map(|_| rng.uniform_f32()).collect();
        normal_fill_16(&mut v);
        v.truncate(n);
        return v;
    }
    let mut d: Vec<f32> = (0..n).map(|_| rng.uniform_f32()).collect();
    for i in (0..n - 15).step_by(16) {
        normal_fill_16(&mut d[i..i + 16]);
    }
    if n % 16 != 0 {
        // The tail is redrawn: the last 16 values get fresh uniforms and one more block.
        let tail = &mut d[n - 16..];
        for v in tail.iter_mut() {
            *v = rng.uniform_f32();
        }
        normal_fill_16(tail);
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_output() {
        // The 10000th output of std::mt19937 seeded with the default 5489 is 4123659995
        // (C++ standard, [rand.predef]).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
    }

    #[test]
    fn normals_look_normal_and_are_reproducible() {
        let a = randn(7, 100_003);
        assert_eq!(a, randn(7, 100_003));
        assert_ne!(a[..16], randn(8, 16)[..]);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.02,
            "mean {mean} var {var}"
        );
        assert!(a.iter().all(|x| x.is_finite()));
    }
}
