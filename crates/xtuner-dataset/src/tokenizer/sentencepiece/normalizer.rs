//! Text normalization before BPE, as sentencepiece's `normalizer.cc`: the `NormalizerSpec`
//! switches (dummy `▁` prefix, whitespace escaping, extra-space removal), the
//! `precompiled_charsmap` rewrite rules (a darts-clone double-array trie), and the byte trie
//! that keeps user-defined pieces whole. The same `Normalizer` runs a model's
//! `denormalizer_spec` over decoded text.

use std::fmt;

use super::{SPACE_SYMBOL, SentencePieceError, proto};

/// `NormalizerSpec`, ready to run (proto defaults applied).
#[derive(Clone)]
pub(super) struct Normalizer {
    name: String,
    pub(super) add_dummy_prefix: bool,
    pub(super) remove_extra_whitespaces: bool,
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
            .field(
                "treat_whitespace_as_suffix",
                &self.treat_whitespace_as_suffix,
            )
            .field("charsmap", &self.charsmap.is_some())
            .finish()
    }
}

impl Normalizer {
    pub(super) fn from_spec(
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
    pub(super) fn normalize(&self, input: &str, user_defined: Option<&PrefixTrie>) -> String {
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
        let space = if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
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
        let units = trie
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(CharsMap {
            units,
            pool: pool.to_vec(),
        })
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
            let Some(&unit) = self.units.get(node) else {
                break;
            };
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
pub(super) struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Clone, Debug, Default)]
struct TrieNode {
    /// (byte, child index), sorted by byte.
    children: Vec<(u8, usize)>,
    terminal: bool,
}

impl PrefixTrie {
    pub(super) fn insert(&mut self, key: &[u8]) {
        if key.is_empty() {
            return;
        }
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut node = 0;
        for &byte in key {
            let next_index = self.nodes.len();
            let Some(current) = self.nodes.get_mut(node) else {
                return;
            };
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
    pub(super) fn longest_match(&self, text: &[u8]) -> Option<usize> {
        let mut node = self.nodes.first()?;
        let mut best = None;
        for (i, byte) in text.iter().enumerate() {
            let Ok(k) = node.children.binary_search_by_key(byte, |c| c.0) else {
                break;
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::sentencepiece::tests::edited;

    #[test]
    fn normalizer_flags_are_honoured() {
        // Pieces from sentencepiece 0.2.3 on the fixture with the same normalizer_spec edits.
        let collapse =
            edited(|m| m.normalizer_spec.as_mut().unwrap().remove_extra_whitespaces = Some(true))
                .unwrap();
        let pieces: Vec<String> = collapse
            .encode_pieces("  two  spaces ")
            .into_iter()
            .map(|p| p.1)
            .collect();
        assert_eq!(pieces, ["▁t", "w", "o", "▁s", "p", "a", "ces"]);
        assert_eq!(
            collapse.encode("  two  spaces "),
            collapse.encode("two spaces")
        );
        assert_eq!(collapse.encode("   "), Vec::<u32>::new());
        let no_prefix =
            edited(|m| m.normalizer_spec.as_mut().unwrap().add_dummy_prefix = Some(false)).unwrap();
        let pieces: Vec<String> = no_prefix
            .encode_pieces("a b")
            .into_iter()
            .map(|p| p.1)
            .collect();
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
}
