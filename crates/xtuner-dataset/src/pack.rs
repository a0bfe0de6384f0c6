//! XTuner's `pack_to_max_length`: samples are concatenated and cut into rows of exactly
//! `max_length` tokens.
//!
//! Samples that cross a row boundary are cut: the head ends one row, the tail starts the
//! next. Given the whole data set as one batch, as here, a tail shorter than
//! `max_length` is dropped when at least one full row was produced; when the data holds
//! less than one row, it all becomes one shorter row. An empty sample adds nothing
//! (XTuner's Packer would record it as a zero-length sample, which changes no position
//! and no attention; the pipeline never produces one).
//!
//! Every row records its sample boundaries ([`PackedRow::cumulative_len`]: row-local
//! offsets starting at 0 and ending at the row length, a cut adding a boundary at the row
//! end), from which the per-sample position ids of varlen attention follow.

use serde::{Deserialize, Serialize};

use crate::encode::EncodedSample;

/// One packed row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedRow {
    /// Token ids.
    pub input_ids: Vec<i64>,
    /// Labels.
    pub labels: Vec<i64>,
    /// Sample boundaries inside the row: `[0, end_1, ..., len]`.
    pub cumulative_len: Vec<usize>,
}

impl PackedRow {
    /// Positions that restart at 0 at every sample start (varlen attention).
    pub fn position_ids(&self) -> Vec<usize> {
        self.cumulative_len
            .windows(2)
            .flat_map(|w| 0..w[1].saturating_sub(w[0]))
            .collect()
    }

    /// The longest sample segment in the row (flash-attention's `max_seqlen`).
    pub fn max_seqlen(&self) -> usize {
        self.cumulative_len
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .max()
            .unwrap_or(0)
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when the row has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// Packs samples, in order, into rows of `max_length` tokens (see the module docs).
/// `max_length` must be positive (the config layer checks it).
///
/// The samples are consumed one at a time, each freed once its tokens are copied into
/// the rows, so the data set is held about once, not three times (samples, their
/// concatenation and the rows). Each sample's `labels` are as long as its `input_ids`.
pub fn pack(samples: impl IntoIterator<Item = EncodedSample>, max_length: usize) -> Vec<PackedRow> {
    let max_length = max_length.max(1);
    let mut rows = Vec::new();
    let mut current = PackedRow::open(max_length);
    for sample in samples {
        debug_assert_eq!(sample.input_ids.len(), sample.labels.len());
        if sample.is_empty() {
            continue;
        }
        let mut at = 0;
        while at < sample.len() {
            if current.len() == max_length {
                rows.push(current.close(max_length));
            }
            let take = (max_length - current.len()).min(sample.len() - at);
            current
                .input_ids
                .extend_from_slice(&sample.input_ids[at..at + take]);
            current
                .labels
                .extend_from_slice(&sample.labels[at..at + take]);
            at += take;
        }
        // The sample ends inside the row (or at its end, which closing will not repeat).
        current.cumulative_len.push(current.len());
    }
    // A last full row is kept, a shorter tail only when it is all there is.
    if current.len() == max_length || (rows.is_empty() && !current.is_empty()) {
        rows.push(current.finish());
    }
    rows
}

/// Tokens a new row reserves at most: rows of up to this size are allocated once, a
/// longer `max_length` grows as it fills (an absurd one cannot abort the process).
const ROW_RESERVE: usize = 1 << 16;

impl PackedRow {
    /// An empty row with room for `max_length` tokens.
    fn open(max_length: usize) -> Self {
        let room = max_length.min(ROW_RESERVE);
        Self {
            input_ids: Vec::with_capacity(room),
            labels: Vec::with_capacity(room),
            cumulative_len: vec![0],
        }
    }

    /// This row, finished; `self` starts over.
    fn close(&mut self, max_length: usize) -> Self {
        std::mem::replace(self, Self::open(max_length)).finish()
    }

    /// The row with its end made a boundary (a cut sample ends there) and no spare room.
    fn finish(mut self) -> Self {
        let len = self.len();
        if self.cumulative_len.last() != Some(&len) {
            self.cumulative_len.push(len);
        }
        self.input_ids.shrink_to_fit();
        self.labels.shrink_to_fit();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize, first: i64) -> EncodedSample {
        let ids: Vec<i64> = (first..first + len as i64).collect();
        EncodedSample {
            labels: ids.clone(),
            input_ids: ids,
        }
    }

    #[test]
    fn cuts_samples_and_drops_the_short_tail() {
        let rows = pack([sample(5, 0), sample(4, 100), sample(4, 200)], 4);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].cumulative_len, vec![0, 4]);
        assert_eq!(rows[1].cumulative_len, vec![0, 1, 4]);
        assert_eq!(rows[1].position_ids(), vec![0, 0, 1, 2]);
        assert_eq!(rows[2].cumulative_len, vec![0, 1, 4]);
        assert_eq!(rows[2].input_ids, vec![103, 200, 201, 202]);
    }

    #[test]
    fn boundary_on_a_row_end_is_not_repeated() {
        let rows = pack([sample(4, 0), sample(4, 10)], 4);
        assert_eq!(rows[0].cumulative_len, vec![0, 4]);
        assert_eq!(rows[1].cumulative_len, vec![0, 4]);
        assert_eq!(rows[1].max_seqlen(), 4);
    }

    /// The definition, written as directly as possible: concatenate everything, cut
    /// every `max_length` tokens, mark every (non-empty) sample's end inside a row and the
    /// row's end.
    fn concatenate_and_cut(lengths: &[usize], max_length: usize) -> Vec<PackedRow> {
        let mut ends = Vec::new();
        let mut total = 0;
        for &len in lengths.iter().filter(|&&len| len > 0) {
            total += len;
            ends.push(total);
        }
        let ids: Vec<i64> = (0..total as i64).collect();
        let cuts: Vec<(usize, usize)> = if total < max_length {
            if total == 0 { vec![] } else { vec![(0, total)] }
        } else {
            (0..total / max_length)
                .map(|r| (r * max_length, (r + 1) * max_length))
                .collect()
        };
        cuts.into_iter()
            .map(|(start, end)| {
                let mut cumulative_len = vec![0];
                cumulative_len.extend(
                    ends.iter()
                        .filter(|&&e| e > start && e <= end)
                        .map(|&e| e - start),
                );
                if cumulative_len.last() != Some(&(end - start)) {
                    cumulative_len.push(end - start);
                }
                PackedRow {
                    input_ids: ids[start..end].to_vec(),
                    labels: ids[start..end].iter().map(|i| -i).collect(),
                    cumulative_len,
                }
            })
            .collect()
    }

    #[test]
    fn streaming_equals_concatenate_and_cut() {
        // A fixed LCG: lengths 0..=12 (empty samples included), rows of 1..=9 tokens.
        let mut state = 12345u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % n) as usize
        };
        for _ in 0..500 {
            let lengths: Vec<usize> = (0..next(8)).map(|_| next(13)).collect();
            let max_length = 1 + next(9);
            let mut first = 0i64;
            let samples: Vec<EncodedSample> = lengths
                .iter()
                .map(|&len| {
                    let ids: Vec<i64> = (first..first + len as i64).collect();
                    first += len as i64;
                    EncodedSample {
                        labels: ids.iter().map(|i| -i).collect(),
                        input_ids: ids,
                    }
                })
                .collect();
            assert_eq!(
                pack(samples, max_length),
                concatenate_and_cut(&lengths, max_length),
                "lengths {lengths:?}, rows of {max_length}"
            );
        }
    }

    #[test]
    fn less_than_one_row_gives_one_short_row() {
        let rows = pack([sample(2, 0), sample(3, 10)], 100);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].cumulative_len, vec![0, 2, 5]);
        assert!(pack([], 8).is_empty());
        // A row size far beyond the data reserves no more than the data needs.
        let rows = pack([sample(3, 0)], usize::MAX);
        assert_eq!(rows[0].cumulative_len, vec![0, 3]);
        assert_eq!(rows[0].input_ids.capacity(), 3);
    }
}
