//! The denoising schedule (spec 3.3): `get_schedule` and `time_shift` of the reference.

use kontext_loader::SchedulerConfig;

/// `exp(mu) / (exp(mu) + (1/t − 1))` (sigma = 1), written as `1 / (1 + (1/t − 1)·e^−mu)` so
/// that no `mu` overflows; t = 0 stays 0 and t = 1 stays 1.
pub fn time_shift(mu: f64, t: f64) -> f64 {
    if t <= 0.0 {
        return 0.0;
    }
    if t >= 1.0 {
        return 1.0;
    }
    1.0 / (1.0 + (1.0 / t - 1.0) * (-mu).exp())
}

/// `num_steps + 1` times from 1 (noise) down to 0 (image), shifted for a target of
/// `image_seq_len` tokens (the target only: context tokens do not count, spec 2.4).
/// Computed in f64 and rounded once to f32, as diffusers does (the BFL reference computes in
/// f32; the two differ in the last bit at most).
pub fn get_schedule(num_steps: usize, image_seq_len: usize, cfg: &SchedulerConfig) -> Vec<f32> {
    let mu = cfg.mu(image_seq_len);
    (0..=num_steps)
        .map(|i| time_shift(mu, 1.0 - i as f64 / num_steps as f64) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_spec_table_for_28_steps_at_1024() {
        // Spec 3.3, seq 4096 (mu = 1.15), N = 28.
        let want = [
            1.000000, 0.988409, 0.976222, 0.963394, 0.949873, 0.935599, 0.920509, 0.904531,
            0.887583, 0.869576, 0.850406, 0.829956, 0.808095, 0.784672, 0.759511, 0.732413,
            0.703145, 0.671435, 0.636964, 0.599357, 0.558163, 0.512844, 0.462748, 0.407078,
            0.344849, 0.274828, 0.195455, 0.104721, 0.0,
        ];
        let got = get_schedule(28, 4096, &SchedulerConfig::default());
        assert_eq!(got.len(), 29);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1.5e-6, "{g} vs {w}");
        }
        assert!((SchedulerConfig::default().mu(4096) - 1.15).abs() < 1e-12);
    }

    #[test]
    fn extreme_shifts_stay_a_schedule() {
        for mu in [-1e6, -50.0, 0.0, 50.0, 1e6] {
            let s: Vec<f64> = (0..=10)
                .map(|i| time_shift(mu, 1.0 - i as f64 / 10.0))
                .collect();
            assert!(
                s.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)),
                "mu {mu}: {s:?}"
            );
            assert!(s.windows(2).all(|w| w[0] >= w[1]), "mu {mu}: {s:?}");
        }
    }

    #[test]
    fn small_targets_shift_less() {
        let cfg = SchedulerConfig::default();
        let small = get_schedule(4, 12, &cfg);
        let big = get_schedule(4, 4096, &cfg);
        assert_eq!(small[0], 1.0);
        assert_eq!(small[4], 0.0);
        assert!(small[2] < big[2]);
        assert!(small.windows(2).all(|w| w[0] > w[1]));
    }
}
