//! XTuner's `encode_fn`: a templated conversation becomes `input_ids` and `labels`.
//!
//! Each piece is tokenized on its own, without special tokens: the input (system +
//! instruction), the output (+ suffix), the separator. Per turn:
//! 1. BOS (label -100) when the previous turn ended with an EOS (and at the start);
//! 2. the input, labels -100 (with images: `<image>` becomes [`IMAGE_TOKEN_INDEX`]);
//! 3. the output, labels = ids when `output_with_loss`, else -100;
//! 4. EOS when `need_eos_token` (labelled like the output); otherwise the next turn gets
//!    no BOS (templates whose SUFFIX serves as EOS);
//! 5. the separator, labels -100.
//!
//! The result is right-truncated to `max_length`. A sample with no trained label left is
//! dropped by the pipeline ([`EncodedSample::has_trained_label`]).

use serde::{Deserialize, Serialize};
use xtuner_template::Turn;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

pub use xtuner_template::tokens::{IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX};

/// One encoded sample.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncodedSample {
    /// Token ids ([`IMAGE_TOKEN_INDEX`] where an image goes).
    pub input_ids: Vec<i64>,
    /// Per-position labels ([`IGNORE_INDEX`] where nothing is trained).
    pub labels: Vec<i64>,
}

impl EncodedSample {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when there is no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// True when at least one label is trained (XTuner drops the others).
    pub fn has_trained_label(&self) -> bool {
        self.labels.iter().any(|&l| l >= 0)
    }

    /// Number of trained labels.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }

    fn push(&mut self, ids: &[i64], trained: bool) {
        self.input_ids.extend_from_slice(ids);
        if trained {
            self.labels.extend_from_slice(ids);
        } else {
            self.labels
                .extend(std::iter::repeat_n(IGNORE_INDEX, ids.len()));
        }
    }
}

/// Settings of the encoding step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeOptions {
    /// Samples are right-truncated to this many tokens.
    pub max_length: usize,
    /// Replace `<image>` in inputs with [`IMAGE_TOKEN_INDEX`] (LLaVA data).
    pub with_image_token: bool,
}

/// Encodes templated turns as XTuner's `encode_fn` does.
///
/// # Errors
/// A tokenizer failure, or a turn whose input holds more than one `<image>` when images
/// are on (XTuner asserts one per turn).
pub fn encode(
    tokenizer: &Tokenizer,
    turns: &[Turn],
    options: EncodeOptions,
) -> Result<EncodedSample> {
    let bos = widen(tokenizer.bos_ids());
    let eos = widen(tokenizer.eos_ids());
    let mut sample = EncodedSample::default();
    let mut next_needs_bos = true;
    for (i, turn) in turns.iter().enumerate() {
        if next_needs_bos {
            sample.push(&bos, false);
        }
        let input = encode_input(tokenizer, &turn.input, options.with_image_token, i + 1)?;
        sample.push(&input, false);
        if !turn.output.is_empty() {
            sample.push(
                &widen(&tokenizer.encode(&turn.output)?),
                turn.output_with_loss,
            );
        }
        if turn.need_eos_token {
            sample.push(&eos, turn.output_with_loss);
            next_needs_bos = true;
        } else {
            next_needs_bos = false;
        }
        if !turn.sep.is_empty() {
            sample.push(&widen(&tokenizer.encode(&turn.sep)?), false);
        }
    }
    sample.input_ids.truncate(options.max_length);
    sample.labels.truncate(options.max_length);
    Ok(sample)
}

/// Encodes text pieces one by one (without special tokens: a template writes its own),
/// each trained or not, right-truncated to `max_length`: the encoding of a conversation
/// rendered by a Jinja chat template.
///
/// # Errors
/// A tokenizer failure.
pub fn encode_pieces(
    tokenizer: &Tokenizer,
    pieces: &[(String, bool)],
    max_length: usize,
) -> Result<EncodedSample> {
    let mut sample = EncodedSample::default();
    for (text, trained) in pieces {
        if !text.is_empty() {
            sample.push(&widen(&tokenizer.encode(text)?), *trained);
        }
    }
    sample.input_ids.truncate(max_length);
    sample.labels.truncate(max_length);
    Ok(sample)
}

fn encode_input(
    tokenizer: &Tokenizer,
    input: &str,
    with_image: bool,
    turn: usize,
) -> Result<Vec<i64>> {
    if !(with_image && input.contains(IMAGE_TOKEN)) {
        return Ok(widen(&tokenizer.encode(input)?));
    }
    let mut parts = input.split(IMAGE_TOKEN);
    let (before, after) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if parts.next().is_some() {
        return Err(Error::InvalidSetting {
            key: "data",
            message: format!("turn {turn} holds more than one {IMAGE_TOKEN}; one image per turn"),
        });
    }
    let mut ids = widen(&tokenizer.encode(before)?);
    ids.push(IMAGE_TOKEN_INDEX);
    ids.extend(widen(&tokenizer.encode(after)?));
    Ok(ids)
}

fn widen(ids: &[u32]) -> Vec<i64> {
    ids.iter().map(|&id| i64::from(id)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_path(&crate::test_support::fixture("tokenizer")).unwrap()
    }

    const OPTS: EncodeOptions = EncodeOptions {
        max_length: 2048,
        with_image_token: true,
    };

    #[test]
    fn bos_only_after_eos() {
        let tok = tokenizer();
        let mut a = Turn::new("q", "a");
        a.need_eos_token = false;
        let s = encode(&tok, &[a.clone(), a], OPTS).unwrap();
        assert_eq!(s.input_ids.iter().filter(|&&i| i == 1).count(), 1);
        let s = encode(&tok, &[Turn::new("q", "a"), Turn::new("q", "a")], OPTS).unwrap();
        assert_eq!(s.input_ids.iter().filter(|&&i| i == 1).count(), 2);
        assert_eq!(
            s.labels.iter().filter(|&&l| l == 2).count(),
            2,
            "EOS is trained"
        );
    }

    #[test]
    fn output_without_loss_is_masked_with_its_eos() {
        let tok = tokenizer();
        let mut t = Turn::new("q", "a");
        t.output_with_loss = false;
        let s = encode(&tok, &[t], OPTS).unwrap();
        assert!(!s.has_trained_label());
    }

    #[test]
    fn image_token_and_truncation() {
        let tok = tokenizer();
        let s = encode(&tok, &[Turn::new("<image>\nhi", "a")], OPTS).unwrap();
        assert_eq!(
            s.input_ids
                .iter()
                .filter(|&&i| i == IMAGE_TOKEN_INDEX)
                .count(),
            1
        );
        let s = encode(
            &tok,
            &[Turn::new("<image>\nhi", "a")],
            EncodeOptions {
                max_length: 3,
                ..OPTS
            },
        )
        .unwrap();
        assert_eq!((s.input_ids.len(), s.labels.len()), (3, 3));
        assert!(encode(&tok, &[Turn::new("<image><image>", "a")], OPTS).is_err());
        let text = encode(
            &tok,
            &[Turn::new("<image>", "a")],
            EncodeOptions {
                with_image_token: false,
                ..OPTS
            },
        )
        .unwrap();
        assert!(!text.input_ids.contains(&IMAGE_TOKEN_INDEX));
    }
}
