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

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use prost::Message;

/// The meta symbol SentencePiece writes for a space (U+2581 LOWER ONE EIGHTH BLOCK).
const SPACE_SYMBOL: &str = "\u{2581}";
/// What `decode` writes for `<unk>` when the model names no `unk_surface`.
const DEFAULT_UNK_SURFACE: &str = " \u{2047} ";
/// `TrainerSpec.model_type` of a BPE model.
const MODEL_TYPE_BPE: i32 = 2;
/// sentencepiece refuses pieces of this many bytes or more.
const MAX_PIECE_LEN: usize = 8000;
/// How deep an UNUSED piece is split back into the pieces that formed it.
const MAX_RESEGMENT_DEPTH: usize = 100;

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

/// The fields of `sentencepiece_model.proto` this loader reads; prost skips the rest.
mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<SentencePiece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
        #[prost(message, optional, tag = "5")]
        pub denormalizer_spec: Option<NormalizerSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct SentencePiece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        /// An enum on the wire; read as a plain varint so unknown values cannot fail.
        #[prost(int32, optional, tag = "3")]
        pub r#type: Option<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct TrainerSpec {
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(int32, optional, tag = "4")]
        pub vocab_size: Option<i32>,
        #[prost(bool, optional, tag = "24")]
        pub treat_whitespace_as_suffix: Option<bool>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
        #[prost(int32, optional, tag = "40")]
        pub unk_id: Option<i32>,
        #[prost(int32, optional, tag = "41")]
        pub bos_id: Option<i32>,
        #[prost(int32, optional, tag = "42")]
        pub eos_id: Option<i32>,
        #[prost(int32, optional, tag = "43")]
        pub pad_id: Option<i32>,
        #[prost(string, optional, tag = "44")]
        pub unk_surface: Option<String>,
        #[prost(string, optional, tag = "45")]
        pub unk_piece: Option<String>,
        #[prost(string, optional, tag = "46")]
        pub bos_piece: Option<String>,
        #[prost(string, optional, tag = "47")]
        pub eos_piece: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct NormalizerSpec {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(bytes = "vec", optional, tag = "2")]
        pub precompiled_charsmap: Option<Vec<u8>>,
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub remove_extra_whitespaces: Option<bool>,
        #[prost(bool, optional, tag = "5")]
        pub escape_whitespaces: Option<bool>,
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
        matches!(self, PieceKind::Normal | PieceKind::UserDefined | PieceKind::Unused)
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
        let bytes = std::fs::read(path)
            .map_err(|source| SentencePieceError::Io { path: path.to_path_buf(), source })?;
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
        let trainer = model.trainer_spec.ok_or(SentencePieceError::MissingTrainerSpec)?;
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
                return Err(SentencePieceError::PieceTooLong { id, len: text.len() });
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
                pieces.push(Piece { text, score: 0.0, kind: PieceKind::Unused });
                continue;
            }
            if text.contains('\0') {
                return Err(SentencePieceError::PieceWithNul { id });
            }
            if let Some(&first) = ids.get(&text) {
                return Err(SentencePieceError::DuplicatePiece { id, piece: text, first });
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
            pieces.push(Piece { text, score: raw.score.unwrap_or(0.0), kind });
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
            model.normalizer_spec.ok_or(SentencePieceError::MissingNormalizerSpec)?,
            trainer.treat_whitespace_as_suffix.unwrap_or(false),
        )?;
        let denormalizer = match model.denormalizer_spec {
            Some(spec) if spec.precompiled_charsmap.as_ref().is_some_and(|m| !m.is_empty()) => {
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
            unk_surface: trainer.unk_surface.unwrap_or_else(|| DEFAULT_UNK_SURFACE.to_string()),
            normalizer,
            denormalizer,
        };
        // As `SentencePieceProcessor::bos_id()`: the id of the named piece, if it is a
        // control piece. A trainer_spec with `bos_id: -1` creates no `<s>`, so it is None.
        let control = |name: Option<String>, default: &str| {
            let name = name.filter(|n| !n.is_empty()).unwrap_or_else(|| default.to_string());
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
            let Some(piece) = self.id_to_piece(id) else { continue };
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
        matches!(self.kind(id), Some(PieceKind::Control | PieceKind::UserDefined))
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
                        tokens.push(Token { id: unk, start, end });
                    }
                }
            }
            prev_unknown = id.is_none();
        }
        (normalized, tokens)
    }

    /// Splits normalized text into characters (user-defined pieces whole and frozen) and
    /// merges them best-score-first, as `bpe::Model::SampleEncode` without dropout.
    fn bpe(&self, normalized: &str) -> Vec<Segment> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(normalized.len());
        let mut pos = 0;
        while let Some(rest) = normalized.get(pos..).filter(|r| !r.is_empty()) {
            let (len, frozen) = match self.user_defined.longest_match(rest.as_bytes()) {
                Some(len) if rest.is_char_boundary(len) => (len, true),
                _ => (rest.chars().next().map_or(rest.len(), char::len_utf8), false),
            };
            let index = symbols.len();
            symbols.push(Symbol {
                start: pos,
                len,
                prev: index.checked_sub(1),
                next: Some(index + 1).filter(|_| pos + len < normalized.len()),
                frozen,
            });
            pos += len;
        }

        let mut merges = Merges { heap: BinaryHeap::new(), unused_splits: HashMap::new() };
        for right in 1..symbols.len() {
            self.push_pair(normalized, &symbols, Some(right - 1), Some(right), &mut merges);
        }
        while let Some(top) = merges.heap.pop() {
            let (Some(&left), Some(&right)) = (symbols.get(top.left), symbols.get(top.right))
            else {
                continue;
            };
            // Stale: one side was merged away or grew since this pair was queued.
            if left.len == 0 || right.len == 0 || left.len + right.len != top.len {
                continue;
            }
            if let Some(next) = right.next.and_then(|n| symbols.get_mut(n)) {
                next.prev = Some(top.left);
            }
            if let Some(s) = symbols.get_mut(top.right) {
                s.len = 0;
            }
            if let Some(s) = symbols.get_mut(top.left) {
                s.len = top.len;
                s.next = right.next;
            }
            self.push_pair(normalized, &symbols, left.prev, Some(top.left), &mut merges);
            self.push_pair(normalized, &symbols, Some(top.left), right.next, &mut merges);
        }

        // Walk the surviving symbols. An UNUSED piece is split back into the two symbols
        // that formed it, recursively (at most MAX_RESEGMENT_DEPTH deep, as the C++).
        let mut segments = Vec::with_capacity(symbols.len());
        let mut stack = Vec::new();
        let mut cursor = if symbols.is_empty() { None } else { Some(0) };
        while let Some(symbol) = cursor.and_then(|i| symbols.get(i)) {
            stack.push((symbol.start, symbol.len, 0));
            while let Some((start, len, depth)) = stack.pop() {
                let text = normalized.get(start..start + len).unwrap_or_default();
                let found = self.piece_to_id(text).and_then(|id| Some((id, self.kind(id)?)));
                let id = match found {
                    Some((id, PieceKind::Unused)) if depth > MAX_RESEGMENT_DEPTH => Some(id),
                    Some((_, PieceKind::Unused)) => match merges.unused_splits.get(text) {
                        Some(&left_len) => {
                            stack.push((start + left_len, len - left_len, depth + 1));
                            stack.push((start, left_len, depth + 1));
                            continue;
                        }
                        None => None,
                    },
                    Some((id, kind)) if kind.is_mergeable() => Some(id),
                    // Not in the vocabulary, or a control/unknown/byte piece.
                    _ => None,
                };
                segments.push(Segment { id, start, end: start + len });
            }
            cursor = symbol.next;
        }
        segments
    }

    /// Queues the merge of two neighbouring symbols if their joined text is a piece.
    fn push_pair<'a>(
        &self,
        normalized: &'a str,
        symbols: &[Symbol],
        left: Option<usize>,
        right: Option<usize>,
        merges: &mut Merges<'a>,
    ) {
        let (Some(left), Some(right)) = (left, right) else { return };
        let (Some(l), Some(r)) = (symbols.get(left), symbols.get(right)) else { return };
        if l.frozen || r.frozen {
            return;
        }
        let len = l.len + r.len;
        if len > self.max_piece_len {
            return;
        }
        let Some(text) = normalized.get(l.start..l.start + len) else { return };
        let Some(piece) = self.piece_to_id(text).and_then(|id| self.piece(id)) else {
            return;
        };
        if !piece.kind.is_mergeable() {
            return;
        }
        merges.heap.push(Candidate { score: piece.score, left, right, len });
        if piece.kind == PieceKind::Unused {
            // As the C++: the split of the last queued pair with this text wins.
            merges.unused_splits.insert(text, l.len);
        }
    }
}

/// A span of the normalized text and its piece; `None` for an unknown symbol.
#[derive(Clone, Copy, Debug)]
struct Segment {
    id: Option<u32>,
    start: usize,
    end: usize,
}

/// An output id and its span in the normalized text.
#[derive(Clone, Copy, Debug)]
struct Token {
    id: u32,
    start: usize,
    end: usize,
}

/// One node of the doubly linked list of symbols the merge loop works on.
#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    /// A user-defined piece: never merged.
    frozen: bool,
}

/// The state of one merge run.
struct Merges<'a> {
    heap: BinaryHeap<Candidate>,
    /// Text of an UNUSED piece formed by a merge → byte length of its left part.
    unused_splits: HashMap<&'a str, usize>,
}

/// A queued merge of symbols `left` and `right` whose joined text has `len` bytes.
#[derive(Clone, Copy, Debug)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Candidate {
    /// Higher score first, then the leftmost pair. Scores compare in IEEE total order,
    /// as sentencepiece 0.2.3 does by comparing their bit patterns (so -0.0 < 0.0).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

/// `NormalizerSpec`, ready to run (proto defaults applied).
#[derive(Clone)]
struct Normalizer {
    name: String,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
    charsmap: Option<CharsMap>,
}

impl fmt::Debug for Normalizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Normalizer")
            .field("name", &self.name)
            .field("add_dummy_prefix", &self.add_dummy_prefix)
            .field("remove_extra_whitespaces", &self.remove_extra_whitespaces)
            .field("escape_whitespaces", &self.escape_whitespaces)
            .field("treat_whitespace_as_suffix", &self.treat_whitespace_as_suffix)
            .field("charsmap", &self.charsmap.is_some())
            .finish()
    }
}

impl Normalizer {
    fn from_spec(
        spec: proto::NormalizerSpec,
        treat_whitespace_as_suffix: bool,
    ) -> Result<Self, SentencePieceError> {
        let charsmap = match spec.precompiled_charsmap {
            Some(blob) if !blob.is_empty() => Some(CharsMap::parse(&blob)?),
            _ => None,
        };
        Ok(Normalizer {
            name: spec.name.unwrap_or_default(),
            add_dummy_prefix: spec.add_dummy_prefix.unwrap_or(true),
            remove_extra_whitespaces: spec.remove_extra_whitespaces.unwrap_or(true),
            escape_whitespaces: spec.escape_whitespaces.unwrap_or(true),
            treat_whitespace_as_suffix,
            charsmap,
        })
    }

    /// `Normalizer::Normalize`: the text the BPE model sees.
    fn normalize(&self, input: &str, user_defined: Option<&PrefixTrie>) -> String {
        let mut out = String::with_capacity(input.len() + input.len() / 2 + 3);
        let mut rest = input;
        if self.remove_extra_whitespaces {
            while !rest.is_empty() {
                let (piece, consumed) = self.normalize_prefix(rest, user_defined);
                if piece != " " {
                    break;
                }
                rest = rest.get(consumed..).unwrap_or_default();
            }
        }
        if rest.is_empty() {
            return out;
        }
        let space = if self.escape_whitespaces { SPACE_SYMBOL } else { " " };
        if self.add_dummy_prefix && !self.treat_whitespace_as_suffix {
            out.push_str(space);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        while !rest.is_empty() {
            let (mut piece, consumed) = self.normalize_prefix(rest, user_defined);
            if is_prev_space {
                piece = piece.trim_start_matches(' ');
            }
            if !piece.is_empty() {
                if self.escape_whitespaces {
                    for c in piece.chars() {
                        match c {
                            ' ' => out.push_str(SPACE_SYMBOL),
                            c => out.push(c),
                        }
                    }
                } else {
                    out.push_str(piece);
                }
                is_prev_space = piece.ends_with(' ');
            }
            rest = rest.get(consumed..).unwrap_or_default();
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while let Some(stripped) = out.strip_suffix(space) {
                out.truncate(stripped.len());
            }
        }
        if self.add_dummy_prefix && self.treat_whitespace_as_suffix {
            out.push_str(space);
        }
        out
    }

    /// `Normalizer::NormalizePrefix`: the normalized form of the start of `input` and how
    /// many bytes of it that consumed. A user-defined piece is kept as it is; else the
    /// longest rule of the character map; else one character unchanged.
    fn normalize_prefix<'a>(
        &'a self,
        input: &'a str,
        user_defined: Option<&PrefixTrie>,
    ) -> (&'a str, usize) {
        if let Some(len) = user_defined.and_then(|t| t.longest_match(input.as_bytes()))
            && let Some(piece) = input.get(..len)
        {
            return (piece, len);
        }
        if let Some((len, replacement)) = self.charsmap.as_ref().and_then(|m| m.rule(input)) {
            return (replacement, len);
        }
        let len = input.chars().next().map_or(input.len(), char::len_utf8);
        (input.get(..len).unwrap_or_default(), len)
    }
}

/// A `precompiled_charsmap`: a darts-clone double-array trie over input bytes whose
/// values are offsets of NUL-terminated replacements in a string pool.
#[derive(Clone)]
struct CharsMap {
    units: Vec<u32>,
    pool: Vec<u8>,
}

impl CharsMap {
    /// Layout: little-endian `u32` trie size in bytes, the trie units, the string pool
    /// (NUL-terminated replacements). Checked as `DecodePrecompiledCharsMap` checks it.
    fn parse(blob: &[u8]) -> Result<Self, SentencePieceError> {
        let corrupt = |reason| SentencePieceError::CorruptCharsMap { reason };
        let Some((size, rest)) = blob.split_first_chunk::<4>().filter(|(_, r)| !r.is_empty())
        else {
            return Err(corrupt("shorter than its header"));
        };
        let trie_size = usize::try_from(u32::from_le_bytes(*size))
            .map_err(|_| corrupt("trie size does not fit in memory"))?;
        if trie_size >= rest.len() {
            return Err(corrupt("trie size exceeds the blob"));
        }
        if trie_size < 1024 || !trie_size.is_multiple_of(1024) {
            return Err(corrupt("trie size is not a multiple of 1024"));
        }
        let (trie, pool) = rest.split_at(trie_size);
        if pool.last() != Some(&0) {
            return Err(corrupt("replacement strings are not NUL-terminated"));
        }
        let units =
            trie.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(CharsMap { units, pool: pool.to_vec() })
    }

    /// The longest rule matching a prefix of `input` that ends on a character boundary:
    /// (bytes matched, replacement). A replacement that is not UTF-8 reads as U+FFFD.
    fn rule(&self, input: &str) -> Option<(usize, &str)> {
        let label = |unit: u32| unit & ((1 << 31) | 0xFF);
        let offset = |unit: u32| -> usize {
            let shifted = (unit >> 10) << ((unit & (1 << 9)) >> 6);
            usize::try_from(shifted).unwrap_or(usize::MAX)
        };
        let has_leaf = |unit: u32| (unit >> 8) & 1 == 1;
        let value = |unit: u32| usize::try_from(unit & ((1 << 31) - 1)).unwrap_or(usize::MAX);

        let mut best = None;
        let mut node = offset(*self.units.first()?);
        for (i, byte) in input.bytes().enumerate() {
            node ^= usize::from(byte);
            let Some(&unit) = self.units.get(node) else { break };
            if label(unit) != u32::from(byte) {
                break;
            }
            node ^= offset(unit);
            // A rule ending inside a character is skipped (sentencepiece would apply it
            // and then see broken UTF-8; maps built from code points have none).
            if has_leaf(unit)
                && input.is_char_boundary(i + 1)
                && let Some(&leaf) = self.units.get(node)
            {
                best = Some((i + 1, value(leaf)));
            }
        }
        let (len, at) = best?;
        let tail = self.pool.get(at..)?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let replacement = tail.get(..end).and_then(|r| std::str::from_utf8(r).ok());
        Some((len, replacement.unwrap_or("\u{FFFD}")))
    }
}

/// A byte trie over the user-defined pieces, for the longest one starting a text.
#[derive(Clone, Debug, Default)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Clone, Debug, Default)]
struct TrieNode {
    /// (byte, child index), sorted by byte.
    children: Vec<(u8, usize)>,
    terminal: bool,
}

impl PrefixTrie {
    fn insert(&mut self, key: &[u8]) {
        if key.is_empty() {
            return;
        }
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut node = 0;
        for &byte in key {
            let next_index = self.nodes.len();
            let Some(current) = self.nodes.get_mut(node) else { return };
            node = match current.children.binary_search_by_key(&byte, |c| c.0) {
                Ok(k) => current.children.get(k).map_or(next_index, |c| c.1),
                Err(k) => {
                    current.children.insert(k, (byte, next_index));
                    self.nodes.push(TrieNode::default());
                    next_index
                }
            };
        }
        if let Some(last) = self.nodes.get_mut(node) {
            last.terminal = true;
        }
    }

    /// Byte length of the longest key that `text` starts with.
    fn longest_match(&self, text: &[u8]) -> Option<usize> {
        let mut node = self.nodes.first()?;
        let mut best = None;
        for (i, byte) in text.iter().enumerate() {
            let Ok(k) = node.children.binary_search_by_key(byte, |c| c.0) else { break };
            let Some(child) = node.children.get(k).and_then(|c| self.nodes.get(c.1)) else {
                break;
            };
            node = child;
            if node.terminal {
                best = Some(i + 1);
            }
        }
        best
    }
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
    let upper =
        hex.len() == 2 && hex.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b));
    if upper { u8::from_str_radix(hex, 16).ok() } else { None }
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

    const FIXTURE: &str =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures/spm-bpe-tiny");

    fn model_bytes() -> Vec<u8> {
        std::fs::read(format!("{FIXTURE}/tokenizer.model")).unwrap()
    }

    fn tiny() -> SentencePieceBpe {
        SentencePieceBpe::from_file(Path::new(&format!("{FIXTURE}/tokenizer.model"))).unwrap()
    }

    fn golden() -> serde_json::Value {
        let text = std::fs::read_to_string(format!("{FIXTURE}/golden.json")).unwrap();
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
            let pieces: Vec<&str> =
                case["pieces"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(spm.encode(text), ids, "ids of {text:?}");
            let got = spm.encode_pieces(text);
            assert_eq!(got.iter().map(|p| p.0).collect::<Vec<_>>(), ids, "ids of {text:?}");
            assert_eq!(got.iter().map(|p| p.1.as_str()).collect::<Vec<_>>(), pieces, "{text:?}");
            assert_eq!(spm.decode(&ids), case["decoded"].as_str().unwrap(), "decode of {text:?}");
        }
    }

    #[test]
    fn special_ids_match_golden() {
        let spm = tiny();
        let golden = golden();
        assert_eq!(spm.vocab_size() as u64, golden["vocab_size"].as_u64().unwrap());
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
            assert!(SentencePieceBpe::from_bytes(&bytes[..len]).is_err(), "cut at {len}");
        }
        assert!(SentencePieceBpe::from_bytes(&[0xff; 64]).is_err());
        assert!(SentencePieceBpe::from_bytes(b"not a model at all").is_err());
        let missing = SentencePieceBpe::from_file(Path::new("/nonexistent/tokenizer.model"));
        assert!(matches!(missing, Err(SentencePieceError::Io { .. })));
    }

    /// The fixture with one edit applied to its decoded protobuf.
    fn edited(
        edit: impl FnOnce(&mut proto::ModelProto),
    ) -> Result<SentencePieceBpe, SentencePieceError> {
        let mut model = proto::ModelProto::decode(model_bytes().as_slice()).unwrap();
        edit(&mut model);
        SentencePieceBpe::from_bytes(&model.encode_to_vec())
    }

    #[test]
    fn non_bpe_models_are_rejected() {
        let unigram = edited(|m| m.trainer_spec.as_mut().unwrap().model_type = Some(1));
        assert!(matches!(unigram, Err(SentencePieceError::UnsupportedModel { model_type: 1 })));
        let err = unigram.unwrap_err().to_string();
        assert!(err.contains("UNIGRAM"), "{err}");
        let default_type = edited(|m| m.trainer_spec.as_mut().unwrap().model_type = None);
        assert!(matches!(default_type, Err(SentencePieceError::UnsupportedModel { .. })));
    }

    #[test]
    fn vocabulary_defects_are_errors() {
        let no_fallback = edited(|m| m.trainer_spec.as_mut().unwrap().byte_fallback = Some(false));
        assert!(matches!(no_fallback, Err(SentencePieceError::UnexpectedBytePiece { .. })));
        let missing_byte = edited(|m| m.pieces[9].r#type = Some(1));
        assert!(matches!(missing_byte, Err(SentencePieceError::MissingBytePiece { byte: 0 })));
        let duplicate = edited(|m| m.pieces[300].piece = Some("▁a".into()));
        assert!(matches!(duplicate, Err(SentencePieceError::DuplicatePiece { first: 265, .. })));
        let no_unk = edited(|m| {
            m.pieces[0].r#type = Some(3);
            m.trainer_spec.as_mut().unwrap().byte_fallback = Some(false);
            for piece in m.pieces.iter_mut().filter(|p| p.r#type == Some(6)) {
                piece.r#type = Some(1);
            }
        });
        assert!(matches!(no_unk, Err(SentencePieceError::MissingUnknown)));
        let clash = edited(|m| m.pieces[300].piece = Some("<s>".into()));
        assert!(matches!(clash, Err(SentencePieceError::DuplicatePiece { first: 1, .. })));
        let nul = edited(|m| m.pieces[300].piece = Some("a\0b".into()));
        assert!(matches!(nul, Err(SentencePieceError::PieceWithNul { id: 300 })));
        let empty = edited(|m| m.pieces[400].piece = Some(String::new()));
        assert!(matches!(empty, Err(SentencePieceError::EmptyPiece { id: 400 })));
        let bad_map = edited(|m| {
            m.normalizer_spec.as_mut().unwrap().precompiled_charsmap = Some(vec![9, 0, 0, 0, 1])
        });
        assert!(matches!(bad_map, Err(SentencePieceError::CorruptCharsMap { .. })));
    }

    #[test]
    fn byte_fallback_models_may_lack_unk_and_ignore_a_nul_piece() {
        // sentencepiece 0.2.3 loads both; ids and decodes below are what it gives.
        let no_unk = edited(|m| m.pieces[0].r#type = Some(3)).unwrap();
        assert_eq!(no_unk.unk_id(), None);
        assert_eq!(no_unk.encode("Hello wörld"), [498, 81, 291, 333, 274, 204, 191, 505, 332]);
        assert_eq!(no_unk.decode(&[0, 100]), "[");
        let nul = edited(|m| m.pieces[300].piece = Some("\0".into())).unwrap();
        assert_eq!(nul.decode(&[300, 100]), "\0[");
        assert_eq!(nul.piece_to_id("\0"), None);
    }

    #[test]
    fn normalizer_flags_are_honoured() {
        // Pieces from sentencepiece 0.2.3 on the fixture with the same normalizer_spec edits.
        let collapse =
            edited(|m| m.normalizer_spec.as_mut().unwrap().remove_extra_whitespaces = Some(true))
                .unwrap();
        let pieces: Vec<String> =
            collapse.encode_pieces("  two  spaces ").into_iter().map(|p| p.1).collect();
        assert_eq!(pieces, ["▁t", "w", "o", "▁s", "p", "a", "ces"]);
        assert_eq!(collapse.encode("  two  spaces "), collapse.encode("two spaces"));
        assert_eq!(collapse.encode("   "), Vec::<u32>::new());
        let no_prefix =
            edited(|m| m.normalizer_spec.as_mut().unwrap().add_dummy_prefix = Some(false)).unwrap();
        let pieces: Vec<String> = no_prefix.encode_pieces("a b").into_iter().map(|p| p.1).collect();
        assert_eq!(pieces, ["a", "▁b"]);
        assert_eq!(no_prefix.decode(&no_prefix.encode(" a")), " a");
    }

    /// A precompiled charsmap as sentencepiece's builder lays it out: 256 double-array
    /// units (free ones linked as `i ^ 1`) with the given used units, then the pool.
    fn charsmap(used: &[(usize, u32)], pool: &[u8]) -> Vec<u8> {
        let mut units: Vec<u32> = (0..256u32).map(|i| i ^ 1).collect();
        for &(i, unit) in used {
            units[i] = unit;
        }
        let mut blob = 1024u32.to_le_bytes().to_vec();
        blob.extend(units.iter().flat_map(|u| u.to_le_bytes()));
        blob.extend_from_slice(pool);
        blob
    }

    #[test]
    fn precompiled_charsmaps_normalize_and_denormalize() {
        // Built by sentencepiece from the rules "ab" → "AB" (normalizer) and "A" → "a",
        // "BC" → "xyz", "あ" → "A B" (denormalizer); ids from sentencepiece 0.2.3.
        let spm = edited(|m| {
            let rules = [(0, 98304), (1, 98401), (2, 2147483648), (3, 1378)];
            m.normalizer_spec.as_mut().unwrap().precompiled_charsmap =
                Some(charsmap(&rules, b"AB\0"));
            let rules = [
                (0, 65536),
                (1, 2369),
                (2, 70722),
                (3, 2147483652),
                (4, 1347),
                (5, 2147483654),
                (6, 134273),
                (7, 15746),
                (8, 2147483648),
                (163, 37091),
            ];
            m.denormalizer_spec = Some(proto::NormalizerSpec {
                precompiled_charsmap: Some(charsmap(&rules, b"A B\0a\0xyz\0")),
                add_dummy_prefix: Some(false),
                remove_extra_whitespaces: Some(false),
                escape_whitespaces: Some(false),
                ..Default::default()
            });
        })
        .unwrap();
        let ids = spm.encode("abc cab");
        assert_eq!(ids, [498, 518, 75, 522, 498, 522, 518, 75]);
        assert_eq!(spm.decode(&ids), "aBc caB");
        assert_eq!(spm.decode(&[498, 74, 75, 76, 236, 138, 139]), "axyzA B");
    }

    #[test]
    fn unused_pieces_are_split_back_or_fall_back_to_bytes() {
        // "lo", "▁w", "orld" and "y" marked UNUSED; ids from sentencepiece 0.2.3.
        let spm = edited(|m| {
            for id in [333, 274, 435, 520] {
                m.pieces[id].r#type = Some(5);
            }
        })
        .unwrap();
        assert_eq!(spm.encode("Hello world"), [498, 81, 291, 507, 506, 498, 512, 297, 332]);
        assert_eq!(spm.encode("yellow"), [498, 130, 291, 401]);
    }

    #[test]
    fn user_defined_pieces_match_longest_first_and_never_merge() {
        let spm = tiny();
        let start = spm.piece_to_id("<|im_start|>").unwrap();
        let end = spm.piece_to_id("<|im_end|>").unwrap();
        assert_eq!(spm.encode("<|im_start|><|im_end|>")[1..], [start, end]);
        // A broken tag is ordinary text.
        assert!(!spm.encode("<|im_start").contains(&start));
    }

    #[test]
    fn long_text_round_trips() {
        let spm = tiny();
        let text = "Mount Everest is the highest mountain. 世界第一高峰是什么峰? ".repeat(500);
        let ids = spm.encode(&text);
        assert!(!ids.is_empty());
        assert_eq!(spm.decode(&ids), text);
    }
}
