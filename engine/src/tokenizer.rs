//! The two prompt tokenizers, built with the `tokenizers` crate exactly as transformers builds
//! them, so the ids equal the reference's (spec 5.1, 5.2):
//!
//! - T5 (`tokenizer_2/tokenizer.json`, the T5TokenizerFast file): Unigram with the SentencePiece
//!   normaliser, `</s>` appended; truncated to `max_length` (512) with `</s>` kept last, padded
//!   with `<pad>`.
//! - CLIP (`tokenizer/tokenizer.json` when present, else `vocab.json` + `merges.txt` as the FLUX
//!   folder ships): byte-level BPE with CLIP's normalisation (NFC, whitespace runs → one space,
//!   lower case), CLIP's word pattern, the `</w>` end-of-word suffix, `<|startoftext|>` …
//!   `<|endoftext|>`; truncated to 77 with the end token kept last, padded with the pad token the
//!   folder's config names (`<|endoftext|>` for FLUX).
//!
//! A prompt past the limit is truncated as the reference does; [`Tokens::truncation`] says so,
//! with the dropped text, so the caller can tell the user.

use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

/// The CLIP token limit of FLUX (`tokenizer_max_length`, spec 5.2).
pub const CLIP_MAX_LENGTH: usize = 77;
/// The T5 token limit of FLUX dev / Kontext dev (spec 5.1).
pub const T5_MAX_LENGTH: usize = 512;

/// CLIP's word pattern (the `Split` pre-tokenizer of transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// What went wrong reading a tokenizer folder or encoding a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file of the tokenizer folder is missing or unreadable.
    #[error("{path}: {reason}")]
    Folder { path: PathBuf, reason: String },
    /// The `tokenizers` crate rejected the files or a component built from them.
    #[error("{path}: cannot build the {what}: {reason}")]
    Build {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    /// Encoding a prompt failed inside `tokenizers`.
    #[error("encoding the prompt {prompt:?}: {reason}")]
    Encode { prompt: String, reason: String },
}

type Result<T> = std::result::Result<T, TokenizerError>;

/// A prompt cut at the token limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncation {
    /// The limit (special tokens included).
    pub max_length: usize,
    /// Tokens the whole prompt needs, special tokens included.
    pub total_tokens: usize,
    /// The text of the dropped tokens (decoded, special tokens skipped).
    pub dropped_text: String,
}

/// The ids of one prompt, exactly `max_length` long (padded), and whether it was truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    /// `[max_length]` token ids.
    pub ids: Vec<u32>,
    /// Ids before padding (special tokens included).
    pub len: usize,
    /// Set when the prompt did not fit.
    pub truncation: Option<Truncation>,
}

/// Which of the two FLUX tokenizers a [`TextTokenizer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// CLIP byte-level BPE (`tokenizer/`).
    Clip,
    /// T5 Unigram (`tokenizer_2/`).
    T5,
}

/// A prompt tokenizer with the reference's truncation and padding to a fixed length.
pub struct TextTokenizer {
    /// CLIP or T5.
    pub kind: TokenizerKind,
    /// The folder it was read from.
    pub path: PathBuf,
    /// Padded length of every encoding.
    pub max_length: usize,
    /// The id padding uses.
    pub pad_id: u32,
    /// Special tokens added per prompt (T5: `</s>`; CLIP: start and end).
    pub added_tokens: usize,
    /// Without truncation or padding, to measure the whole prompt.
    full: Tokenizer,
    /// With the reference's truncation and padding.
    fixed: Tokenizer,
}

fn folder_err(path: &Path, reason: impl Into<String>) -> TokenizerError {
    TokenizerError::Folder {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn build_err(path: &Path, what: &'static str, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Build {
        path: path.to_path_buf(),
        what,
        reason: e.to_string(),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| folder_err(path, e.to_string()))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| folder_err(path, format!("not valid JSON: {e}")))
}

/// The folder's `tokenizer_config.json` and `special_tokens_map.json` (either may be absent).
struct FolderConfig {
    configs: Vec<Value>,
}

impl FolderConfig {
    fn read(dir: &Path) -> Result<FolderConfig> {
        let mut configs = Vec::new();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            configs.extend(read_json(&dir.join(name))?);
        }
        Ok(FolderConfig { configs })
    }

    /// A special token named `key` (`"pad_token"`, …): a string or `{"content": …}`.
    fn token(&self, key: &str) -> Option<String> {
        self.configs.iter().find_map(|c| match c.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        })
    }

    /// The `normalized` flag of special token `content` (`added_tokens_decoder`, or the token's
    /// object in the special-tokens map); `None` when no file says.
    fn normalized(&self, content: &str) -> Option<bool> {
        self.configs.iter().find_map(|c| {
            let from_decoder = c
                .get("added_tokens_decoder")
                .and_then(Value::as_object)
                .and_then(|m| {
                    m.values()
                        .find(|t| t.get("content").and_then(Value::as_str) == Some(content))
                })
                .and_then(|t| t.get("normalized")?.as_bool());
            from_decoder.or_else(|| {
                c.as_object()?
                    .values()
                    .find(|t| t.get("content").and_then(Value::as_str) == Some(content))
                    .and_then(|t| t.get("normalized")?.as_bool())
            })
        })
    }
}

/// transformers' `CLIPTokenizer` from `vocab.json` + `merges.txt` (tokenization_clip.py).
fn build_clip_bpe(dir: &Path, cfg: &FolderConfig) -> Result<Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    for p in [&vocab, &merges] {
        if !p.is_file() {
            return Err(folder_err(
                dir,
                format!(
                    "a CLIP tokenizer folder needs tokenizer.json, or vocab.json and merges.txt; {} is missing",
                    p.display()
                ),
            ));
        }
    }
    let to_str = |p: &Path| -> Result<String> {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| folder_err(p, "path is not UTF-8"))
    };
    let bos = cfg
        .token("bos_token")
        .unwrap_or_else(|| "<|startoftext|>".into());
    let eos = cfg
        .token("eos_token")
        .unwrap_or_else(|| "<|endoftext|>".into());
    let unk = cfg
        .token("unk_token")
        .unwrap_or_else(|| "<|endoftext|>".into());
    let bpe = BPE::from_file(&to_str(&vocab)?, &to_str(&merges)?)
        .unk_token(unk)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix("</w>".into())
        .build()
        .map_err(|e| build_err(dir, "CLIP BPE from vocab.json + merges.txt", e))?;
    let mut tok = Tokenizer::new(bpe);
    let ws = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| build_err(dir, "CLIP normaliser", e))?;
    tok.with_normalizer(Some(NormSeq::new(vec![
        NFC.into(),
        ws.into(),
        Lowercase.into(),
    ])))
    .map_err(|e| build_err(dir, "CLIP normaliser", e))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| build_err(dir, "CLIP pre-tokenizer", e))?;
    tok.with_pre_tokenizer(Some(PreSeq::new(vec![
        split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tok.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = [&bos, &eos]
        .iter()
        .map(|t| AddedToken::from(t.as_str(), true).normalized(cfg.normalized(t).unwrap_or(false)))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| build_err(dir, "CLIP special tokens", e))?;
    let id = |t: &str| {
        tok.token_to_id(t)
            .ok_or_else(|| folder_err(dir, format!("special token {t:?} is not in vocab.json")))
    };
    let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
    tok.with_post_processor(Some(
        RobertaProcessing::new((eos, eos_id), (bos, bos_id))
            .trim_offsets(false)
            .add_prefix_space(false),
    ));
    Ok(tok)
}

impl TextTokenizer {
    /// The CLIP tokenizer of a `tokenizer/` folder, padded and truncated to `max_length` (77).
    pub fn clip(dir: &Path, max_length: usize) -> Result<TextTokenizer> {
        let cfg = FolderConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        let tok = if json.is_file() {
            Tokenizer::from_file(&json).map_err(|e| build_err(&json, "CLIP tokenizer", e))?
        } else {
            build_clip_bpe(dir, &cfg)?
        };
        let pad = cfg
            .token("pad_token")
            .unwrap_or_else(|| "<|endoftext|>".into());
        TextTokenizer::new(TokenizerKind::Clip, dir, tok, &pad, max_length)
    }

    /// The T5 tokenizer of a `tokenizer_2/` folder (`tokenizer.json`), padded and truncated to
    /// `max_length` (512).
    pub fn t5(dir: &Path, max_length: usize) -> Result<TextTokenizer> {
        let cfg = FolderConfig::read(dir)?;
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            let hint = if dir.join("spiece.model").is_file() {
                " (only spiece.model is there: convert it once with transformers, \
                 T5TokenizerFast.from_pretrained(dir).save_pretrained(dir))"
            } else {
                ""
            };
            return Err(folder_err(
                dir,
                format!("a T5 tokenizer folder needs tokenizer.json{hint}"),
            ));
        }
        let tok = Tokenizer::from_file(&json).map_err(|e| build_err(&json, "T5 tokenizer", e))?;
        let pad = cfg.token("pad_token").unwrap_or_else(|| "<pad>".into());
        TextTokenizer::new(TokenizerKind::T5, dir, tok, &pad, max_length)
    }

    fn new(
        kind: TokenizerKind,
        dir: &Path,
        mut full: Tokenizer,
        pad: &str,
        max_length: usize,
    ) -> Result<TextTokenizer> {
        let pad_id = full.token_to_id(pad).ok_or_else(|| {
            folder_err(dir, format!("pad token {pad:?} is not in the vocabulary"))
        })?;
        full.with_padding(None);
        full.with_truncation(None)
            .map_err(|e| build_err(dir, "untruncated tokenizer", e))?;
        let added_tokens = full
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        if max_length <= added_tokens {
            return Err(folder_err(
                dir,
                format!(
                    "max length {max_length} leaves no room next to {added_tokens} special tokens"
                ),
            ));
        }
        let mut fixed = full.clone();
        fixed
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| build_err(dir, "truncation", e))?;
        fixed.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.to_string(),
        }));
        Ok(TextTokenizer {
            kind,
            path: dir.to_path_buf(),
            max_length,
            pad_id,
            added_tokens,
            full,
            fixed,
        })
    }

    /// Number of ids the tokenizer can produce (special tokens included); the model's
    /// embedding table must have at least this many rows.
    pub fn vocab_size(&self) -> usize {
        self.full.get_vocab_size(true)
    }

    /// `prompt` → `max_length` ids (special tokens added, truncated, padded) and the truncation,
    /// if any.
    pub fn encode(&self, prompt: &str) -> Result<Tokens> {
        let enc_err = |e: tokenizers::Error| TokenizerError::Encode {
            prompt: prompt.chars().take(80).collect(),
            reason: e.to_string(),
        };
        let full = self.full.encode(prompt, true).map_err(enc_err)?;
        let fixed = self.fixed.encode(prompt, true).map_err(enc_err)?;
        let total = full.get_ids().len();
        let truncation = if total > self.max_length {
            // The content tokens past the limit (diffusers prints the same span).
            let content = self.full.encode(prompt, false).map_err(enc_err)?;
            let kept = self.max_length - self.added_tokens;
            let dropped = &content.get_ids()[kept.min(content.len())..];
            let mut dropped_text = self.full.decode(dropped, true).map_err(enc_err)?;
            if self.kind == TokenizerKind::Clip {
                // transformers' CLIPTokenizer turns the end-of-word suffix into spaces on decode.
                dropped_text = dropped_text.replace("</w>", " ").trim().to_string();
            }
            Some(Truncation {
                max_length: self.max_length,
                total_tokens: total,
                dropped_text,
            })
        } else {
            None
        };
        Ok(Tokens {
            ids: fixed.get_ids().to_vec(),
            len: total.min(self.max_length),
            truncation,
        })
    }
}
