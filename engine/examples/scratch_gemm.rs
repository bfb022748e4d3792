use kontext_engine::random::Rng;
use kontext_engine::{Backend, CpuBackend, CpuTensor, HostWeight};
use std::time::Instant;
fn main() {
    let b = CpuBackend;
    let mut rng = Rng::new(1);
    for (l, inp, out) in [(1500, 512, 2048), (1500, 2048, 512)] {
        let x = CpuTensor::new(l, inp, rng.normals(l * inp)).unwrap();
        let w = b
            .load_linear(
                "w",
                HostWeight {
                    shape: vec![out, inp],
                    data: rng.normals(out * inp),
                },
                None,
            )
            .unwrap();
        for _ in 0..4 {
            let t = Instant::now();
            let _ = b.linear(&x, &w).unwrap();
            let s = t.elapsed().as_secs_f64();
            println!(
                "linear {l}x{inp}->{out}: {:.2} ms, {:.1} GFLOP/s",
                s * 1e3,
                2.0 * (l * inp * out) as f64 / s / 1e9
            );
        }
    }
}
