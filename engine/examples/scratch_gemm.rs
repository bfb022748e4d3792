use kontext_engine::random::Rng;
use kontext_engine::{Backend, CpuBackend, CpuTensor};
use std::time::Instant;
fn main() {
    let b = CpuBackend;
    let mut rng = Rng::new(1);
    let x = CpuTensor::new(1500, 2048, rng.normals(1500 * 2048)).unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let y = b.gelu_tanh(&x).unwrap();
        println!(
            "gelu op: {:.2} ms {}",
            t.elapsed().as_secs_f64() * 1e3,
            y.rows
        );
    }
    let (l, h, hd) = (1500, 8, 64);
    let x = CpuTensor::new(l, 3 * h * hd, rng.normals(l * 3 * h * hd)).unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let _ = b.attention(&x, h, hd).unwrap();
        let s = t.elapsed().as_secs_f64();
        println!(
            "attention: {:.2} ms, {:.1} GFLOP/s",
            s * 1e3,
            4.0 * (l * l * h * hd) as f64 / s / 1e9
        );
    }
}
