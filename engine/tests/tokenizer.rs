//! The prompt tokenizers against transformers' ids (tests/fixtures/tokenizers, written by
//! tests/fixtures/generate_encoders.py): the real CLIP vocabulary and a small trained T5 Unigram,
//! on the same 55 prompts (case, punctuation, digits, unicode, emoji, whitespace, special-token
//! text, over-long prompts), with truncation and padding as the reference applies them.
//!
//! Run with `--nocapture` to see the agreement counts.

use flate2::read::GzDecoder;
use kontext_engine::tokenizer::{TextTokenizer, TokenizerError, CLIP_MAX_LENGTH, T5_MAX_LENGTH};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/tokenizers");

fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("valid JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// CLIP's byte → symbol table (`bytes_to_unicode` of CLIP's simple_tokenizer.py), in its order.
fn byte_symbols() -> Vec<char> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("valid char"))
        .collect()
}

/// A CLIP `tokenizer/` folder as FLUX ships it (vocab.json + merges.txt + tokenizer_config.json),
/// from the committed merges: the vocabulary is derived as CLIP's SimpleTokenizer derives it
/// (byte symbols, the same with `</w>`, every merge joined, then the two special tokens).
fn real_clip_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut merges = String::new();
    let gz =
        std::fs::File::open(Path::new(ROOT).join("clip/merges.txt.gz")).expect("merges.txt.gz");
    GzDecoder::new(gz)
        .read_to_string(&mut merges)
        .expect("gzip");
    let mut vocab: Vec<String> = byte_symbols().iter().map(|c| c.to_string()).collect();
    vocab.extend(byte_symbols().iter().map(|c| format!("{c}</w>")));
    vocab.extend(
        merges
            .lines()
            .skip(1) // "#version: 0.2"
            .filter(|l| !l.is_empty())
            .map(|l| l.replace(' ', "")),
    );
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    assert_eq!(vocab.len(), 49408, "CLIP-L vocabulary size");
    let map: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, Value::from(i)))
        .collect();
    std::fs::write(
        dir.path().join("vocab.json"),
        Value::Object(map).to_string(),
    )
    .expect("write");
    std::fs::write(dir.path().join("merges.txt"), merges).expect("write");
    std::fs::copy(
        Path::new(ROOT).join("clip/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .expect("copy");
    dir
}

fn preview(s: &str) -> String {
    s.chars()
        .take(40)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

#[test]
fn clip_ids_equal_transformers_on_every_prompt() {
    let expected = json(&Path::new(ROOT).join("clip/expected.json"));
    assert_eq!(
        expected["max_length"].as_u64(),
        Some(CLIP_MAX_LENGTH as u64)
    );
    let dir = real_clip_folder();
    let tok = TextTokenizer::clip(dir.path(), CLIP_MAX_LENGTH).expect("CLIP tokenizer");
    assert_eq!(tok.pad_id, 49407, "FLUX pads CLIP with <|endoftext|>");
    let cases = expected["cases"].as_array().expect("cases");
    let (mut same, mut truncated) = (0, 0);
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let want = ids(&case["ids"]);
        let untruncated = case["tokens_untruncated"].as_u64().expect("count") as usize;
        let got = tok.encode(prompt).expect("encode");
        assert_eq!(got.ids.len(), CLIP_MAX_LENGTH);
        let trunc_ok = match &got.truncation {
            Some(t) => {
                truncated += 1;
                untruncated > CLIP_MAX_LENGTH
                    && t.total_tokens == untruncated
                    && !t.dropped_text.is_empty()
            }
            None => untruncated <= CLIP_MAX_LENGTH,
        };
        if got.ids == want && trunc_ok {
            same += 1;
        } else {
            failures.push(format!(
                "{:?}\n  want {:?}\n  got  {:?} ({:?})",
                preview(prompt),
                want,
                got.ids,
                got.truncation
            ));
        }
    }
    println!(
        "CLIP (real 49408-token vocabulary): {same}/{} prompts equal to transformers, {truncated} truncated at {CLIP_MAX_LENGTH}",
        cases.len()
    );
    assert!(cases.len() >= 50);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn clip_folder_forms_agree_with_transformers() {
    // The small CLIP BPE of the model fixture, as FLUX ships it (vocab.json + merges.txt) and as
    // transformers saves it (tokenizer.json), against transformers' ids for the same prompts.
    let enc = Path::new(ROOT).join("../encoders/clip");
    let cases = json(&enc.join("meta.json"))["tokenizer_cases"].clone();
    let cases = cases.as_array().expect("tokenizer_cases");
    for form in ["tokenizer", "tokenizer_json"] {
        let tok = TextTokenizer::clip(&enc.join(form), CLIP_MAX_LENGTH).expect("CLIP tokenizer");
        let mut same = 0;
        for case in cases {
            let prompt = case["prompt"].as_str().expect("prompt");
            let got = tok.encode(prompt).expect("encode");
            let untruncated = case["tokens_untruncated"].as_u64().expect("count") as usize;
            assert_eq!(got.ids, ids(&case["ids"]), "{form}: {:?}", preview(prompt));
            assert_eq!(
                got.truncation.map(|t| t.total_tokens),
                (untruncated > CLIP_MAX_LENGTH).then_some(untruncated),
                "{form}: {:?}",
                preview(prompt)
            );
            same += 1;
        }
        println!(
            "CLIP (60-merge vocabulary, {form}/): {same}/{} prompts equal to transformers",
            cases.len()
        );
    }
}

#[test]
fn clip_truncation_reports_the_dropped_text() {
    let dir = real_clip_folder();
    let tok = TextTokenizer::clip(dir.path(), CLIP_MAX_LENGTH).expect("CLIP tokenizer");
    let prompt = format!("{} zebra giraffe", "cat ".repeat(75));
    let t = tok.encode(&prompt).expect("encode");
    let tr = t.truncation.expect("truncated");
    assert_eq!(tr.total_tokens, 2 + 75 + 2);
    assert_eq!(tr.dropped_text, "zebra giraffe");
    assert_eq!(t.ids[CLIP_MAX_LENGTH - 1], 49407, "end token kept last");
    assert_eq!(t.len, CLIP_MAX_LENGTH);
    let short = tok.encode("a cat").expect("encode");
    assert_eq!(short.truncation, None);
    assert_eq!(short.len, 4);
    assert_eq!(&short.ids[..5], &[49406, 320, 2368, 49407, 49407]);
}

#[test]
fn t5_ids_equal_transformers_at_512_and_16() {
    let dir = PathBuf::from(ROOT).join("t5");
    let expected = json(&dir.join("expected.json"));
    let short_len = expected["short_max_length"].as_u64().expect("short") as usize;
    assert_eq!(expected["max_length"].as_u64(), Some(T5_MAX_LENGTH as u64));
    let long = TextTokenizer::t5(&dir, T5_MAX_LENGTH).expect("T5 tokenizer");
    let short = TextTokenizer::t5(&dir, short_len).expect("T5 tokenizer");
    assert_eq!((long.pad_id, long.added_tokens), (0, 1));
    let cases = expected["cases"].as_array().expect("cases");
    let (mut same_long, mut same_short, mut trunc_long, mut trunc_short) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().expect("prompt");
        let untruncated = case["tokens_untruncated"].as_u64().expect("count") as usize;
        let mut want = ids(&case["ids_512_unpadded"]);
        want.resize(T5_MAX_LENGTH, 0);
        let want_short = ids(&case["ids_16"]);
        for (tok, want, same, trunc) in [
            (&long, &want, &mut same_long, &mut trunc_long),
            (&short, &want_short, &mut same_short, &mut trunc_short),
        ] {
            let got = tok.encode(prompt).expect("encode");
            let trunc_ok = match &got.truncation {
                Some(t) => {
                    *trunc += 1;
                    untruncated > tok.max_length && t.total_tokens == untruncated
                }
                None => untruncated <= tok.max_length,
            };
            if &got.ids == want && trunc_ok {
                *same += 1;
            } else {
                failures.push(format!(
                    "max {} {:?}\n  want {:?}\n  got  {:?} ({:?})",
                    tok.max_length,
                    preview(prompt),
                    &want[..want.len().min(24)],
                    &got.ids[..got.ids.len().min(24)],
                    got.truncation
                ));
            }
        }
    }
    println!(
        "T5 (trained Unigram, vocab {}): {same_long}/{n} equal at 512 ({trunc_long} truncated), \
         {same_short}/{n} equal at {short_len} ({trunc_short} truncated)",
        expected["vocab_size"],
        n = cases.len()
    );
    assert!(cases.len() >= 50);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn t5_keeps_the_end_token_when_truncating() {
    let dir = PathBuf::from(ROOT).join("t5");
    let tok = TextTokenizer::t5(&dir, 8).expect("T5 tokenizer");
    let t = tok
        .encode("the cat is sitting on a windowsill looking at the rain outside")
        .expect("encode");
    assert_eq!(t.ids.len(), 8);
    assert_eq!(t.ids[7], 1, "</s> last");
    let tr = t.truncation.expect("truncated");
    assert!(tr.total_tokens > 8);
    assert!(tr.dropped_text.contains("rain"), "{tr:?}");
}

#[test]
fn folders_without_the_needed_files_are_reported() {
    let empty = tempfile::tempdir().expect("temp dir");
    let err = TextTokenizer::clip(empty.path(), 77)
        .err()
        .expect("no files");
    assert!(
        matches!(&err, TokenizerError::Folder { reason, .. } if reason.contains("vocab.json")),
        "{err}"
    );
    std::fs::write(empty.path().join("spiece.model"), b"x").expect("write");
    let err = TextTokenizer::t5(empty.path(), 512)
        .err()
        .expect("no tokenizer.json");
    assert!(err.to_string().contains("spiece.model"), "{err}");
    let bad = tempfile::tempdir().expect("temp dir");
    std::fs::write(bad.path().join("tokenizer.json"), b"{ not json").expect("write");
    let err = TextTokenizer::t5(bad.path(), 512).err().expect("bad json");
    assert!(matches!(err, TokenizerError::Build { .. }), "{err}");
    let t5 = PathBuf::from(ROOT).join("t5");
    let err = TextTokenizer::t5(&t5, 1).err().expect("no room");
    assert!(err.to_string().contains("no room"), "{err}");
}
