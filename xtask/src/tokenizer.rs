//! InternLM2-shaped BPE tokenizers trained from text: the demo's small one and the
//! benchmark's 32k one.
//!
//! The shape is what `transformers` writes for InternLM2's SentencePiece model:
//! - normalizer `Prepend("▁")` then `Replace(" ", "▁")`, and no pre-tokenizer;
//! - BPE with `byte_fallback`, the 256 byte pieces `<0x00>`..`<0xFF>` as ordinary vocab
//!   entries (ids 9..=264), so any character still encodes;
//! - decoder `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", 1, 0)`;
//! - InternLM2's special tokens at ids 0..=8 ([`SPECIAL_TOKENS`]).
//!
//! Training splits the normalized text before every "▁" and around every "\n", so no
//! merge crosses a word boundary. The saved tokenizer, like SentencePiece, has no
//! pre-tokenizer and encodes a whole segment at once; that gives the same pieces,
//! because no learned token has a "▁" anywhere but at its start.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::{
    NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::{AddedToken, Tokenizer, Trainer};

/// InternLM2's special tokens, in id order from 0.
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<|action_start|>",
    "<|action_end|>",
    "<|interpreter|>",
    "<|plugin|>",
];

/// SentencePiece's word-boundary mark, which stands for a space.
const SPACE: char = '▁';

/// Ids taken before the trained pieces: special tokens and byte pieces.
const RESERVED: usize = SPECIAL_TOKENS.len() + 256;

/// `tokenizer_config.json` as InternLM2 ships it (BOS added, no EOS, pad = EOS).
const TOKENIZER_CONFIG: &str = r#"{
  "bos_token": "<s>",
  "eos_token": "</s>",
  "unk_token": "<unk>",
  "pad_token": "</s>",
  "add_bos_token": true,
  "add_eos_token": false,
  "tokenizer_class": "PreTrainedTokenizerFast"
}
"#;

/// Trains a tokenizer of at most `vocab_size` entries (special and byte pieces
/// included) on `texts`. Texts may contain special tokens; like the `tokenizers` added
/// vocabulary, they split a text into segments that are normalized one by one.
///
/// # Errors
/// A vocabulary too small to hold the reserved pieces, or a training failure.
pub fn train(texts: &[String], vocab_size: usize) -> Result<Tokenizer> {
    let Some(trained_size) = vocab_size.checked_sub(RESERVED).filter(|&n| n > 0) else {
        bail!("a vocabulary of {vocab_size} cannot hold the {RESERVED} special and byte pieces");
    };
    let mut trainer = BpeTrainer::builder()
        .vocab_size(trained_size)
        .show_progress(false)
        .build();
    trainer
        .feed(texts.iter(), |text| Ok(training_words(text)))
        .map_err(anyhow::Error::from_boxed)
        .context("counting words")?;
    let mut trained = BPE::default();
    trainer
        .train(&mut trained)
        .map_err(anyhow::Error::from_boxed)
        .context("training BPE")?;
    let trained = serde_json::to_value(&trained).context("reading the trained BPE")?;
    let model = internlm2_model(&trained)?;

    let mut tokenizer = Tokenizer::new(model);
    let normalizer = NormalizerSequence::new(vec![
        Prepend::new(SPACE.to_string()).into(),
        Replace::new(" ", SPACE.to_string())
            .map_err(anyhow::Error::from_boxed)?
            .into(),
    ]);
    tokenizer
        .with_normalizer(Some(NormalizerWrapper::Sequence(normalizer)))
        .map_err(anyhow::Error::from_boxed)?;
    let decoder = DecoderSequence::new(vec![
        DecoderWrapper::Replace(
            Replace::new(SPACE.to_string(), " ").map_err(anyhow::Error::from_boxed)?,
        ),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ]);
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(decoder)));
    let specials = SPECIAL_TOKENS.map(|t| AddedToken::from(t, true));
    tokenizer
        .add_special_tokens(specials)
        .map_err(anyhow::Error::from_boxed)?;
    Ok(tokenizer)
}

/// The final BPE: special tokens, then byte pieces, then the trained pieces in the
/// trainer's order, with the trainer's merges.
fn internlm2_model(trained: &Value) -> Result<BPE> {
    let trained_vocab = trained["vocab"]
        .as_object()
        .context("the trained BPE has no vocab")?;
    let mut pieces: Vec<(&String, u64)> = trained_vocab
        .iter()
        .filter_map(|(piece, id)| Some((piece, id.as_u64()?)))
        .collect();
    pieces.sort_by_key(|&(_, id)| id);

    let mut vocab = Map::new();
    let reserved = SPECIAL_TOKENS
        .iter()
        .map(|t| t.to_string())
        .chain((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    for piece in reserved.chain(pieces.into_iter().map(|(piece, _)| piece.clone())) {
        let id = vocab.len();
        vocab.entry(piece).or_insert_with(|| json!(id));
    }
    let model = json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": "<unk>",
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": true,
        "byte_fallback": true,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": trained["merges"].clone(),
    });
    // From text: the BPE deserializer borrows its `type` tag, which a `Value` cannot lend.
    serde_json::from_str(&model.to_string()).context("building the BPE model")
}

/// The words the trainer counts in one text: special tokens split it into segments,
/// each segment is normalized as the tokenizer will (a leading "▁", spaces to "▁"),
/// then cut before every "▁"; a "\n" is a word of its own.
fn training_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for segment in split_specials(text) {
        let normalized = format!("{SPACE}{}", segment.replace(' ', &SPACE.to_string()));
        let mut word = String::new();
        for c in normalized.chars() {
            if (c == SPACE || c == '\n') && !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            word.push(c);
            if c == '\n' {
                words.push(std::mem::take(&mut word));
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words
}

/// The non-empty stretches of `text` between special tokens.
fn split_specials(text: &str) -> Vec<&str> {
    let mut segments = Vec::new();
    let mut rest = text;
    loop {
        let next = SPECIAL_TOKENS
            .iter()
            .filter_map(|t| rest.find(t).map(|at| (at, t.len())))
            .min();
        let Some((at, len)) = next else { break };
        segments.push(&rest[..at]);
        rest = &rest[at + len..];
    }
    segments.push(rest);
    segments.retain(|s| !s.is_empty());
    segments
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`, then loads the file
/// back and checks that every sample survives encode → decode.
///
/// # Errors
/// An unwritable directory, a file that does not load, or a sample that does not
/// round-trip.
pub fn save(tokenizer: &Tokenizer, dir: &Path, samples: &[&str]) -> Result<Tokenizer> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = dir.join("tokenizer.json");
    tokenizer
        .save(&file, true)
        .map_err(anyhow::Error::from_boxed)
        .with_context(|| format!("writing {}", file.display()))?;
    let config = dir.join("tokenizer_config.json");
    fs::write(&config, TOKENIZER_CONFIG)
        .with_context(|| format!("writing {}", config.display()))?;
    let loaded = load(dir)?;
    for sample in samples {
        check_round_trip(&loaded, sample)?;
    }
    Ok(loaded)
}

/// Loads `dir/tokenizer.json`.
///
/// # Errors
/// A missing or corrupt file.
pub fn load(dir: &Path) -> Result<Tokenizer> {
    let file = dir.join("tokenizer.json");
    Tokenizer::from_file(&file)
        .map_err(anyhow::Error::from_boxed)
        .with_context(|| format!("loading {}", file.display()))
}

/// Checks that `text` decodes back to itself (texts without special tokens and
/// without a leading space, which SentencePiece-style decoding drops).
fn check_round_trip(tokenizer: &Tokenizer, text: &str) -> Result<()> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(anyhow::Error::from_boxed)?;
    let decoded = tokenizer
        .decode(encoding.get_ids(), false)
        .map_err(anyhow::Error::from_boxed)?;
    if decoded != text {
        bail!(
            "round trip failed: {text:?} -> {:?} -> {decoded:?}",
            encoding.get_tokens()
        );
    }
    Ok(())
}

/// The pieces `text` encodes to.
///
/// # Errors
/// An encoding failure.
pub fn pieces(tokenizer: &Tokenizer, text: &str) -> Result<Vec<String>> {
    let encoding = tokenizer
        .encode(text, false)
        .map_err(anyhow::Error::from_boxed)?;
    Ok(encoding.get_tokens().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_words_start_at_each_boundary() {
        let words = training_words("<|im_start|>user\nReverse the words: a b<|im_end|>\n");
        assert_eq!(
            words,
            [
                "▁user",
                "\n",
                "Reverse",
                "▁the",
                "▁words:",
                "▁a",
                "▁b",
                "▁",
                "\n"
            ]
        );
        assert_eq!(training_words("  x"), ["▁", "▁", "▁x"]);
        assert!(training_words("<s></s>").is_empty());
    }

    #[test]
    fn trained_tokenizer_has_internlm2_shape() {
        let texts: Vec<String> = (0..50)
            .map(|i| format!("the cat sat on the mat {i}"))
            .collect();
        let tokenizer = train(&texts, 320).unwrap();
        assert_eq!(tokenizer.token_to_id("<unk>"), Some(0));
        assert_eq!(tokenizer.token_to_id("<|plugin|>"), Some(8));
        assert_eq!(tokenizer.token_to_id("<0x00>"), Some(9));
        assert_eq!(tokenizer.token_to_id("<0xFF>"), Some(264));
        assert_eq!(pieces(&tokenizer, "the cat").unwrap(), ["▁the", "▁cat"]);
        let dir = std::env::temp_dir().join(format!("xtask-tokenizer-test-{}", std::process::id()));
        let loaded = save(
            &tokenizer,
            &dir,
            &["the cat sat", "héllo 你好 🙂\nnew line"],
        )
        .unwrap();
        assert_eq!(loaded.get_vocab_size(true), tokenizer.get_vocab_size(true));
        let ids = loaded
            .encode("<|im_start|>the<|im_end|>", false)
            .unwrap()
            .get_ids()
            .to_vec();
        assert_eq!(ids.first(), Some(&3));
        assert_eq!(ids.last(), Some(&4));
        fs::remove_dir_all(&dir).unwrap();
    }
}
