//! The CLIP text model (`CLIPTextModel`, spec 5.2) under the Hugging Face names: token +
//! position embeddings, pre-LN encoder layers with causal self-attention and a quick-GELU MLP,
//! `final_layer_norm`, and the pooled vector FLUX uses as `y`. Sizes come from [`ClipConfig`].

use crate::encoder_backend::EncoderBackend;
use crate::error::{shape_err, EngineError, Result};
use crate::model::{observe, StageHook};
use crate::weights::{load_linear, load_stacked, load_vector, weight, WeightSource};
use kontext_loader::{Clip, ClipConfig};

/// The position whose final hidden state is the pooled output (HF `CLIPTextTransformer`):
/// with the legacy `eos_token_id == 2` of FLUX's config, `argmax(ids)` (first maximum; the end
/// token 49407 is the largest id, so it is the first end token); otherwise the first position
/// holding `eos_token_id`. Errors when there is none.
pub fn pooled_position(ids: &[u32], eos_token_id: usize) -> Result<usize> {
    let pos = if eos_token_id == 2 {
        ids.iter()
            .enumerate()
            .fold(None, |best: Option<(usize, u32)>, (i, &v)| match best {
                Some((_, m)) if m >= v => best,
                _ => Some((i, v)),
            })
            .map(|(i, _)| i)
    } else {
        ids.iter().position(|&v| v as usize == eos_token_id)
    };
    pos.ok_or_else(|| {
        shape_err(
            "CLIP pooling",
            format!(
                "no end-of-text token {eos_token_id} in {} ids (the tokenizer adds one)",
                ids.len()
            ),
        )
    })
}

/// One `CLIPEncoderLayer`.
pub struct ClipLayer<B: EncoderBackend> {
    /// `layer_norm1` (weight, bias), each `[D]`.
    pub layer_norm1: (B::Vector, B::Vector),
    /// `self_attn.{q,k,v}_proj` stacked: `[3D, D]` with bias `[3D]`.
    pub qkv: B::Linear,
    /// `self_attn.out_proj` `[D, D]` with bias.
    pub out_proj: B::Linear,
    /// `layer_norm2` (weight, bias), each `[D]`.
    pub layer_norm2: (B::Vector, B::Vector),
    /// `mlp.fc1` `[F, D]` with bias.
    pub fc1: B::Linear,
    /// `mlp.fc2` `[D, F]` with bias.
    pub fc2: B::Linear,
}

/// Output of [`ClipTextModel::forward`].
pub struct ClipOutput<T> {
    /// `last_hidden_state` `[L, D]` (after `final_layer_norm`).
    pub last_hidden: T,
    /// `pooler_output` `[D]` on the host: the row at [`pooled_position`].
    pub pooled: Vec<f32>,
}

/// The CLIP text model on backend `B`.
pub struct ClipTextModel<B: EncoderBackend> {
    /// The backend every op runs on.
    pub backend: B,
    /// Sizes, LayerNorm epsilon, activation and the pooling rule's `eos_token_id`.
    pub config: ClipConfig,
    /// `token_embedding.weight` `[vocab, D]` (host).
    pub token_embedding: Vec<f32>,
    /// `position_embedding.weight` `[max_positions, D]` (host).
    pub position_embedding: Vec<f32>,
    /// `text_model.encoder.layers.{i}`.
    pub layers: Vec<ClipLayer<B>>,
    /// `text_model.final_layer_norm` (weight, bias), each `[D]`.
    pub final_layer_norm: (B::Vector, B::Vector),
}

fn validate(c: &ClipConfig) -> Result<()> {
    if c.hidden_size == 0 || c.num_heads == 0 || c.hidden_size % c.num_heads != 0 {
        return Err(EngineError::Config(format!(
            "CLIP: hidden size {} is not a multiple of {} heads",
            c.hidden_size, c.num_heads
        )));
    }
    if c.hidden_act != "quick_gelu" {
        return Err(EngineError::Config(format!(
            "CLIP: hidden_act {:?} is not supported (CLIP-L uses quick_gelu)",
            c.hidden_act
        )));
    }
    Ok(())
}

impl<B: EncoderBackend> ClipTextModel<B> {
    /// Builds the text model for `config` from Hugging Face-named weights (`text_model.` prefix).
    pub fn load(backend: B, config: ClipConfig, src: &dyn WeightSource) -> Result<Self> {
        validate(&config)?;
        let (b, c) = (&backend, &config);
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let ln = |name: String| -> Result<(B::Vector, B::Vector)> {
            Ok((
                load_vector(b, src, &format!("{name}.weight"), d)?,
                load_vector(b, src, &format!("{name}.bias"), d)?,
            ))
        };
        let layers = (0..c.num_layers)
            .map(|i| {
                let p = format!("text_model.encoder.layers.{i}");
                let qkv: Vec<String> = ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .map(|n| format!("{p}.self_attn.{n}"))
                    .collect();
                Ok(ClipLayer {
                    layer_norm1: ln(format!("{p}.layer_norm1"))?,
                    qkv: load_stacked(b, src, &qkv, &[d, d], true)?,
                    out_proj: load_linear(b, src, &format!("{p}.self_attn.out_proj"), d, d, true)?,
                    layer_norm2: ln(format!("{p}.layer_norm2"))?,
                    fc1: load_linear(b, src, &format!("{p}.mlp.fc1"), f, d, true)?,
                    fc2: load_linear(b, src, &format!("{p}.mlp.fc2"), d, f, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let emb = "text_model.embeddings";
        Ok(ClipTextModel {
            token_embedding: weight(
                src,
                &format!("{emb}.token_embedding.weight"),
                &[c.vocab_size, d],
            )?
            .data,
            position_embedding: weight(
                src,
                &format!("{emb}.position_embedding.weight"),
                &[c.max_positions, d],
            )?
            .data,
            layers,
            final_layer_norm: ln("text_model.final_layer_norm".into())?,
            config,
            backend,
        })
    }

    /// Builds the text model from a checkpoint opened by the loader.
    pub fn from_clip(backend: B, clip: &Clip) -> Result<Self> {
        ClipTextModel::load(backend, clip.config.clone(), &clip.weights)
    }

    /// `ids [L]` (L ≤ max_positions) → last hidden state `[L, D]` and pooled `[D]`.
    /// Stages: `embeddings`, `layers.{i}`, `final_layer_norm`, each `[L, D]`; `pooled` `[D]`.
    pub fn forward(
        &self,
        ids: &[u32],
        mut hook: Option<StageHook<'_>>,
    ) -> Result<ClipOutput<B::Tensor>> {
        let (b, c) = (&self.backend, &self.config);
        let (l, d) = (ids.len(), c.hidden_size);
        if l > c.max_positions {
            return Err(shape_err(
                "CLIP embedding",
                format!(
                    "{l} tokens, but the model has {} positions (the tokenizer truncates to it)",
                    c.max_positions
                ),
            ));
        }
        let pooled_at = pooled_position(ids, c.eos_token_id)?;
        let mut emb = Vec::with_capacity(l * d);
        for (pos, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= c.vocab_size {
                return Err(shape_err(
                    "CLIP embedding",
                    format!(
                        "token id {id} at position {pos} is outside the vocabulary of {}",
                        c.vocab_size
                    ),
                ));
            }
            let tok = &self.token_embedding[id * d..(id + 1) * d];
            let p = &self.position_embedding[pos * d..(pos + 1) * d];
            emb.extend(tok.iter().zip(p).map(|(t, p)| t + p));
        }
        let mut h = b.upload(&emb, l, d)?; // [L, D]
        observe(b, &mut hook, || "embeddings".into(), &h)?;
        let (heads, eps) = (c.num_heads, c.layer_norm_eps);
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        for (i, layer) in self.layers.iter().enumerate() {
            let (w1, b1) = &layer.layer_norm1;
            let n = b.layer_norm(&h, w1, b1, eps)?; // [L, D]
            let qkv = b.linear(&n, &layer.qkv)?; // [L, 3D]
            let a = b.attention_masked(&qkv, heads, hd, scale, None, true)?; // [L, D]
            b.add_assign(&mut h, &b.linear(&a, &layer.out_proj)?)?; // [L, D]
            let (w2, b2) = &layer.layer_norm2;
            let n = b.layer_norm(&h, w2, b2, eps)?; // [L, D]
            let m = b.quick_gelu(&b.linear(&n, &layer.fc1)?)?; // [L, F]
            b.add_assign(&mut h, &b.linear(&m, &layer.fc2)?)?; // [L, D]
            observe(b, &mut hook, || format!("layers.{i}"), &h)?;
        }
        let (wf, bf) = &self.final_layer_norm;
        let last_hidden = b.layer_norm(&h, wf, bf, eps)?; // [L, D]
        observe(b, &mut hook, || "final_layer_norm".into(), &last_hidden)?;
        let pooled = b.download(&b.slice_rows(&last_hidden, pooled_at, pooled_at + 1)?)?; // [D]
        if let Some(hk) = hook.as_mut() {
            hk("pooled", &pooled);
        }
        Ok(ClipOutput {
            last_hidden,
            pooled,
        })
    }
}
