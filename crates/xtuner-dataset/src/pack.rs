//! XTuner's `pack_to_max_length`: samples are concatenated and cut into rows of exactly
//! `max_length` tokens.
//!
//! Samples that cross a row boundary are cut: the head ends one row, the tail starts the
//! next. Given the whole data set as one batch, as here, a tail shorter than
//! `max_length` is dropped when at least one full row was produced; when the data holds
//! less than one row, it all becomes one shorter row.
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
pub fn pack(samples: &[EncodedSample], max_length: usize) -> Vec<PackedRow> {
    let max_length = max_length.max(1);
    let total: usize = samples.iter().map(EncodedSample::len).sum();
    let mut ids = Vec::with_capacity(total);
    let mut labels = Vec::with_capacity(total);
    // Global sample ends, ascending.
    let mut ends = Vec::with_capacity(samples.len());
    for s in samples {
        ids.extend_from_slice(&s.input_ids);
        labels.extend_from_slice(&s.labels);
        ends.push(ids.len());
    }
    if total < max_length {
        if total == 0 {
            return Vec::new();
        }
        return vec![row(&ids, &labels, &ends, 0, total)];
    }
    (0..total / max_length)
        .map(|chunk| {
            row(
                &ids,
                &labels,
                &ends,
                chunk * max_length,
                (chunk + 1) * max_length,
            )
        })
        .collect()
}

fn row(ids: &[i64], labels: &[i64], ends: &[usize], start: usize, end: usize) -> PackedRow {
    // Boundaries strictly after `start` up to `end`, shifted to the row; the row end is
    // always a boundary (a cut sample ends there).
    let first = ends.partition_point(|&e| e <= start);
    let mut cumulative_len = vec![0];
    cumulative_len.extend(
        ends[first..]
            .iter()
            .take_while(|&&e| e <= end)
            .map(|&e| e - start),
    );
    if cumulative_len.last() != Some(&(end - start)) {
        cumulative_len.push(end - start);
    }
    PackedRow {
        input_ids: ids[start..end].to_vec(),
        labels: labels[start..end].to_vec(),
        cumulative_len,
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
        let rows = pack(&[sample(5, 0), sample(4, 100), sample(4, 200)], 4);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].cumulative_len, vec![0, 4]);
        assert_eq!(rows[1].cumulative_len, vec![0, 1, 4]);
        assert_eq!(rows[1].position_ids(), vec![0, 0, 1, 2]);
        assert_eq!(rows[2].cumulative_len, vec![0, 1, 4]);
        assert_eq!(rows[2].input_ids, vec![103, 200, 201, 202]);
    }

    #[test]
    fn boundary_on_a_row_end_is_not_repeated() {
        let rows = pack(&[sample(4, 0), sample(4, 10)], 4);
        assert_eq!(rows[0].cumulative_len, vec![0, 4]);
        assert_eq!(rows[1].cumulative_len, vec![0, 4]);
        assert_eq!(rows[1].max_seqlen(), 4);
    }

    #[test]
    fn less_than_one_row_gives_one_short_row() {
        let rows = pack(&[sample(2, 0), sample(3, 10)], 100);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].cumulative_len, vec![0, 2, 5]);
        assert!(pack(&[], 8).is_empty());
    }
}
