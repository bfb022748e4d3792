//! The T5 v1.1 encoder (`T5EncoderModel`, spec 5.1) under the Hugging Face names: `shared`
//! embedding (no √d scaling), blocks of `SelfAttention` (relative position bias from block 0's
//! table, no score scaling, no attention mask) and the gated-GELU `DenseReluDense`, each behind a
//! T5 LayerNorm (RMSNorm), then `final_layer_norm`. Sizes come from [`T5Config`].

use crate::encoder_backend::EncoderBackend;
use crate::error::{shape_err, EngineError, Result};
use crate::model::{observe, StageHook};
use crate::weights::{load_linear, load_stacked, load_vector, weight, WeightSource};
use kontext_loader::{T5Config, T5};

/// HF `T5Attention._relative_position_bucket`, bidirectional: the bucket of `rel = key − query`.
/// Half the buckets for each sign; within a half, exact buckets below `max_exact = half/2`, then
/// logarithmic ones up to `max_distance`, the last bucket for everything beyond. The logarithm is
/// computed in f32 and truncated, exactly as the reference does (it decides boundary cases such as
/// `|rel| = 64` with `max_distance = 128`).
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let n = rel.unsigned_abs() as usize;
    let max_exact = half / 2;
    if n < max_exact {
        return base + n;
    }
    let log_ratio = (n as f32 / max_exact as f32).ln();
    let log_max = (max_distance as f64 / max_exact as f64).ln() as f32;
    let large = max_exact + (log_ratio / log_max * (half - max_exact) as f32) as usize;
    base + large.min(half - 1)
}

/// The relative position bias of `l` tokens: `[H·L, L]`, row `h·L + i`, column j =
/// `table[bucket(j − i), h]` with `table [num_buckets, H]` (spec 5.1 step 2).
pub fn position_bias(
    table: &[f32],
    num_heads: usize,
    num_buckets: usize,
    max_distance: usize,
    l: usize,
) -> Vec<f32> {
    let mut bias = vec![0f32; num_heads * l * l];
    for i in 0..l {
        for j in 0..l {
            let bucket = relative_position_bucket(j as i64 - i as i64, num_buckets, max_distance);
            for h in 0..num_heads {
                bias[(h * l + i) * l + j] = table[bucket * num_heads + h];
            }
        }
    }
    bias
}

/// One `T5Block` of the encoder.
pub struct T5Block<B: EncoderBackend> {
    /// `layer.0.layer_norm` `[D]`.
    pub attn_norm: B::Vector,
    /// `SelfAttention.{q, k, v}` stacked: `[3·H·Dkv, D]`, no bias.
    pub qkv: B::Linear,
    /// `SelfAttention.o` `[D, H·Dkv]`.
    pub o: B::Linear,
    /// `layer.1.layer_norm` `[D]`.
    pub ff_norm: B::Vector,
    /// `DenseReluDense.{wi_0, wi_1}` stacked: `[2·F, D]`.
    pub wi: B::Linear,
    /// `DenseReluDense.wo` `[D, F]`.
    pub wo: B::Linear,
}

/// The T5 encoder on backend `B`.
pub struct T5Encoder<B: EncoderBackend> {
    /// The backend every op runs on.
    pub backend: B,
    /// Sizes, relative-bias buckets and max distance, LayerNorm epsilon.
    pub config: T5Config,
    /// `shared.weight` `[vocab, D]`, on the host: only the prompt's rows are uploaded.
    pub shared: Vec<f32>,
    /// Block 0's `relative_attention_bias.weight` `[num_buckets, H]`, on the host: the bias is
    /// built once per sequence length.
    pub relative_attention_bias: Vec<f32>,
    /// `encoder.block.{i}`.
    pub blocks: Vec<T5Block<B>>,
    /// `encoder.final_layer_norm.weight` `[D]`.
    pub final_layer_norm: B::Vector,
}

fn validate(c: &T5Config) -> Result<()> {
    let half = c.relative_attention_num_buckets / 2;
    if c.d_model == 0 || c.num_heads == 0 || c.d_kv == 0 || c.d_ff == 0 || c.vocab_size == 0 {
        return Err(EngineError::Config(format!("T5: zero size in {c:?}")));
    }
    if half < 2 || c.relative_attention_max_distance <= half / 2 {
        return Err(EngineError::Config(format!(
            "T5: {} relative buckets with max distance {} leave no logarithmic range",
            c.relative_attention_num_buckets, c.relative_attention_max_distance
        )));
    }
    Ok(())
}

impl<B: EncoderBackend> T5Encoder<B> {
    /// Builds the encoder for `config` from Hugging Face-named weights.
    pub fn load(backend: B, config: T5Config, src: &dyn WeightSource) -> Result<Self> {
        validate(&config)?;
        let (b, c) = (&backend, &config);
        let (d, inner) = (c.d_model, c.num_heads * c.d_kv);
        let blocks = (0..c.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                let a = format!("{p}.0.SelfAttention");
                let f = format!("{p}.1.DenseReluDense");
                let qkv: Vec<String> = ["q", "k", "v"].iter().map(|n| format!("{a}.{n}")).collect();
                let wi = [format!("{f}.wi_0"), format!("{f}.wi_1")];
                Ok(T5Block {
                    attn_norm: load_vector(b, src, &format!("{p}.0.layer_norm.weight"), d)?,
                    qkv: load_stacked(b, src, &qkv, &[inner, d], false)?,
                    o: load_linear(b, src, &format!("{a}.o"), d, inner, false)?,
                    ff_norm: load_vector(b, src, &format!("{p}.1.layer_norm.weight"), d)?,
                    wi: load_stacked(b, src, &wi, &[c.d_ff, d], false)?,
                    wo: load_linear(b, src, &format!("{f}.wo"), d, c.d_ff, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rel_key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
        Ok(T5Encoder {
            shared: weight(src, "shared.weight", &[c.vocab_size, d])?.data,
            relative_attention_bias: weight(
                src,
                rel_key,
                &[c.relative_attention_num_buckets, c.num_heads],
            )?
            .data,
            blocks,
            final_layer_norm: load_vector(b, src, "encoder.final_layer_norm.weight", d)?,
            config,
            backend,
        })
    }

    /// Builds the encoder from a checkpoint opened by the loader (fp8 weights dequantised).
    pub fn from_t5(backend: B, t5: &T5) -> Result<Self> {
        T5Encoder::load(backend, t5.config.clone(), &t5.weights)
    }

    /// `ids [L]` → last hidden state `[L, D]` (all L positions, padding included; no mask).
    /// Stages: `embeddings`, `block.{i}`, `final`, each `[L, D]`.
    pub fn forward(&self, ids: &[u32], mut hook: Option<StageHook<'_>>) -> Result<B::Tensor> {
        let (b, c) = (&self.backend, &self.config);
        let (l, d) = (ids.len(), c.d_model);
        let mut emb = Vec::with_capacity(l * d);
        for (pos, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= c.vocab_size {
                return Err(shape_err(
                    "T5 embedding",
                    format!(
                        "token id {id} at position {pos} is outside the vocabulary of {}",
                        c.vocab_size
                    ),
                ));
            }
            emb.extend_from_slice(&self.shared[id * d..(id + 1) * d]);
        }
        let mut h = b.upload(&emb, l, d)?; // [L, D]
        observe(b, &mut hook, || "embeddings".into(), &h)?;
        let bias = position_bias(
            &self.relative_attention_bias,
            c.num_heads,
            c.relative_attention_num_buckets,
            c.relative_attention_max_distance,
            l,
        );
        let bias = b.upload(&bias, c.num_heads * l, l)?; // [H·L, L]
        let eps = c.layer_norm_epsilon;
        for (i, blk) in self.blocks.iter().enumerate() {
            let n = b.rms_norm(&h, &blk.attn_norm, eps)?; // [L, D]
            let qkv = b.linear(&n, &blk.qkv)?; // [L, 3·H·Dkv]
            let a = b.attention_masked(&qkv, c.num_heads, c.d_kv, 1.0, Some(&bias), false)?; // [L, H·Dkv]
            b.add_assign(&mut h, &b.linear(&a, &blk.o)?)?; // [L, D]
            let n = b.rms_norm(&h, &blk.ff_norm, eps)?; // [L, D]
            let g = b.gelu_tanh_gate(&b.linear(&n, &blk.wi)?)?; // [L, F]
            b.add_assign(&mut h, &b.linear(&g, &blk.wo)?)?; // [L, D]
            observe(b, &mut hook, || format!("block.{i}"), &h)?;
        }
        let out = b.rms_norm(&h, &self.final_layer_norm, eps)?; // [L, D]
        observe(b, &mut hook, || "final".into(), &out)?;
        Ok(out)
    }
}
