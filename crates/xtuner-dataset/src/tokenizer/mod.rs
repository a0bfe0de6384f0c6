//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or SentencePiece
//! `tokenizer.model` (what real InternLM2 checkpoints ship) through [`sentencepiece`].
//!
//! [`Tokenizer`] hides which one is loaded and carries the BOS/EOS ids that XTuner's
//! `encode_fn` uses: BOS from `tokenizer_config.json` (else `config.json`), none for
//! Qwen tokenizers, `[64790, 64792]` for ChatGLM; EOS likewise.

pub mod sentencepiece;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use xtuner_template::JinjaTemplate;

use crate::{Error, Result};
use sentencepiece::SentencePieceBpe;

/// Tokenizer classes that XTuner treats as having no BOS.
const NO_BOS_CLASSES: &[&str] = &["QWenTokenizer", "Qwen2Tokenizer", "Qwen2TokenizerFast"];
/// BOS ids XTuner hard-codes for ChatGLM tokenizers.
const CHATGLM_BOS: &[u32] = &[64790, 64792];

enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    SentencePiece(Box<SentencePieceBpe>),
}

/// A loaded tokenizer with the special ids that encoding needs.
pub struct Tokenizer {
    backend: Backend,
    bos: Vec<u32>,
    eos: Vec<u32>,
    fingerprint: String,
    source: PathBuf,
    /// The directory's Jinja chat template (`None`: it has none); an error is kept for
    /// when the template is asked for, so that a template this engine cannot compile
    /// does not stop runs that never use it.
    chat_template: std::result::Result<Option<JinjaTemplate>, xtuner_template::Error>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads the tokenizer of a model directory (or a `tokenizer.json` /
    /// `tokenizer.model` file): `tokenizer.json` if present, else `tokenizer.model`.
    ///
    /// # Errors
    /// A missing directory or tokenizer file, a corrupt file, or a BOS/EOS token the
    /// vocabulary does not hold.
    pub fn from_path(path: &Path) -> Result<Self> {
        let (dir, file) = tokenizer_file(path)?;
        let bytes = fs::read(&file).map_err(|e| Error::io(&file, e))?;
        let backend = if file.extension().is_some_and(|e| e == "model") {
            Backend::SentencePiece(Box::new(
                SentencePieceBpe::from_bytes(&bytes).map_err(|e| tokenizer_error(&file, e))?,
            ))
        } else {
            let tok =
                tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| tokenizer_error(&file, e))?;
            Backend::Hf(Box::new(tok))
        };
        let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let model_config = read_json_if_present(&dir.join("config.json"))?;
        let mut tokenizer = Tokenizer {
            backend,
            bos: Vec::new(),
            eos: Vec::new(),
            fingerprint: fingerprint_files(&bytes, &dir)?,
            source: file.clone(),
            chat_template: JinjaTemplate::from_tokenizer_config(&dir, tokenizer_config.as_ref()),
        };
        let class = tokenizer_config
            .as_ref()
            .and_then(|c| c.get("tokenizer_class"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let special = |key: &str, id_key: &str| -> Result<Option<u32>> {
            tokenizer.special_id(
                &file,
                tokenizer_config.as_ref(),
                model_config.as_ref(),
                key,
                id_key,
            )
        };
        let bos = special("bos_token", "bos_token_id")?;
        let eos = special("eos_token", "eos_token_id")?;
        tokenizer.bos = if NO_BOS_CLASSES.contains(&class) {
            Vec::new()
        } else if class == "ChatGLMTokenizer" {
            CHATGLM_BOS.to_vec()
        } else {
            bos.into_iter().collect()
        };
        tokenizer.eos = eos.into_iter().collect();
        tracing::debug!(file = %file.display(), bos = ?tokenizer.bos, eos = ?tokenizer.eos, "tokenizer loaded");
        Ok(tokenizer)
    }

    /// Resolves a special token: by its text in `tokenizer_config.json`, else by id in
    /// `config.json`, else the SentencePiece model's own id.
    fn special_id(
        &self,
        file: &Path,
        tokenizer_config: Option<&Value>,
        model_config: Option<&Value>,
        key: &str,
        id_key: &str,
    ) -> Result<Option<u32>> {
        let text = tokenizer_config
            .and_then(|c| c.get(key))
            .and_then(|v| match v {
                Value::String(s) => Some(s.as_str()),
                Value::Object(o) => o.get("content").and_then(Value::as_str),
                _ => None,
            });
        if let Some(text) = text {
            return self.token_to_id(text).map(Some).ok_or_else(|| {
                tokenizer_error(file, format!("{key} `{text}` is not in the vocabulary"))
            });
        }
        if let Some(id) = model_config
            .and_then(|c| c.get(id_key))
            .and_then(Value::as_u64)
        {
            return Ok(u32::try_from(id).ok());
        }
        Ok(match (&self.backend, key) {
            (Backend::SentencePiece(spm), "bos_token") => spm.bos_id(),
            (Backend::SentencePiece(spm), "eos_token") => spm.eos_id(),
            _ => None,
        })
    }

    /// Encodes text without special tokens (XTuner's `add_special_tokens=False`).
    ///
    /// # Errors
    /// When the `tokenizers` pipeline fails on the text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(tok) => tok
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| Error::Encode {
                    message: e.to_string(),
                }),
            Backend::SentencePiece(spm) => Ok(spm.encode(text)),
        }
    }

    /// Encodes text without special tokens and returns each id with its piece.
    ///
    /// # Errors
    /// When the `tokenizers` pipeline fails on the text.
    pub fn encode_pieces(&self, text: &str) -> Result<Vec<(u32, String)>> {
        match &self.backend {
            Backend::Hf(tok) => {
                let enc = tok.encode(text, false).map_err(|e| Error::Encode {
                    message: e.to_string(),
                })?;
                Ok(enc
                    .get_ids()
                    .iter()
                    .copied()
                    .zip(enc.get_tokens().iter().cloned())
                    .collect())
            }
            Backend::SentencePiece(spm) => Ok(spm.encode_pieces(text)),
        }
    }

    /// Decodes ids to text (special tokens kept, as XTuner's logs show them).
    ///
    /// # Errors
    /// When the `tokenizers` decoder fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::Hf(tok) => tok.decode(ids, false).map_err(|e| Error::Encode {
                message: e.to_string(),
            }),
            Backend::SentencePiece(spm) => Ok(spm.decode(ids)),
        }
    }

    /// The id of a token (special tokens included).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.backend {
            Backend::Hf(tok) => tok.token_to_id(token),
            Backend::SentencePiece(spm) => spm.piece_to_id(token),
        }
    }

    /// The text of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(tok) => tok.id_to_token(id),
            Backend::SentencePiece(spm) => spm.id_to_piece(id).map(str::to_string),
        }
    }

    /// Number of ids (added tokens included).
    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(tok) => tok.get_vocab_size(true),
            Backend::SentencePiece(spm) => spm.vocab_size(),
        }
    }

    /// The ids prepended at the start of a sample and after each EOS (may be empty).
    pub fn bos_ids(&self) -> &[u32] {
        &self.bos
    }

    /// The ids appended after an output that needs an EOS.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    /// The file the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The tokenizer's own Jinja chat template (`chat_template.jinja` or
    /// `tokenizer_config.json`'s `chat_template`).
    ///
    /// # Errors
    /// The tokenizer has none, or it does not compile.
    pub fn chat_template(&self) -> Result<&JinjaTemplate> {
        match &self.chat_template {
            Ok(Some(template)) => Ok(template),
            Ok(None) => Err(Error::Tokenizer {
                path: self.source.clone(),
                message: "no chat_template (tokenizer_config.json or chat_template.jinja) beside this tokenizer".into(),
            }),
            Err(e) => Err(Error::ChatTemplate { source: e.clone() }),
        }
    }

    /// A hash of everything that decides how text is encoded (the tokenizer file and
    /// the configs that set the special ids); equal to [`fingerprint`] of its path.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// The fingerprint of the tokenizer at `path` without loading it: the dataset cache
/// checks it before deciding whether the tokenizer is needed at all.
///
/// # Errors
/// A missing or unreadable tokenizer file.
pub fn fingerprint(path: &Path) -> Result<String> {
    let (dir, file) = tokenizer_file(path)?;
    let bytes = fs::read(&file).map_err(|e| Error::io(&file, e))?;
    fingerprint_files(&bytes, &dir)
}

/// blake3 of the tokenizer file and of the configs beside it that decide BOS/EOS.
fn fingerprint_files(tokenizer_bytes: &[u8], dir: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(tokenizer_bytes);
    for name in [
        "tokenizer_config.json",
        "config.json",
        "chat_template.jinja",
    ] {
        let path = dir.join(name);
        match fs::read(&path) {
            Ok(bytes) => {
                hasher.update(name.as_bytes());
                hasher.update(&bytes);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The directory and the tokenizer file of a path: a directory holding
/// `tokenizer.json` (preferred) or `tokenizer.model`, or one of those files.
fn tokenizer_file(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        for name in ["tokenizer.json", "tokenizer.model"] {
            let file = path.join(name);
            if file.is_file() {
                return Ok((path.to_path_buf(), file));
            }
        }
        Err(tokenizer_error(
            path,
            "neither tokenizer.json nor tokenizer.model here",
        ))
    } else if path.is_file() {
        Ok((
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        ))
    } else {
        Err(tokenizer_error(path, "no such file or directory"))
    }
}

fn tokenizer_error(path: &Path, message: impl ToString) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| tokenizer_error(path, format!("invalid JSON: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::fixture;

    #[test]
    fn tokenizer_json_specials_come_from_tokenizer_config() {
        let tok = Tokenizer::from_path(&fixture("tokenizer")).unwrap();
        assert_eq!(tok.bos_ids(), &[1]);
        assert_eq!(tok.eos_ids(), &[2]);
        assert_eq!(tok.vocab_size(), 512);
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(4));
        // Each piece gets the Metaspace prefix: "\n" is "▁" + byte 0x0A.
        assert_eq!(tok.encode("\n").unwrap(), vec![316, 19]);
        let ids = tok.encode("Hello world").unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), "Hello world");
    }

    #[test]
    fn sentencepiece_model_is_loaded_when_there_is_no_tokenizer_json() {
        let tok = Tokenizer::from_path(&fixture("spm-bpe-tiny")).unwrap();
        assert_eq!(tok.bos_ids(), &[1]);
        assert_eq!(tok.eos_ids(), &[2]);
        assert_eq!(
            tok.encode("Hello world").unwrap(),
            vec![498, 81, 291, 333, 274, 435]
        );
        assert_eq!(tok.token_to_id("<|im_start|>"), Some(8));
    }

    #[test]
    fn qwen_tokenizers_have_no_bos() {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(
            fixture("tokenizer/tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"tokenizer_class": "Qwen2TokenizerFast", "bos_token": null, "eos_token": "<|im_end|>"}"#,
        )
        .unwrap();
        let tok = Tokenizer::from_path(dir.path()).unwrap();
        assert!(tok.bos_ids().is_empty());
        assert_eq!(tok.eos_ids(), &[4]);
    }

    #[test]
    fn missing_and_corrupt_tokenizers_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_path(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("neither tokenizer.json nor tokenizer.model"),
            "{err}"
        );
        fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let err = Tokenizer::from_path(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let spm = dir.path().join("tokenizer.model");
        fs::write(&spm, [0xff, 0xff, 0x01]).unwrap();
        assert!(Tokenizer::from_path(&spm).is_err());
        assert!(Tokenizer::from_path(&dir.path().join("nope")).is_err());
    }
}
