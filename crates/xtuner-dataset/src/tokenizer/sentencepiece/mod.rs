//! SentencePiece BPE `tokenizer.model` files, read and run in pure Rust.
//!
//! Real InternLM2 checkpoints (like Llama's) ship their vocabulary as a serialized
//! SentencePiece `ModelProto`: a protobuf listing every piece with its score and type,
//! plus the trainer's and the normalizer's settings. [`SentencePieceBpe`] reads that file
//! with `prost` and gives the ids that `SentencePieceProcessor::encode(text)` gives:
//!
//! 1. **Normalize** as the `normalizer_spec` says: an optional precompiled character map,
//!    a dummy `▁` in front, every space written as `▁`, extra spaces dropped only when
//!    `remove_extra_whitespaces` is set. User-defined pieces (`<|im_start|>`) pass through
//!    untouched.
//! 2. **Split** the normalized text into characters; an occurrence of a user-defined piece
//!    becomes one symbol that never merges with its neighbours.
//! 3. **Merge** neighbouring symbols, always the pair whose joined text is the vocabulary
//!    piece with the highest score (the leftmost pair on ties), until no neighbouring pair
//!    forms a piece. The candidate pairs wait in a heap over a linked list of symbols, so a
//!    text of n characters costs O(n log n), not O(n²).
//! 4. **Fall back:** a symbol still outside the vocabulary becomes its UTF-8 bytes as
//!    `<0xNN>` pieces when the model has `byte_fallback`, else `<unk>` (a run of unknown
//!    symbols gives a single `<unk>`).
//!
//! [`SentencePieceBpe::decode`] goes back: `▁` becomes a space, the dummy prefix's space is
//! dropped, runs of byte pieces are joined into UTF-8 (a byte that starts no valid
//! character becomes U+FFFD) and control pieces (`<s>`, `</s>`) vanish.
//!
//! The algorithm follows sentencepiece's `normalizer.cc`, `bpe_model.cc` and
//! `sentencepiece_processor.cc`; the golden ids in `shared/fixtures/spm-bpe-tiny` come from
//! the library itself. Where its versions differ on odd vocabularies this follows 0.2.3:
//! an UNUSED piece that no merge explains falls back like an unknown symbol, BPE never
//! outputs a control or byte piece, and merge scores compare in IEEE total order
//! (`-0.0 < 0.0`). Only BPE models are accepted: Unigram, word and char models give
//! [`SentencePieceError::UnsupportedModel`].

mod bpe;
mod normalizer;
mod proto;

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use prost::Message;

use self::bpe::Segment;
use self::normalizer::{Normalizer, PrefixTrie};

/// The meta symbol SentencePiece writes for a space (U+2581 LOWER ONE EIGHTH BLOCK).
const SPACE_SYMBOL: &str = "\u{2581}";
/// What `decode` writes for `<unk>` when the model names no `unk_surface`.
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";
/// `TrainerSpec.model_type` of a BPE model.
const MODEL_TYPE_BPE: i32 = 2;
/// sentencepiece refuses pieces of this many bytes or more.
const MAX_PIECE_LEN: usize = 8000;

/// Why a `tokenizer.model` file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SentencePieceError {
    /// The file could not be read.
    #[error("cannot read SentencePiece model {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The bytes are not a `ModelProto` (corrupt or truncated file).
    #[error("not a SentencePiece model (protobuf): {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// The model has no `trainer_spec`, so its type is unknown (usually a truncated file).
    #[error("SentencePiece model has no trainer_spec (truncated file?)")]
    MissingTrainerSpec,
    /// The model has no `normalizer_spec`. sentencepiece would fall back to defaults
    /// (extra whitespace removed), but every trained model has one, so its absence means
    /// a file cut short just before it.
    #[error("SentencePiece model has no normalizer_spec (truncated file?)")]
    MissingNormalizerSpec,
    /// The model is not BPE (Unigram, word or char models are not supported).
    #[error("SentencePiece model type {} is not supported, only BPE", model_type_name(*model_type))]
    UnsupportedModel {
        /// `TrainerSpec.model_type` as stored (1 Unigram, 2 BPE, 3 word, 4 char).
        model_type: i32,
    },
    /// The model holds no pieces.
    #[error("SentencePiece model has no pieces")]
    EmptyVocab,
    /// More pieces than `u32` ids can number.
    #[error("SentencePiece model has {count} pieces, more than u32 ids can number")]
    VocabTooLarge {
        /// Number of pieces.
        count: usize,
    },
    /// A piece has empty text.
    #[error("SentencePiece piece {id} is empty")]
    EmptyPiece {
        /// Its id.
        id: u32,
    },
    /// Two pieces of the same kind share one text.
    #[error("SentencePiece piece {id} {piece:?} is already piece {first}")]
    DuplicatePiece {
        /// The later id.
        id: u32,
        /// The text.
        piece: String,
        /// The earlier id.
        first: u32,
    },
    /// No piece has type `UNKNOWN` and there is no byte fallback.
    #[error("SentencePiece model has no <unk> piece (type UNKNOWN) and no byte_fallback")]
    MissingUnknown,
    /// A piece of 8000 bytes or more.
    #[error("SentencePiece piece {id} is {len} bytes long")]
    PieceTooLong {
        /// Its id.
        id: u32,
        /// Its length in bytes.
        len: usize,
    },
    /// A piece holding a NUL character (other than a lone `"\0"` piece, which is ignored).
    #[error("SentencePiece piece {id} holds a NUL character")]
    PieceWithNul {
        /// Its id.
        id: u32,
    },
    /// More than one piece has type `UNKNOWN`.
    #[error("SentencePiece pieces {first} and {second} are both of type UNKNOWN")]
    DuplicateUnknown {
        /// The first unknown piece.
        first: u32,
        /// The second one.
        second: u32,
    },
    /// A `BYTE` piece is not spelled `<0xNN>` (two upper-case hex digits).
    #[error("SentencePiece byte piece {id} {piece:?} is not of the form <0xNN>")]
    InvalidBytePiece {
        /// Its id.
        id: u32,
        /// Its text.
        piece: String,
    },
    /// A `BYTE` piece in a model without `byte_fallback`.
    #[error("SentencePiece byte piece {id} {piece:?} found although byte_fallback is off")]
    UnexpectedBytePiece {
        /// Its id.
        id: u32,
        /// Its text.
        piece: String,
    },
    /// `byte_fallback` is on but not all 256 byte pieces exist.
    #[error("SentencePiece model has byte_fallback but no piece <0x{byte:02X}>")]
    MissingBytePiece {
        /// The first missing byte.
        byte: u8,
    },
    /// The `precompiled_charsmap` of the normalizer is malformed.
    #[error("SentencePiece precompiled_charsmap is corrupt: {reason}")]
    CorruptCharsMap {
        /// What is wrong.
        reason: &'static str,
    },
}

fn model_type_name(model_type: i32) -> String {
    match model_type {
        1 => "UNIGRAM".to_string(),
        2 => "BPE".to_string(),
        3 => "WORD".to_string(),
        4 => "CHAR".to_string(),
        other => format!("{other} (unknown)"),
    }
}

/// What a piece is, from `SentencePiece.type` (unknown values count as normal, as the
/// C++ protobuf runtime keeps the default for enum values it does not know).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte(u8),
}

impl PieceKind {
    /// Whether BPE may form this piece by merging (`pieces_` in sentencepiece).
    fn is_mergeable(self) -> bool {
        matches!(
            self,
            PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused
        )
    }
}

#[derive(Clone, Debug)]
struct Piece {
    text: String,
    score: f32,
    kind: PieceKind,
}

/// A SentencePiece BPE model: vocabulary, normalizer and merge rules of a
/// `tokenizer.model` file.
///
/// Cheap to share across threads (`Send + Sync`, no interior state); every call works on
/// its own buffers.
#[derive(Clone)]
pub struct SentencePieceBpe {
    pieces: Vec<Piece>,
    /// Every piece's text → id (one map for all types, so texts are unique).
    ids: HashMap<String, u32, BuildHasherDefault<FxHasher>>,
    /// The id of `<0xNN>` for each byte, when the model has `byte_fallback`.
    byte_ids: Option<Box<[u32; 256]>>,
    user_defined: PrefixTrie,
    /// Longest text (bytes) of a piece merges may form; longer joins are not looked up.
    max_piece_len: usize,
    /// The `UNKNOWN` piece (optional when the model has `byte_fallback`).
    unk_id: Option<u32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    unk_surface: String,
    normalizer: Normalizer,
    denormalizer: Option<Normalizer>,
}

impl fmt::Debug for SentencePieceBpe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentencePieceBpe")
            .field("vocab_size", &self.pieces.len())
            .field("unk_id", &self.unk_id)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("byte_fallback", &self.byte_ids.is_some())
            .field("normalizer", &self.normalizer)
            .finish_non_exhaustive()
    }
}

impl SentencePieceBpe {
    /// Reads a `tokenizer.model` file.
    ///
    /// # Errors
    /// [`SentencePieceError::Io`] when the file cannot be read, else as
    /// [`from_bytes`](Self::from_bytes).
    pub fn from_file(path: &Path) -> Result<Self, SentencePieceError> {
        let bytes = std::fs::read(path).map_err(|source| SentencePieceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
    }

    /// Parses the bytes of a `tokenizer.model` file (a serialized `ModelProto`).
    ///
    /// # Errors
    /// Corrupt or truncated protobuf, a model that is not BPE, and the vocabulary defects
    /// sentencepiece itself refuses: empty, over-long, NUL-holding or duplicate pieces,
    /// two `<unk>` (or none without byte fallback), byte pieces that are malformed,
    /// missing, or present without `byte_fallback`, a malformed character map.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SentencePieceError> {
        let model = proto::ModelProto::decode(bytes)?;
        if model.pieces.is_empty() {
            return Err(SentencePieceError::EmptyVocab);
        }
        let trainer = model
            .trainer_spec
            .ok_or(SentencePieceError::MissingTrainerSpec)?;
        let model_type = trainer.model_type.unwrap_or(1);
        if model_type != MODEL_TYPE_BPE {
            return Err(SentencePieceError::UnsupportedModel { model_type });
        }
        let count = model.pieces.len();
        if u32::try_from(count).is_err() {
            return Err(SentencePieceError::VocabTooLarge { count });
        }
        let byte_fallback = trainer.byte_fallback.unwrap_or(false);

        let mut pieces = Vec::with_capacity(count);
        let mut ids = HashMap::with_capacity_and_hasher(count, BuildHasherDefault::default());
        let mut byte_slots: [Option<u32>; 256] = [None; 256];
        let mut user_defined = PrefixTrie::default();
        let mut unk_id = None;
        let mut max_piece_len = 0;
        for (id, raw) in (0u32..).zip(model.pieces) {
            let text = raw.piece.unwrap_or_default();
            if text.is_empty() {
                return Err(SentencePieceError::EmptyPiece { id });
            }
            if text.len() >= MAX_PIECE_LEN {
                return Err(SentencePieceError::PieceTooLong {
                    id,
                    len: text.len(),
                });
            }
            let mut kind = match raw.r#type.unwrap_or(1) {
                2 => PieceKind::Unknown,
                3 => PieceKind::Control,
                4 => PieceKind::UserDefined,
                5 => PieceKind::Unused,
                6 => PieceKind::Byte(0),
                _ => PieceKind::Normal,
            };
            // Conversion scripts sometimes add a raw "\0" piece; sentencepiece ignores it.
            if text == "\0" && (byte_fallback || kind == PieceKind::Unused) {
                pieces.push(Piece {
                    text,
                    score: 0.0,
                    kind: PieceKind::Unused,
                });
                continue;
            }
            if text.contains('\0') {
                return Err(SentencePieceError::PieceWithNul { id });
            }
            if let Some(&first) = ids.get(&text) {
                return Err(SentencePieceError::DuplicatePiece {
                    id,
                    piece: text,
                    first,
                });
            }
            match kind {
                PieceKind::UserDefined => user_defined.insert(text.as_bytes()),
                PieceKind::Unknown => {
                    if let Some(first) = unk_id {
                        return Err(SentencePieceError::DuplicateUnknown { first, second: id });
                    }
                    unk_id = Some(id);
                }
                PieceKind::Byte(_) => {
                    if !byte_fallback {
                        return Err(SentencePieceError::UnexpectedBytePiece { id, piece: text });
                    }
                    let Some(byte) = parse_byte_piece(&text) else {
                        return Err(SentencePieceError::InvalidBytePiece { id, piece: text });
                    };
                    byte_slots[usize::from(byte)] = Some(id);
                    kind = PieceKind::Byte(byte);
                }
                _ => {}
            }
            if kind.is_mergeable() {
                max_piece_len = max_piece_len.max(text.len());
            }
            ids.insert(text.clone(), id);
            pieces.push(Piece {
                text,
                score: raw.score.unwrap_or(0.0),
                kind,
            });
        }
        if unk_id.is_none() && !byte_fallback {
            return Err(SentencePieceError::MissingUnknown);
        }
        let byte_ids = if byte_fallback {
            let mut ids = Box::new([0u32; 256]);
            for ((slot, found), byte) in ids.iter_mut().zip(byte_slots).zip(0u8..=255) {
                *slot = found.ok_or(SentencePieceError::MissingBytePiece { byte })?;
            }
            Some(ids)
        } else {
            None
        };

        let normalizer = Normalizer::from_spec(
            model
                .normalizer_spec
                .ok_or(SentencePieceError::MissingNormalizerSpec)?,
            trainer.treat_whitespace_as_suffix.unwrap_or(false),
        )?;
        let denormalizer = match model.denormalizer_spec {
            Some(spec)
                if spec
                    .precompiled_charsmap
                    .as_ref()
                    .is_some_and(|m| !m.is_empty()) =>
            {
                Some(Normalizer::from_spec(spec, false)?)
            }
            _ => None,
        };

        let mut tokenizer = SentencePieceBpe {
            pieces,
            ids,
            byte_ids,
            user_defined,
            max_piece_len,
            unk_id,
            bos_id: None,
            eos_id: None,
            unk_surface: trainer
                .unk_surface
                .unwrap_or_else(|| DEFAULT_UNK_SURFACE.to_string()),
            normalizer,
            denormalizer,
        };
        // As `SentencePieceProcessor::bos_id()`: the id of the named piece, if it is a
        // control piece. A trainer_spec with `bos_id: -1` creates no `<s>`, so it is None.
        let control = |name: Option<String>, default: &str| {
            let name = name
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| default.to_string());
            tokenizer
                .piece_to_id(&name)
                .filter(|&id| tokenizer.kind(id) == Some(PieceKind::Control))
        };
        let bos_id = control(trainer.bos_piece, "<s>");
        let eos_id = control(trainer.eos_piece, "</s>");
        tokenizer.bos_id = bos_id;
        tokenizer.eos_id = eos_id;
        tracing::debug!(
            vocab_size = tokenizer.pieces.len(),
            byte_fallback,
            normalizer = ?tokenizer.normalizer,
            "SentencePiece BPE model loaded"
        );
        Ok(tokenizer)
    }

    /// Encodes text to ids as sentencepiece's `encode(text)` does (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let (_, tokens) = self.tokenize(text);
        tokens.into_iter().map(|t| t.id).collect()
    }

    /// Encodes text to ids with their pieces, as `encode(text, out_type=str)` spells
    /// them: vocabulary text for known and byte pieces, the normalized text itself for
    /// `<unk>`.
    pub fn encode_pieces(&self, text: &str) -> Vec<(u32, String)> {
        let (normalized, tokens) = self.tokenize(text);
        tokens
            .into_iter()
            .map(|t| {
                let piece = match self.kind(t.id) {
                    Some(PieceKind::Byte(_)) => self.id_to_piece(t.id).unwrap_or_default(),
                    _ => normalized.get(t.start..t.end).unwrap_or_default(),
                };
                (t.id, piece.to_string())
            })
            .collect()
    }

    /// Decodes ids to text as sentencepiece's `decode(ids)` does: `▁` becomes a space,
    /// the space of the dummy prefix is dropped, byte pieces are joined into UTF-8 (each
    /// byte that starts no valid character gives U+FFFD), control pieces give nothing and
    /// `<unk>` gives the model's `unk_surface` (`" ⁇ "`). Ids outside the vocabulary
    /// are skipped (sentencepiece refuses the whole call).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        let mut bytes = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        let strip_dummy =
            self.normalizer.add_dummy_prefix || self.normalizer.remove_extra_whitespaces;
        for &id in ids {
            let Some(piece) = self.id_to_piece(id) else {
                continue;
            };
            // sentencepiece decodes pieces, mapping each back through its text; only the
            // ignored "\0" piece has no id, and it is written as it is.
            let kind = self.piece_to_id(piece).and_then(|id| self.kind(id));
            if let Some(PieceKind::Byte(byte)) = kind {
                bytes.push(byte);
                continue;
            }
            push_utf8_lossy(&mut text, &bytes);
            bytes.clear();
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            match kind {
                Some(PieceKind::Control) => {}
                Some(PieceKind::Unknown) => text.push_str(&self.unk_surface),
                None => text.push_str(piece),
                Some(_) => {
                    let mut piece = piece;
                    if is_bos_ws
                        && strip_dummy
                        && let Some(rest) = piece.strip_prefix(SPACE_SYMBOL)
                    {
                        piece = rest;
                        // With remove_extra_whitespaces every leading space goes.
                        bos_ws_seen = !self.normalizer.remove_extra_whitespaces;
                    }
                    text.push_str(&piece.replace(SPACE_SYMBOL, " "));
                }
            }
        }
        push_utf8_lossy(&mut text, &bytes);
        match &self.denormalizer {
            Some(denormalizer) => denormalizer.normalize(&text, None),
            None => text,
        }
    }

    /// The text of a piece (`None` past the vocabulary).
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.piece(id).map(|p| p.text.as_str())
    }

    /// The id of a piece's exact text, of any type (`None` when absent; unlike
    /// sentencepiece, which answers `<unk>`'s id).
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// Number of pieces (ids run from 0 to `vocab_size() - 1`).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The id of `<s>` (the trainer's `bos_piece`), if the model has it as a control piece.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id of `</s>` (the trainer's `eos_piece`), if the model has it as a control piece.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// The id of the `UNKNOWN` piece (`<unk>`); only a model with byte fallback may lack
    /// one.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }

    /// Whether an id is a control piece (`<s>`, `</s>`) or a user-defined piece
    /// (`<|im_start|>`): the ids a chat template inserts rather than text produces.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.kind(id),
            Some(PieceKind::Control | PieceKind::UserDefined)
        )
    }

    fn piece(&self, id: u32) -> Option<&Piece> {
        self.pieces.get(usize::try_from(id).ok()?)
    }

    fn kind(&self, id: u32) -> Option<PieceKind> {
        self.piece(id).map(|p| p.kind)
    }

    /// Normalizes `text`, runs BPE and the unknown fallback
    /// (`PopulateSentencePieceText`); returns the normalized text and the tokens as
    /// spans of it.
    fn tokenize(&self, text: &str) -> (String, Vec<Token>) {
        let normalized = self.normalizer.normalize(text, Some(&self.user_defined));
        let segments = self.bpe(&normalized);
        let mut tokens = Vec::with_capacity(segments.len());
        let mut prev_unknown = false;
        for Segment { id, start, end } in segments {
            match (id, &self.byte_ids) {
                (Some(id), _) => tokens.push(Token { id, start, end }),
                (None, Some(byte_ids)) => {
                    let span = normalized.get(start..end).unwrap_or_default();
                    tokens.extend(span.bytes().map(|b| Token {
                        id: byte_ids[usize::from(b)],
                        start,
                        end,
                    }));
                }
                // A run of unknown symbols is one `<unk>`.
                (None, None) if prev_unknown => {
                    if let Some(last) = tokens.last_mut() {
                        last.end = end;
                    }
                }
                (None, None) => {
                    // Loading guarantees an `<unk>` when there is no byte fallback.
                    if let Some(unk) = self.unk_id {
                        tokens.push(Token {
                            id: unk,
                            start,
                            end,
                        });
                    }
                }
            }
            prev_unknown = id.is_none();
        }
        (normalized, tokens)
    }
}

/// An output id and its span in the normalized text.
#[derive(Clone, Copy, Debug)]
struct Token {
    id: u32,
    start: usize,
    end: usize,
}

/// The Fx hash (rustc's): a multiply-rotate over 8-byte words, several times faster than
/// SipHash on the short strings BPE looks up. The keys come from the model file, so
/// flooding resistance buys nothing here.
#[derive(Clone, Copy, Default)]
struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, byte: u8) {
        self.add(u64::from(byte));
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// The byte of a piece spelled exactly `<0xNN>` with upper-case hex digits.
fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    let upper = hex.len() == 2
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    if upper {
        u8::from_str_radix(hex, 16).ok()
    } else {
        None
    }
}

/// Appends bytes as UTF-8, one U+FFFD for each byte that starts no valid character (as
/// sentencepiece's decoder does; `String::from_utf8_lossy` would merge some of them).
fn push_utf8_lossy(out: &mut String, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match std::str::from_utf8(bytes) {
            Ok(valid) => {
                out.push_str(valid);
                return;
            }
            Err(error) => {
                let (valid, rest) = bytes.split_at(error.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                out.push('\u{FFFD}');
                bytes = rest.get(1..).unwrap_or_default();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(file: &str) -> std::path::PathBuf {
        crate::test_support::fixture("spm-bpe-tiny").join(file)
    }

    fn model_bytes() -> Vec<u8> {
        std::fs::read(fixture("tokenizer.model")).unwrap()
    }

    pub(super) fn tiny() -> SentencePieceBpe {
        SentencePieceBpe::from_file(&fixture("tokenizer.model")).unwrap()
    }

    fn golden() -> serde_json::Value {
        let text = std::fs::read_to_string(fixture("golden.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn every_golden_case_matches_sentencepiece() {
        let spm = tiny();
        let golden = golden();
        let cases = golden["cases"].as_array().unwrap();
        assert!(!cases.is_empty());
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let pieces: Vec<&str> = case["pieces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(spm.encode(text), ids, "ids of {text:?}");
            let got = spm.encode_pieces(text);
            assert_eq!(
                got.iter().map(|p| p.0).collect::<Vec<_>>(),
                ids,
                "ids of {text:?}"
            );
            assert_eq!(
                got.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(),
                pieces,
                "{text:?}"
            );
            assert_eq!(
                spm.decode(&ids),
                case["decoded"].as_str().unwrap(),
                "decode of {text:?}"
            );
        }
    }

    #[test]
    fn special_ids_match_golden() {
        let spm = tiny();
        let golden = golden();
        assert_eq!(
            spm.vocab_size() as u64,
            golden["vocab_size"].as_u64().unwrap()
        );
        assert_eq!(spm.bos_id().map(u64::from), golden["bos_id"].as_u64());
        assert_eq!(spm.eos_id().map(u64::from), golden["eos_id"].as_u64());
        assert_eq!(spm.unk_id().map(u64::from), golden["unk_id"].as_u64());
        for (piece, id) in golden["special_pieces"].as_object().unwrap() {
            let id = id.as_u64().unwrap() as u32;
            assert_eq!(spm.piece_to_id(piece), Some(id), "{piece}");
            assert_eq!(spm.id_to_piece(id), Some(piece.as_str()));
            assert!(spm.is_special(id), "{piece}");
        }
        assert!(spm.is_special(1) && spm.is_special(2));
        assert!(!spm.is_special(0) && !spm.is_special(19) && !spm.is_special(265));
        assert!(!spm.is_special(u32::MAX));
        assert_eq!(spm.id_to_piece(spm.vocab_size() as u32), None);
        assert_eq!(spm.piece_to_id("no such piece"), None);
    }

    #[test]
    fn decode_handles_control_unknown_and_broken_bytes() {
        let spm = tiny();
        let hello = spm.encode("Hello world");
        // BOS and EOS vanish; the dummy-prefix space after BOS is still dropped.
        let with_specials = [&[1][..], &hello, &[2]].concat();
        assert_eq!(spm.decode(&with_specials), "Hello world");
        assert_eq!(spm.decode(&[0]), " \u{2047} ");
        // 0xF0 0x9F without the rest of the emoji: two replacement characters.
        let f0 = spm.piece_to_id("<0xF0>").unwrap();
        let x9f = spm.piece_to_id("<0x9F>").unwrap();
        let a = spm.piece_to_id("<0x61>").unwrap();
        assert_eq!(spm.decode(&[f0, x9f, a]), "\u{FFFD}\u{FFFD}a");
        // Out-of-vocabulary ids are skipped.
        assert_eq!(spm.decode(&[u32::MAX, a]), "a");
        assert_eq!(spm.decode(&[]), "");
    }

    #[test]
    fn truncated_and_corrupt_files_are_errors() {
        let bytes = model_bytes();
        // Every cut: either a protobuf error or a model missing its specs or pieces.
        for len in 0..bytes.len() {
            assert!(
                SentencePieceBpe::from_bytes(&bytes[..len]).is_err(),
                "cut at {len}"
            );
        }
        assert!(SentencePieceBpe::from_bytes(&[0xff; 64]).is_err());
        assert!(SentencePieceBpe::from_bytes(b"not a model at all").is_err());
        let missing = SentencePieceBpe::from_file(Path::new("/nonexistent/tokenizer.model"));
        assert!(matches!(missing, Err(SentencePieceError::Io { .. })));
    }

    /// The fixture with one edit applied to its decoded protobuf.
    pub(super) fn edited(
        edit: impl FnOnce(&mut proto::ModelProto),
    ) -> Result<SentencePieceBpe, SentencePieceError> {
        let mut model = proto::ModelProto::decode(model_bytes().as_slice()).unwrap();
        edit(&mut model);
        SentencePieceBpe::from_bytes(&model.encode_to_vec())
    }

    #[test]
    fn non_bpe_models_are_rejected() {
        let unigram = edited(|m| m.trainer_spec.as_mut().unwrap().model_type = Some(1));
        assert!(matches!(
            unigram,
            Err(SentencePieceError::UnsupportedModel { model_type: 1 })
        ));
        let err = unigram.unwrap_err().to_string();
        assert!(err.contains("UNIGRAM"), "{err}");
        let default_type = edited(|m| m.trainer_spec.as_mut().unwrap().model_type = None);
        assert!(matches!(
            default_type,
            Err(SentencePieceError::UnsupportedModel { .. })
        ));
    }

    #[test]
    fn vocabulary_defects_are_errors() {
        let no_fallback = edited(|m| m.trainer_spec.as_mut().unwrap().byte_fallback = Some(false));
        assert!(matches!(
            no_fallback,
            Err(SentencePieceError::UnexpectedBytePiece { .. })
        ));
        let missing_byte = edited(|m| m.pieces[9].r#type = Some(1));
        assert!(matches!(
            missing_byte,
            Err(SentencePieceError::MissingBytePiece { byte: 0 })
        ));
        let duplicate = edited(|m| m.pieces[300].piece = Some("▁a".into()));
        assert!(matches!(
            duplicate,
            Err(SentencePieceError::DuplicatePiece { first: 265, .. })
        ));
        let no_unk = edited(|m| {
            m.pieces[0].r#type = Some(3);
            m.trainer_spec.as_mut().unwrap().byte_fallback = Some(false);
            for piece in m.pieces.iter_mut().filter(|p| p.r#type == Some(6)) {
                piece.r#type = Some(1);
            }
        });
        assert!(matches!(no_unk, Err(SentencePieceError::MissingUnknown)));
        let clash = edited(|m| m.pieces[300].piece = Some("<s>".into()));
        assert!(matches!(
            clash,
            Err(SentencePieceError::DuplicatePiece { first: 1, .. })
        ));
        let nul = edited(|m| m.pieces[300].piece = Some("a\0b".into()));
        assert!(matches!(
            nul,
            Err(SentencePieceError::PieceWithNul { id: 300 })
        ));
        let empty = edited(|m| m.pieces[400].piece = Some(String::new()));
        assert!(matches!(
            empty,
            Err(SentencePieceError::EmptyPiece { id: 400 })
        ));
        let bad_map = edited(|m| {
            m.normalizer_spec.as_mut().unwrap().precompiled_charsmap = Some(vec![9, 0, 0, 0, 1])
        });
        assert!(matches!(
            bad_map,
            Err(SentencePieceError::CorruptCharsMap { .. })
        ));
    }

    #[test]
    fn byte_fallback_models_may_lack_unk_and_ignore_a_nul_piece() {
        // sentencepiece 0.2.3 loads both; ids and decodes below are what it gives.
        let no_unk = edited(|m| m.pieces[0].r#type = Some(3)).unwrap();
        assert_eq!(no_unk.unk_id(), None);
        assert_eq!(
            no_unk.encode("Hello wörld"),
            [498, 81, 291, 333, 274, 204, 191, 505, 332]
        );
        assert_eq!(no_unk.decode(&[0, 100]), "[");
        let nul = edited(|m| m.pieces[300].piece = Some("\0".into())).unwrap();
        assert_eq!(nul.decode(&[300, 100]), "\0[");
        assert_eq!(nul.piece_to_id("\0"), None);
    }
}
