//! The Flux autoencoder: config, expected tensors (BFL `ae.safetensors` names, spec 4.6) and the
//! diffusers `vae/` mapping.

use crate::config::{config_err, push_layer, JsonConfig, Shapes};
use crate::error::{LoadError, Result};
use crate::tensors::{assemble, Component, Expect, Src, TensorSet};
use std::path::Path;

/// `AutoEncoderParams` of the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Base channel count (`ch`, 128 for Flux).
    pub ch: usize,
    /// Channel multiplier per resolution level ([1, 2, 4, 4]).
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    pub norm_groups: usize,
    pub scale_factor: f32,
    pub shift_factor: f32,
}

/// What the caller may say about an `ae.safetensors`, whose file carries no config. The
/// defaults are the Flux autoencoder's (spec 4.1).
#[derive(Debug, Clone)]
pub struct VaeOptions {
    pub norm_groups: usize,
    pub scale_factor: f32,
    pub shift_factor: f32,
}

impl Default for VaeOptions {
    fn default() -> Self {
        VaeOptions {
            norm_groups: 32,
            scale_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }
}

pub struct Vae {
    pub config: VaeConfig,
    pub weights: Component,
}

/// BFL resnet sub-layer → diffusers name.
fn resnet_rename(part: &str) -> &str {
    match part {
        "nin_shortcut" => "conv_shortcut",
        p => p,
    }
}

/// The diffusers key for canonical BFL autoencoder key `name`.
fn diffusers_name(name: &str, levels: usize) -> String {
    let p: Vec<&str> = name.split('.').collect();
    let join = |v: &[&str]| v.join(".");
    match p.as_slice() {
        [side, "down", i, "block", j, rest @ ..] => format!(
            "{side}.down_blocks.{i}.resnets.{j}.{}.{}",
            resnet_rename(rest[0]),
            join(&rest[1..])
        ),
        [side, "down", i, "downsample", rest @ ..] => {
            format!("{side}.down_blocks.{i}.downsamplers.0.{}", join(rest))
        }
        [side, "up", i, rest @ ..] => {
            let k = levels - 1 - i.parse::<usize>().unwrap_or(0);
            match rest {
                ["block", j, sub, tail @ ..] => format!(
                    "{side}.up_blocks.{k}.resnets.{j}.{}.{}",
                    resnet_rename(sub),
                    join(tail)
                ),
                ["upsample", tail @ ..] => {
                    format!("{side}.up_blocks.{k}.upsamplers.0.{}", join(tail))
                }
                _ => name.to_string(),
            }
        }
        [side, "mid", block, rest @ ..] if block.starts_with("block_") => {
            let n: usize = block[6..].parse().unwrap_or(1);
            format!(
                "{side}.mid_block.resnets.{}.{}.{}",
                n - 1,
                resnet_rename(rest[0]),
                join(&rest[1..])
            )
        }
        [side, "mid", "attn_1", sub, tail @ ..] => {
            let d = match *sub {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                s => s,
            };
            format!("{side}.mid_block.attentions.0.{d}.{}", join(tail))
        }
        [side, "norm_out", tail @ ..] => format!("{side}.conv_norm_out.{}", join(tail)),
        _ => name.to_string(),
    }
}

/// Every canonical autoencoder tensor with its shape (spec 4.3, 4.4, 4.6).
pub fn expected_shapes(c: &VaeConfig) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    let conv = |v: &mut Vec<_>, n: &str, o: usize, i: usize, k: usize| {
        push_layer(v, n, vec![o, i, k, k], true)
    };
    let norm = |v: &mut Vec<_>, n: &str, ch: usize| push_layer(v, n, vec![ch], true);
    let resnet = |v: &mut Vec<_>, n: &str, cin: usize, cout: usize| {
        norm(v, &format!("{n}.norm1"), cin);
        conv(v, &format!("{n}.conv1"), cout, cin, 3);
        norm(v, &format!("{n}.norm2"), cout);
        conv(v, &format!("{n}.conv2"), cout, cout, 3);
        if cin != cout {
            conv(v, &format!("{n}.nin_shortcut"), cout, cin, 1);
        }
    };
    let mid = |v: &mut Vec<_>, side: &str, ch: usize| {
        resnet(v, &format!("{side}.mid.block_1"), ch, ch);
        norm(v, &format!("{side}.mid.attn_1.norm"), ch);
        for p in ["q", "k", "v", "proj_out"] {
            conv(v, &format!("{side}.mid.attn_1.{p}"), ch, ch, 1);
        }
        resnet(v, &format!("{side}.mid.block_2"), ch, ch);
    };
    let levels = c.ch_mult.len();
    let top = c.ch * c.ch_mult[levels - 1];
    conv(&mut v, "encoder.conv_in", c.ch, c.in_channels, 3);
    let mut block_in = c.ch;
    for (i, m) in c.ch_mult.iter().enumerate() {
        let out = c.ch * m;
        for j in 0..c.num_res_blocks {
            resnet(
                &mut v,
                &format!("encoder.down.{i}.block.{j}"),
                block_in,
                out,
            );
            block_in = out;
        }
        if i + 1 != levels {
            conv(
                &mut v,
                &format!("encoder.down.{i}.downsample.conv"),
                out,
                out,
                3,
            );
        }
    }
    mid(&mut v, "encoder", top);
    norm(&mut v, "encoder.norm_out", top);
    conv(&mut v, "encoder.conv_out", 2 * c.z_channels, top, 3);

    conv(&mut v, "decoder.conv_in", top, c.z_channels, 3);
    mid(&mut v, "decoder", top);
    let mut block_in = top;
    for i in (0..levels).rev() {
        let out = c.ch * c.ch_mult[i];
        for j in 0..=c.num_res_blocks {
            resnet(&mut v, &format!("decoder.up.{i}.block.{j}"), block_in, out);
            block_in = out;
        }
        if i != 0 {
            conv(
                &mut v,
                &format!("decoder.up.{i}.upsample.conv"),
                out,
                out,
                3,
            );
        }
    }
    norm(&mut v, "decoder.norm_out", c.ch * c.ch_mult[0]);
    conv(
        &mut v,
        "decoder.conv_out",
        c.out_channels,
        c.ch * c.ch_mult[0],
        3,
    );
    v
}

fn infer_bfl_config(set: &TensorSet, opts: &VaeOptions) -> Result<VaeConfig> {
    let s = Shapes { set, prefix: "" };
    let ch = s.dim("encoder.conv_in.weight", 0)?;
    let levels = s.count("encoder.down.")?;
    if ch == 0 || levels == 0 {
        return Err(config_err(&set.root, "autoencoder has no down blocks"));
    }
    let ch_mult = (0..levels)
        .map(|i| Ok(s.dim(&format!("encoder.down.{i}.block.0.conv1.weight"), 0)? / ch))
        .collect::<Result<Vec<_>>>()?;
    Ok(VaeConfig {
        in_channels: s.dim("encoder.conv_in.weight", 1)?,
        out_channels: s.dim("decoder.conv_out.weight", 0)?,
        ch,
        ch_mult,
        num_res_blocks: s.count("encoder.down.0.block.")?,
        z_channels: s.dim("decoder.conv_in.weight", 1)?,
        norm_groups: opts.norm_groups,
        scale_factor: opts.scale_factor,
        shift_factor: opts.shift_factor,
    })
}

fn read_diffusers_config(path: &Path) -> Result<VaeConfig> {
    let j = JsonConfig::read(path)?;
    let blocks = j.usize_list("block_out_channels")?;
    let ch = *blocks
        .first()
        .ok_or_else(|| config_err(path, "empty block_out_channels"))?;
    if ch == 0 || blocks.iter().any(|b| b % ch != 0) {
        return Err(config_err(
            path,
            format!("block_out_channels {blocks:?} are not multiples of the first"),
        ));
    }
    if j.bool_or("use_quant_conv", false) || j.bool_or("use_post_quant_conv", false) {
        return Err(config_err(
            path,
            "quant_conv layers are not part of the Flux autoencoder; this is another model's VAE",
        ));
    }
    Ok(VaeConfig {
        in_channels: j.usize_or("in_channels", 3)?,
        out_channels: j.usize_or("out_channels", 3)?,
        ch,
        ch_mult: blocks.iter().map(|b| b / ch).collect(),
        num_res_blocks: j.usize("layers_per_block")?,
        z_channels: j.usize("latent_channels")?,
        norm_groups: j.usize_or("norm_num_groups", 32)?,
        scale_factor: j.f32_or("scaling_factor", 0.3611)?,
        shift_factor: j.f32_or("shift_factor", 0.0)?,
    })
}

/// Opens the autoencoder from `ae.safetensors` or a diffusers `vae/` folder.
pub fn load_vae(path: &Path, opts: &VaeOptions) -> Result<Vae> {
    let set = TensorSet::open(path)?;
    let diffusers = set.contains("encoder.down_blocks.0.resnets.0.conv1.weight");
    let config = if diffusers {
        let dir = if path.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        read_diffusers_config(&dir.join("config.json"))?
    } else if set.contains("encoder.down.0.block.0.conv1.weight") {
        infer_bfl_config(&set, opts)?
    } else {
        return Err(LoadError::UnknownLayout {
            path: path.to_path_buf(),
            reason: "not a Flux autoencoder: found neither encoder.down.0.block.0.conv1.weight (ae.safetensors) nor encoder.down_blocks.0.resnets.0.conv1.weight (diffusers vae/)".into(),
        });
    };
    if diffusers {
        // Counts from config.json must match the blocks present before anything is sized by them.
        let shapes = Shapes {
            set: &set,
            prefix: "",
        };
        shapes.expect_count(
            "encoder.down_blocks.",
            config.ch_mult.len(),
            "len(block_out_channels)",
        )?;
        shapes.expect_count(
            "encoder.down_blocks.0.resnets.",
            config.num_res_blocks,
            "layers_per_block",
        )?;
    }
    if config.ch_mult.is_empty() || config.ch_mult.len() > 16 {
        return Err(config_err(
            path,
            format!(
                "{} resolution levels; a Flux autoencoder has 4",
                config.ch_mult.len()
            ),
        ));
    }
    if config.norm_groups == 0
        || config
            .ch_mult
            .iter()
            .any(|m| (config.ch * m) % config.norm_groups != 0)
    {
        return Err(config_err(
            path,
            format!(
                "{} channels cannot be split into {} groups",
                config.ch, config.norm_groups
            ),
        ));
    }
    let levels = config.ch_mult.len();
    let expects: Vec<Expect> = expected_shapes(&config)
        .into_iter()
        .map(|(name, shape)| {
            if diffusers {
                Expect {
                    sources: vec![Src::whole(diffusers_name(&name, levels))],
                    canonical: name,
                    shape,
                }
            } else {
                Expect::same(name, shape)
            }
        })
        .collect();
    let layout = if diffusers {
        "diffusers vae/ folder"
    } else {
        "BFL ae.safetensors"
    };
    let weights = assemble(&set, "vae", layout, "", &expects)?;
    Ok(Vae { config, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flux_ae() -> VaeConfig {
        crate::sparse::flux_ae()
    }

    #[test]
    fn flux_autoencoder_counts_match_spec() {
        let shapes = expected_shapes(&flux_ae());
        assert_eq!(shapes.len(), 244, "spec 4.1: 244 tensors");
        let count = |side: &str| -> usize {
            shapes
                .iter()
                .filter(|(n, _)| n.starts_with(side))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        assert_eq!(count("encoder."), 34_274_208);
        assert_eq!(count("decoder."), 49_545_475);
    }

    #[test]
    fn diffusers_names() {
        assert_eq!(
            diffusers_name("decoder.up.3.block.0.conv1.weight", 4),
            "decoder.up_blocks.0.resnets.0.conv1.weight"
        );
        assert_eq!(
            diffusers_name("decoder.up.1.upsample.conv.bias", 4),
            "decoder.up_blocks.2.upsamplers.0.conv.bias"
        );
        assert_eq!(
            diffusers_name("encoder.down.1.block.0.nin_shortcut.weight", 4),
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"
        );
        assert_eq!(
            diffusers_name("encoder.down.2.downsample.conv.weight", 4),
            "encoder.down_blocks.2.downsamplers.0.conv.weight"
        );
        assert_eq!(
            diffusers_name("encoder.mid.block_2.norm1.weight", 4),
            "encoder.mid_block.resnets.1.norm1.weight"
        );
        assert_eq!(
            diffusers_name("decoder.mid.attn_1.proj_out.weight", 4),
            "decoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            diffusers_name("decoder.mid.attn_1.norm.bias", 4),
            "decoder.mid_block.attentions.0.group_norm.bias"
        );
        assert_eq!(
            diffusers_name("encoder.norm_out.weight", 4),
            "encoder.conv_norm_out.weight"
        );
        assert_eq!(
            diffusers_name("encoder.conv_out.weight", 4),
            "encoder.conv_out.weight"
        );
    }
}
