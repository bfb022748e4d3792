//! Every CPU op against a naive f64 formula on random inputs, odd sizes included
//! (ggml `test-backend-ops` style; the CUDA backend is later checked against these same ops).

mod common;

use common::{assert_close, attention_ref, gelu_tanh_ref, host, ln_ref, rand, rms_ref, silu_ref};
use kontext_engine::layers::{gelu_tanh, silu};
use kontext_engine::random::Rng;
use kontext_engine::{timestep_embedding, Backend, CpuBackend, CpuTensor, EmbedNd};

const B: CpuBackend = CpuBackend;

#[test]
fn linear_matches_naive_matmul() {
    let mut rng = Rng::new(11);
    for (l, inp, out, bias) in [
        (7, 13, 5, true),
        (1, 33, 17, true),
        (37, 1, 3, false),
        (64, 96, 80, true),
    ] {
        let x = rand(&mut rng, l, inp);
        let w = rng.normals(out * inp);
        let bv = rng.normals(out);
        let lin = B
            .load_linear(
                "t",
                host(&[out, inp], w.clone()),
                bias.then(|| host(&[out], bv.clone())),
            )
            .unwrap();
        let y = B.linear(&x, &lin).unwrap();
        assert_eq!((y.rows, y.cols), (l, out));
        let mut r = vec![0.0f64; l * out];
        for i in 0..l {
            for o in 0..out {
                let mut s = if bias { bv[o] as f64 } else { 0.0 };
                for k in 0..inp {
                    s += x.data[i * inp + k] as f64 * w[o * inp + k] as f64;
                }
                r[i * out + o] = s;
            }
        }
        assert_close(&format!("linear {l}x{inp}->{out} bias={bias}"), &y.data, &r);
    }
    let x = rand(&mut rng, 3, 4);
    let lin = B
        .load_linear("t", host(&[2, 5], vec![0.0; 10]), None)
        .unwrap();
    assert!(
        B.linear(&x, &lin).is_err(),
        "in-dim mismatch must be an error"
    );
    assert!(B
        .load_linear(
            "t",
            host(&[2, 5], vec![0.0; 10]),
            Some(host(&[3], vec![0.0; 3]))
        )
        .is_err());
}

#[test]
fn elementwise_ops_match_formulas() {
    let mut rng = Rng::new(12);
    let x = rand(&mut rng, 9, 31);
    let silu_r: Vec<f64> = x.data.iter().map(|&v| silu_ref(v as f64)).collect();
    assert_close("silu 9x31", &B.silu(&x).unwrap().data, &silu_r);
    let gelu_r: Vec<f64> = x.data.iter().map(|&v| gelu_tanh_ref(v as f64)).collect();
    assert_close("gelu_tanh 9x31", &B.gelu_tanh(&x).unwrap().data, &gelu_r);
    // scalar forms agree with the ops, and GELU is the tanh form, not erf
    assert_eq!(silu(x.data[3]), B.silu(&x).unwrap().data[3]);
    assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);

    let y = rand(&mut rng, 9, 31);
    let gate = rand(&mut rng, 1, 31);
    let mut out = x.clone();
    B.gate_residual(&mut out, &gate, &y).unwrap();
    let r: Vec<f64> = (0..9 * 31)
        .map(|i| x.data[i] as f64 + gate.data[i % 31] as f64 * y.data[i] as f64)
        .collect();
    assert_close("gate_residual 9x31", &out.data, &r);
    let mut sum = x.clone();
    B.add_assign(&mut sum, &y).unwrap();
    let r: Vec<f64> = (0..9 * 31)
        .map(|i| x.data[i] as f64 + y.data[i] as f64)
        .collect();
    assert_close("add_assign 9x31", &sum.data, &r);
    assert!(
        B.gate_residual(&mut out, &y, &y).is_err(),
        "gate must be [1, D]"
    );
    assert!(B.add_assign(&mut sum, &gate).is_err());
}

#[test]
fn norm_modulate_matches_layer_norm_formula() {
    let mut rng = Rng::new(13);
    for (l, d) in [(5, 7), (1, 64), (33, 129)] {
        // an offset and a scale so the mean and variance matter
        let mut x = rand(&mut rng, l, d);
        x.data.iter_mut().for_each(|v| *v = 3.0 + 2.5 * *v);
        let shift = rand(&mut rng, 1, d);
        let scale = rand(&mut rng, 1, d);
        let y = B.norm_modulate(&x, &shift, &scale).unwrap();
        let mut r = Vec::new();
        for row in x.data.chunks(d) {
            for (i, n) in ln_ref(row, 1e-6).into_iter().enumerate() {
                r.push((1.0 + scale.data[i] as f64) * n + shift.data[i] as f64);
            }
        }
        assert_close(&format!("norm_modulate {l}x{d}"), &y.data, &r);
    }
    let x = rand(&mut rng, 2, 4);
    let v3 = rand(&mut rng, 1, 3);
    assert!(B.norm_modulate(&x, &v3, &v3).is_err());
}

/// Naive QKNorm + RoPE on one head vector with explicit angles.
fn qk_ref(x: &[f32], scale: &[f32], angles: &[f64]) -> Vec<f64> {
    let n: Vec<f64> = rms_ref(x, 1e-6)
        .into_iter()
        .zip(scale)
        .map(|(v, &s)| v * s as f64)
        .collect();
    let mut out = vec![0.0; x.len()];
    for (j, &a) in angles.iter().enumerate() {
        let (c, s) = (a.cos(), a.sin());
        out[2 * j] = c * n[2 * j] - s * n[2 * j + 1];
        out[2 * j + 1] = s * n[2 * j] + c * n[2 * j + 1];
    }
    out
}

#[test]
fn qk_norm_rope_matches_naive_on_q_and_k_only() {
    let mut rng = Rng::new(14);
    let (heads, hd) = (3, 10);
    let axes = vec![2, 4, 4];
    let embed = EmbedNd {
        theta: 10_000.0,
        axes_dim: axes.clone(),
    };
    let (l, extra) = (11, 7); // width 3D + 7: like a single block's linear1 output
    let d = heads * hd;
    let ids: Vec<f32> = (0..l * 3).map(|i| ((i * 7) % 5) as f32).collect();
    let pe_rows = 4; // rows [4, 4 + L) of a longer table
    let mut all_ids = vec![0.5; pe_rows * 3];
    all_ids.extend(&ids);
    let pe_data = embed.forward(&all_ids).unwrap();
    let pe = CpuTensor::new(pe_rows + l, hd, pe_data).unwrap();
    let x = rand(&mut rng, l, 3 * d + extra);
    let qs = rng.normals(hd);
    let ks = rng.normals(hd);
    let mut y = x.clone();
    B.qk_norm_rope(&mut y, heads, &qs, &ks, &pe, pe_rows)
        .unwrap();

    let mut r: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
    let w = x.cols;
    for t in 0..l {
        // explicit angles: pair j of axis a with local index i: id_a · 10000^(-2i/d_a)
        let mut angles = Vec::new();
        for (a, &da) in axes.iter().enumerate() {
            for i in 0..da / 2 {
                let omega = 10_000f64.powf(-((2 * i) as f64) / da as f64);
                angles.push(ids[t * 3 + a] as f64 * omega);
            }
        }
        for (part, scale) in [(0, &qs), (1, &ks)] {
            for h in 0..heads {
                let o = t * w + part * d + h * hd;
                let v = qk_ref(&x.data[o..o + hd], scale, &angles);
                r[o..o + hd].copy_from_slice(&v);
            }
        }
    }
    assert_close("qk_norm_rope 11x(3*30+7), pe offset 4", &y.data, &r);
    // v and the extra columns are untouched bit for bit
    for t in 0..l {
        assert_eq!(
            y.data[t * w + 2 * d..(t + 1) * w],
            x.data[t * w + 2 * d..(t + 1) * w]
        );
    }
    assert!(B
        .qk_norm_rope(&mut y, heads, &qs, &ks, &pe, pe_rows + 1)
        .is_err());
    assert!(B.qk_norm_rope(&mut y, 8, &qs, &ks, &pe, 0).is_err());
}

#[test]
fn rope_pairs_are_adjacent_not_rotate_half() {
    // One head of dim 4, only axis 2 non-zero: angle θ on pair (0,1) is 0 and pair (2,3) gets
    // θ = id·ω. Adjacent convention rotates (x2, x3); rotate-half would mix x1 and x3.
    let embed = EmbedNd {
        theta: 10_000.0,
        axes_dim: vec![0, 2, 2],
    };
    let pe = CpuTensor::new(1, 4, embed.forward(&[0.0, 0.0, 1.0]).unwrap()).unwrap();
    let mut q = vec![0.0f32; 12]; // q, k, v of one head of dim 4
    q[2] = 1.0;
    let mut qkv = CpuTensor::new(1, 12, q).unwrap();
    // rms of (0, 0, 1, 0) is 1/2: normalised value 2, times scale 1/2 gives back 1
    let half = vec![0.5f32; 4];
    B.qk_norm_rope(&mut qkv, 1, &half, &half, &pe, 0).unwrap();
    let (c, s) = (1f32.cos(), 1f32.sin());
    let q = &qkv.data[..4];
    assert!((q[0]).abs() < 1e-6 && (q[1]).abs() < 1e-6, "{q:?}");
    assert!((q[2] - c).abs() < 1e-5 && (q[3] - s).abs() < 1e-5, "{q:?}");
}

#[test]
fn attention_matches_naive_softmax() {
    let mut rng = Rng::new(15);
    // (L, heads, head dim, extra columns); L = 300 spans two query blocks
    for (l, heads, hd, extra) in [(1, 1, 2, 0), (13, 3, 5, 4), (300, 2, 8, 0)] {
        let d = heads * hd;
        let w = 3 * d + extra;
        let x = rand(&mut rng, l, w);
        let y = B.attention(&x, heads, hd).unwrap();
        assert_eq!((y.rows, y.cols), (l, d));
        let r = attention_ref(&x, (heads, hd), 1.0 / (hd as f64).sqrt(), None, false);
        assert_close(
            &format!("attention L={l} H={heads} Dh={hd} W={w}"),
            &y.data,
            &r,
        );
    }
    let x = rand(&mut rng, 4, 10);
    assert!(
        B.attention(&x, 2, 2).is_err(),
        "10 columns cannot hold 3·2·2"
    );
}

#[test]
fn row_and_column_copies() {
    let mut rng = Rng::new(16);
    let a = rand(&mut rng, 3, 5);
    let b = rand(&mut rng, 4, 5);
    let ab = B.concat_rows(&a, &b).unwrap();
    assert_eq!((ab.rows, ab.cols), (7, 5));
    assert_eq!(B.slice_rows(&ab, 0, 3).unwrap(), a);
    assert_eq!(B.slice_rows(&ab, 3, 7).unwrap(), b);
    let c = rand(&mut rng, 3, 2);
    let ac = B.concat_cols(&a, &c).unwrap();
    assert_eq!((ac.rows, ac.cols), (3, 7));
    assert_eq!(B.slice_cols(&ac, 0, 5).unwrap(), a);
    assert_eq!(B.slice_cols(&ac, 5, 7).unwrap(), c);
    assert_eq!(
        ac.data[7 + 5],
        c.data[2],
        "row 1 starts with a's row then c's row"
    );
    assert!(B.concat_rows(&a, &c).is_err());
    assert!(B.concat_cols(&a, &b).is_err());
    assert!(B.slice_rows(&a, 2, 4).is_err());
    assert!(B.slice_cols(&a, 4, 3).is_err());
    assert!(CpuTensor::new(2, 2, vec![0.0; 3]).is_err());
}

#[test]
fn timestep_embedding_is_cos_first_with_factor_1000() {
    let e = timestep_embedding(0.0, 256);
    assert!(e[..128].iter().all(|&v| v == 1.0) && e[128..].iter().all(|&v| v == 0.0));
    for (s, dim) in [(0.7f32, 256), (2.5, 256), (0.123, 17)] {
        let e = timestep_embedding(s, dim);
        assert_eq!(e.len(), dim);
        let half = dim / 2;
        let mut r = vec![0.0f64; dim];
        for k in 0..half {
            let arg = 1000.0 * s as f64 * (-(10_000f64.ln()) * k as f64 / half as f64).exp();
            r[k] = arg.cos();
            r[half + k] = arg.sin();
        }
        // the argument is formed in f32 like the reference: up to 2500·2^-24 ≈ 1.5e-4 off
        let worst = e
            .iter()
            .zip(&r)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        println!("timestep_embedding s={s} dim={dim}: max abs {worst:.2e}");
        assert!(worst < 5e-4, "s={s}: {worst}");
    }
    // guidance 2.5 → 2500 inside: the k = 0 frequency is exactly 1
    let g = timestep_embedding(2.5, 256);
    assert!((g[0] - 2500f32.cos()).abs() < 1e-6 && (g[128] - 2500f32.sin()).abs() < 1e-6);
}

#[test]
fn embed_nd_assigns_pairs_to_axes_in_order() {
    let embed = EmbedNd {
        theta: 10_000.0,
        axes_dim: vec![4, 6, 6],
    };
    let ids = [1.0f32, 2.0, 3.0, 0.0, 0.0, 0.0];
    let pe = embed.forward(&ids).unwrap();
    assert_eq!(pe.len(), 2 * 16);
    let mut j = 0;
    for (axis, &d) in embed.axes_dim.iter().enumerate() {
        for i in 0..d / 2 {
            let theta = ids[axis] as f64 * 10_000f64.powf(-(2.0 * i as f64) / d as f64);
            assert!((pe[2 * j] as f64 - theta.cos()).abs() < 1e-6, "pair {j}");
            assert!(
                (pe[2 * j + 1] as f64 - theta.sin()).abs() < 1e-6,
                "pair {j}"
            );
            j += 1;
        }
    }
    // a zero id is the identity rotation
    assert!(pe[16..].chunks(2).all(|cs| cs == [1.0, 0.0]));
    assert!(embed.forward(&[0.0; 4]).is_err());
}
