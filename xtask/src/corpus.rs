//! Seeded English-like text for benchmarks: sentences of Zipf-distributed words
//! (common English words first, then made-up words built from syllables), with commas,
//! numbers, line breaks and now and then a sentence of CJK characters.
//!
//! Real text is not needed to time a data pipeline, only text whose lengths, word
//! frequencies and character mix resemble it, so that a 32k BPE vocabulary trained on
//! it tokenizes it at a realistic rate (about 1.3 tokens per word).

use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The most frequent words, ranked first in the lexicon.
const COMMON: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "an",
    "but",
    "not",
    "have",
    "has",
    "they",
    "you",
    "we",
    "can",
    "will",
    "more",
    "one",
    "all",
    "their",
    "there",
    "been",
    "if",
    "when",
    "would",
    "what",
    "so",
    "about",
    "other",
    "into",
    "some",
    "than",
    "time",
    "only",
    "its",
    "also",
    "new",
    "use",
    "first",
    "how",
    "most",
    "many",
    "these",
    "may",
    "like",
    "two",
    "make",
    "each",
    "people",
    "way",
    "work",
    "data",
    "model",
    "system",
    "language",
    "should",
    "could",
    "between",
    "after",
    "where",
    "through",
    "because",
    "example",
    "number",
    "information",
    "different",
    "important",
    "question",
    "answer",
    "write",
    "explain",
    "describe",
    "list",
    "give",
    "following",
    "text",
    "sentence",
    "word",
    "world",
    "water",
    "history",
    "science",
    "learning",
    "training",
    "process",
    "result",
    "problem",
    "during",
    "while",
    "before",
    "under",
    "over",
    "very",
    "just",
    "any",
    "such",
    "those",
    "here",
    "then",
    "them",
    "our",
    "your",
    "his",
    "her",
    "who",
    "why",
    "yes",
    "no",
    "three",
    "four",
    "five",
    "year",
    "day",
    "city",
    "country",
    "company",
    "government",
    "school",
    "student",
    "research",
    "health",
    "food",
    "music",
];
const ONSETS: &[&str] = &[
    "", "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
    "y", "z", "st", "tr", "pl", "gr", "br", "ch", "sh", "th", "cl", "pr", "fl", "sp", "qu",
];
const NUCLEI: &[&str] = &[
    "a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ea", "ou", "io", "ee", "oo", "y",
];
const CODAS: &[&str] = &[
    "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng", "ck", "rt", "x", "ble", "tion",
];

/// Words in the lexicon: about what a 32k-vocabulary corpus sample would show.
const LEXICON_SIZE: usize = 40_000;
/// Distinct CJK characters used.
const CJK_POOL: usize = 1500;

/// A seeded text generator; the same seed gives the same lexicon.
#[derive(Debug)]
pub struct TextGen {
    lexicon: Vec<String>,
    /// Cumulative Zipf weights over `lexicon`.
    cumulative: Vec<f64>,
    cjk: Vec<char>,
}

impl TextGen {
    /// Builds the lexicon and CJK pool from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut seen: HashSet<String> = COMMON.iter().map(|w| w.to_string()).collect();
        let mut lexicon: Vec<String> = COMMON.iter().map(|w| w.to_string()).collect();
        while lexicon.len() < LEXICON_SIZE {
            let syllables = rng.random_range(1..=4);
            let word: String = (0..syllables)
                .flat_map(|_| {
                    [
                        pick(&mut rng, ONSETS),
                        pick(&mut rng, NUCLEI),
                        pick(&mut rng, CODAS),
                    ]
                })
                .collect();
            if word.len() > 1 && seen.insert(word.clone()) {
                lexicon.push(word);
            }
        }
        let mut total = 0.0;
        let cumulative = (0..lexicon.len())
            .map(|rank| {
                total += 1.0 / (rank as f64 + 2.7);
                total
            })
            .collect();
        let cjk = (0..CJK_POOL)
            .filter_map(|_| char::from_u32(rng.random_range(0x4E00..=0x9FA5)))
            .collect();
        Self {
            lexicon,
            cumulative,
            cjk,
        }
    }

    /// Text of about `n_words` words (a CJK sentence counts a word per two characters).
    pub fn text(&self, rng: &mut ChaCha8Rng, n_words: usize) -> String {
        let mut out = String::new();
        let mut count = 0;
        while count < n_words {
            if !out.is_empty() {
                out.push(if rng.random_bool(0.1) { '\n' } else { ' ' });
            }
            if rng.random_bool(0.05) {
                count += self.cjk_sentence(rng, &mut out);
            } else {
                count += self.sentence(rng, &mut out, n_words - count);
            }
        }
        out
    }

    /// Appends an English-like sentence of at most `max_words` words; returns its length.
    fn sentence(&self, rng: &mut ChaCha8Rng, out: &mut String, max_words: usize) -> usize {
        let len = rng.random_range(4..=20).min(max_words).max(1);
        for i in 0..len {
            if i > 0 {
                out.push(' ');
            }
            if rng.random_bool(0.02) {
                out.push_str(&rng.random_range(0..2030).to_string());
            } else {
                let word = self.word(rng);
                if i == 0 {
                    let mut chars = word.chars();
                    out.extend(chars.next().map(|c| c.to_ascii_uppercase()));
                    out.push_str(chars.as_str());
                } else {
                    out.push_str(word);
                }
            }
            if i + 1 < len && rng.random_bool(0.07) {
                out.push(',');
            }
        }
        out.push(match rng.random_range(0..10) {
            0 => '?',
            1 => '!',
            _ => '.',
        });
        len
    }

    /// Appends a sentence of CJK characters; returns its length in "words".
    fn cjk_sentence(&self, rng: &mut ChaCha8Rng, out: &mut String) -> usize {
        let len = rng.random_range(6..=30);
        for i in 0..len {
            out.extend(self.cjk.get(rng.random_range(0..self.cjk.len().max(1))));
            if i + 1 < len && rng.random_bool(0.08) {
                out.push('，');
            }
        }
        out.push('。');
        len / 2
    }

    fn word(&self, rng: &mut ChaCha8Rng) -> &str {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = rng.random::<f64>() * total;
        let rank = self
            .cumulative
            .partition_point(|&c| c < u)
            .min(self.lexicon.len().saturating_sub(1));
        self.lexicon.get(rank).map_or("the", String::as_str)
    }
}

fn pick<'a>(rng: &mut ChaCha8Rng, items: &[&'a str]) -> &'a str {
    items
        .get(rng.random_range(0..items.len()))
        .copied()
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_seeded_and_about_the_right_length() {
        let generator = TextGen::new(7);
        let a = generator.text(&mut ChaCha8Rng::seed_from_u64(1), 200);
        let b = TextGen::new(7).text(&mut ChaCha8Rng::seed_from_u64(1), 200);
        assert_eq!(a, b);
        let words = a.split_whitespace().count();
        assert!((100..=260).contains(&words), "{words} words: {a}");
        assert!(a.ends_with(['.', '?', '!', '。']));
    }
}
