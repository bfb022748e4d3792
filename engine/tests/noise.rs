//! The seeded noise equals PyTorch's CPU `torch.randn` (fixtures from generate_noise.py).

use kontext_engine::noise::randn;
use kontext_loader::TensorSet;
use std::path::Path;

#[test]
fn seeded_noise_matches_torch_randn() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/noise/torch_randn.safetensors"
    ));
    let set = TensorSet::open(path).unwrap();
    let mut cases = 0;
    for key in set.keys() {
        let (seed, n) = key
            .strip_prefix("seed")
            .and_then(|r| r.split_once("_n"))
            .unwrap();
        let (seed, n): (u64, usize) = (seed.parse().unwrap(), n.parse().unwrap());
        let mut want = Vec::new();
        kontext_loader::dtype::decode_into(
            kontext_loader::DType::F32,
            set.bytes(key).unwrap().as_slice(),
            1.0,
            &mut want,
        );
        let got = randn(seed, n);
        assert_eq!(got.len(), want.len());
        // PyTorch's vectorised log/sin/cos and the ones here are each within 1 ulp, so values
        // agree to a few ulp; anything else (wrong uniform bits, pairing, tail rule) is O(1).
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 4e-6 * w.abs().max(1.0),
                "{key}[{i}]: {g} vs torch {w}"
            );
        }
        cases += 1;
    }
    assert_eq!(cases, 5);
}
