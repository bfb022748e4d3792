//! Every op of [`EncoderBackend`] on the CPU against a naive f64 formula on random inputs, odd
//! sizes included (ggml `test-backend-ops` style: the CUDA backend is later checked against
//! these same CPU ops). Run with `--nocapture` for the table.

mod common;

use common::{assert_close, attention_ref, gelu_tanh_ref, host, ln_ref, rand, rms_ref, silu_ref};
use kontext_engine::encoder_backend::{EncoderBackend, Pad};
use kontext_engine::random::Rng;
use kontext_engine::CpuBackend;

const B: CpuBackend = CpuBackend;

#[test]
fn conv2d_matches_the_definition() {
    let mut rng = Rng::new(21);
    // (Cin, Cout, H, W, k, stride, pad, bias)
    let cases = [
        (3, 5, 7, 9, 3, 1, Pad::same(1), true),
        (4, 4, 8, 6, 3, 2, Pad::DOWNSAMPLE, true),
        (5, 3, 9, 7, 3, 2, Pad::DOWNSAMPLE, true), // odd sizes: the extra row/col is cropped
        (6, 2, 5, 5, 1, 1, Pad::same(0), false),
        (2, 3, 4, 11, 3, 1, Pad::same(0), true),
        (
            3,
            2,
            6,
            5,
            2,
            3,
            Pad {
                top: 2,
                bottom: 0,
                left: 1,
                right: 3,
            },
            true,
        ),
        (1, 1, 1, 1, 3, 1, Pad::same(1), true),
        // wide enough that the im2col buffer is filled in several bands
        (520, 3, 40, 64, 3, 1, Pad::same(1), true),
    ];
    for (cin, cout, h, w, k, stride, pad, bias) in cases {
        let x = rand(&mut rng, h * w, cin);
        let wt = rng.normals(cout * cin * k * k);
        let bv = rng.normals(cout);
        let conv = B
            .load_conv(
                "t",
                host(&[cout, cin, k, k], wt.clone()),
                bias.then(|| host(&[cout], bv.clone())),
            )
            .expect("load");
        let (y, (ho, wo)) = B.conv2d(&x, (h, w), &conv, stride, pad).expect("conv2d");
        assert_eq!(
            (
                (h + pad.top + pad.bottom - k) / stride + 1,
                (w + pad.left + pad.right - k) / stride + 1
            ),
            (ho, wo)
        );
        let mut r = vec![0f64; ho * wo * cout];
        for oy in 0..ho {
            for ox in 0..wo {
                for o in 0..cout {
                    let mut acc = if bias { bv[o] as f64 } else { 0.0 };
                    for i in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * stride + ky) as isize - pad.top as isize;
                                let ix = (ox * stride + kx) as isize - pad.left as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x.data[(iy as usize * w + ix as usize) * cin + i];
                                acc += xv as f64 * wt[((o * cin + i) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    r[(oy * wo + ox) * cout + o] = acc;
                }
            }
        }
        assert_close(
            &format!(
                "conv2d {cin}→{cout} {h}×{w} k{k} s{stride} {:?}",
                (pad.top, pad.bottom, pad.left, pad.right)
            ),
            &y.data,
            &r,
        );
    }
}

#[test]
fn group_norm_matches_the_definition() {
    let mut rng = Rng::new(22);
    for (n, c, g, act) in [
        (35, 8, 4, true),
        (7, 6, 3, false),
        (1, 4, 1, true),
        (64, 32, 32, false),
        (2500, 8, 2, true), // several statistics bands
    ] {
        let x = rand(&mut rng, n, c);
        let (wt, bv) = (rng.normals(c), rng.normals(c));
        let y = B
            .group_norm(&x, g, &wt, &bv, 1e-6, act)
            .expect("group_norm");
        let cg = c / g;
        let mut r = vec![0f64; n * c];
        for gi in 0..g {
            let vals: Vec<f64> = (0..n)
                .flat_map(|p| (gi * cg..(gi + 1) * cg).map(move |ch| (p, ch)))
                .map(|(p, ch)| x.data[p * c + ch] as f64)
                .collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            for p in 0..n {
                for ch in gi * cg..(gi + 1) * cg {
                    let v = (x.data[p * c + ch] as f64 - mean) / (var + 1e-6).sqrt()
                        * wt[ch] as f64
                        + bv[ch] as f64;
                    r[p * c + ch] = if act { silu_ref(v) } else { v };
                }
            }
        }
        assert_close(
            &format!("group_norm [{n}, {c}] groups {g} silu {act}"),
            &y.data,
            &r,
        );
    }
}

#[test]
fn upsample_copies_each_pixel_to_a_2x2_block() {
    let mut rng = Rng::new(23);
    let (h, w, c) = (3, 5, 7);
    let x = rand(&mut rng, h * w, c);
    let y = B.upsample_nearest2x(&x, (h, w)).expect("upsample");
    assert_eq!((y.rows, y.cols), (4 * h * w, c));
    for oy in 0..2 * h {
        for ox in 0..2 * w {
            let src = &x.data[((oy / 2) * w + ox / 2) * c..][..c];
            assert_eq!(&y.data[(oy * 2 * w + ox) * c..][..c], src);
        }
    }
    println!("{:<52} exact", "upsample_nearest2x [15, 7] 3×5");
}

#[test]
fn layer_and_rms_norm_match_the_definition() {
    let mut rng = Rng::new(24);
    for (l, d) in [(7, 33), (1, 128), (77, 4)] {
        let x = rand(&mut rng, l, d);
        let (wt, bv) = (rng.normals(d), rng.normals(d));
        let ln = B.layer_norm(&x, &wt, &bv, 1e-5).expect("layer_norm");
        let rms = B.rms_norm(&x, &wt, 1e-6).expect("rms_norm");
        let (mut rl, mut rr) = (vec![0f64; l * d], vec![0f64; l * d]);
        for i in 0..l {
            let row = &x.data[i * d..(i + 1) * d];
            let (n, rn) = (ln_ref(row, 1e-5), rms_ref(row, 1e-6));
            for j in 0..d {
                rl[i * d + j] = n[j] * wt[j] as f64 + bv[j] as f64;
                rr[i * d + j] = rn[j] * wt[j] as f64;
            }
        }
        assert_close(&format!("layer_norm [{l}, {d}]"), &ln.data, &rl);
        assert_close(&format!("rms_norm [{l}, {d}]"), &rms.data, &rr);
    }
}

#[test]
fn masked_attention_matches_the_definition() {
    let mut rng = Rng::new(25);
    // (L, heads, head dim, extra columns, scale, bias, causal)
    for (l, nh, hd, extra, scale, bias, causal) in [
        (9, 2, 4, 0, 1.0, true, false),
        (13, 3, 5, 7, 0.3, false, true),
        (300, 2, 8, 0, 1.0, true, true), // more rows than one query block
        (1, 1, 3, 0, 0.5, false, true),
    ] {
        let d = nh * hd;
        let w = 3 * d + extra;
        let qkv = rand(&mut rng, l, w);
        let bt = bias.then(|| rand(&mut rng, nh * l, l));
        let y = B
            .attention_masked(&qkv, nh, hd, scale, bt.as_ref(), causal)
            .expect("attention_masked");
        let r = attention_ref(&qkv, (nh, hd), scale as f64, bt.as_ref(), causal);
        assert_close(
            &format!("attention_masked L{l} {nh}×{hd} scale {scale} bias {bias} causal {causal}"),
            &y.data,
            &r,
        );
    }
}

#[test]
fn elementwise_ops_match_the_definition() {
    let mut rng = Rng::new(26);
    let x = rand(&mut rng, 5, 14);
    let g = B.gelu_tanh_gate(&x).expect("gelu_tanh_gate");
    let mut r = vec![0f64; 5 * 7];
    for i in 0..5 {
        for j in 0..7 {
            let gelu = gelu_tanh_ref(x.data[i * 14 + j] as f64);
            r[i * 7 + j] = gelu * x.data[i * 14 + 7 + j] as f64;
        }
    }
    assert_close("gelu_tanh_gate [5, 14]", &g.data, &r);
    let q = B.quick_gelu(&x).expect("quick_gelu");
    let r: Vec<f64> = x
        .data
        .iter()
        .map(|&v| v as f64 / (1.0 + (-1.702 * v as f64).exp()))
        .collect();
    assert_close("quick_gelu [5, 14]", &q.data, &r);
    let a = B.affine(&x, 0.3611, -0.0418).expect("affine");
    let r: Vec<f64> = x.data.iter().map(|&v| v as f64 * 0.3611 - 0.0418).collect();
    assert_close("affine [5, 14]", &a.data, &r);
}

#[test]
fn shape_errors_name_the_op() {
    let mut rng = Rng::new(27);
    let x = rand(&mut rng, 12, 4);
    let conv = B
        .load_conv("c", host(&[2, 3, 3, 3], rng.normals(54)), None)
        .expect("load");
    let e = B
        .conv2d(&x, (3, 4), &conv, 1, Pad::same(1))
        .expect_err("channels");
    assert!(e.to_string().starts_with("conv2d"), "{e}");
    let conv4 = B
        .load_conv("c", host(&[2, 4, 3, 3], rng.normals(72)), None)
        .expect("load");
    assert!(
        B.conv2d(&x, (4, 4), &conv4, 1, Pad::same(1)).is_err(),
        "not a 4×4 map"
    );
    assert!(B.conv2d(&x, (3, 4), &conv4, 1, Pad::same(0)).is_ok());
    assert!(
        B.conv2d(&x, (3, 4), &conv4, 0, Pad::same(1)).is_err(),
        "stride 0"
    );
    let tiny = rand(&mut rng, 1, 4);
    assert!(
        B.conv2d(&tiny, (1, 1), &conv4, 1, Pad::same(0)).is_err(),
        "kernel larger than map"
    );
    assert!(B
        .load_conv("c", host(&[2, 4, 3], rng.normals(24)), None)
        .is_err());
    assert!(B
        .load_conv(
            "c",
            host(&[2, 4, 1, 1], rng.normals(8)),
            Some(host(&[3], rng.normals(3)))
        )
        .is_err());
    let ones = vec![1.0; 4];
    assert!(
        B.group_norm(&x, 3, &ones, &ones, 1e-6, true).is_err(),
        "4 channels, 3 groups"
    );
    assert!(B
        .group_norm(&x, 2, &ones[..3].to_vec(), &ones, 1e-6, true)
        .is_err());
    assert!(B.upsample_nearest2x(&x, (5, 2)).is_err());
    assert!(B.layer_norm(&x, &vec![1.0; 3], &ones, 1e-5).is_err());
    assert!(B.rms_norm(&x, &vec![1.0; 5], 1e-6).is_err());
    let qkv = rand(&mut rng, 5, 12);
    let bad_bias = rand(&mut rng, 5, 5);
    assert!(B
        .attention_masked(&qkv, 2, 2, 1.0, Some(&bad_bias), false)
        .is_err());
    assert!(
        B.attention_masked(&qkv, 2, 3, 1.0, None, false).is_err(),
        "too narrow"
    );
    assert!(B.gelu_tanh_gate(&rand(&mut rng, 2, 3)).is_err());
}
