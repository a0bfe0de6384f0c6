//! The BPE merge loop of `SentencePieceBpe`, as sentencepiece's `bpe_model.cc`
//! (`SampleEncode` without dropout): split normalized text into symbols (user-defined
//! pieces whole and frozen), merge the neighbouring pair that forms the best-scoring piece
//! until none does, with the candidates in a heap over a linked list of symbols
//! (O(n log n)), then split UNUSED pieces back into the pieces that formed them.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::{PieceKind, SentencePieceBpe};

/// How deep an UNUSED piece is split back into the pieces that formed it.
const MAX_RESEGMENT_DEPTH: usize = 100;

impl SentencePieceBpe {
    /// Splits normalized text into characters (user-defined pieces whole and frozen) and
    /// merges them best-score-first, as `bpe::Model::SampleEncode` without dropout.
    pub(super) fn bpe(&self, normalized: &str) -> Vec<Segment> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(normalized.len());
        let mut pos = 0;
        while let Some(rest) = normalized.get(pos..).filter(|r| !r.is_empty()) {
            let (len, frozen) = match self.user_defined.longest_match(rest.as_bytes()) {
                Some(len) if rest.is_char_boundary(len) => (len, true),
                _ => (
                    rest.chars().next().map_or(rest.len(), char::len_utf8),
                    false,
                ),
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

        let mut merges = Merges {
            heap: BinaryHeap::new(),
            unused_splits: HashMap::new(),
        };
        for right in 1..symbols.len() {
            self.push_pair(
                normalized,
                &symbols,
                Some(right - 1),
                Some(right),
                &mut merges,
            );
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
            self.push_pair(
                normalized,
                &symbols,
                Some(top.left),
                right.next,
                &mut merges,
            );
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
                let found = self
                    .piece_to_id(text)
                    .and_then(|id| Some((id, self.kind(id)?)));
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
                segments.push(Segment {
                    id,
                    start,
                    end: start + len,
                });
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
        let (Some(left), Some(right)) = (left, right) else {
            return;
        };
        let (Some(l), Some(r)) = (symbols.get(left), symbols.get(right)) else {
            return;
        };
        if l.frozen || r.frozen {
            return;
        }
        let len = l.len + r.len;
        if len > self.max_piece_len {
            return;
        }
        let Some(text) = normalized.get(l.start..l.start + len) else {
            return;
        };
        let Some(piece) = self.piece_to_id(text).and_then(|id| self.piece(id)) else {
            return;
        };
        if !piece.kind.is_mergeable() {
            return;
        }
        merges.heap.push(Candidate {
            score: piece.score,
            left,
            right,
            len,
        });
        if piece.kind == PieceKind::Unused {
            // As the C++: the split of the last queued pair with this text wins.
            merges.unused_splits.insert(text, l.len);
        }
    }
}

/// A span of the normalized text and its piece; `None` for an unknown symbol.
#[derive(Clone, Copy, Debug)]
pub(super) struct Segment {
    pub(super) id: Option<u32>,
    pub(super) start: usize,
    pub(super) end: usize,
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
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
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

#[cfg(test)]
mod tests {
    use crate::tokenizer::sentencepiece::tests::{edited, tiny};

    #[test]
    fn unused_pieces_are_split_back_or_fall_back_to_bytes() {
        // "lo", "▁w", "orld" and "y" marked UNUSED; ids from sentencepiece 0.2.3.
        let spm = edited(|m| {
            for id in [333, 274, 435, 520] {
                m.pieces[id].r#type = Some(5);
            }
        })
        .unwrap();
        assert_eq!(
            spm.encode("Hello world"),
            [498, 81, 291, 507, 506, 498, 512, 297, 332]
        );
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
