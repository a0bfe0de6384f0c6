//! Collation for training, as XTuner's `default_collate_fn`: rows are right-padded with
//! id 0 and label -100; the attention mask comes from the rows' lengths (not from pad
//! ids, which some tokenizers share with EOS). Packed rows with varlen attention keep
//! their sample boundaries and per-sample positions; otherwise positions run 0..len.

use crate::encode::IGNORE_INDEX;
use crate::pack::PackedRow;

/// Id used for padding (XTuner pads with 0, not the tokenizer's pad id).
pub const PAD_TOKEN_INDEX: i64 = 0;

/// A training batch, row-major `[batch_size, seq_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Rows in the batch.
    pub batch_size: usize,
    /// Length of the longest row; shorter rows are right-padded.
    pub seq_len: usize,
    /// Token ids, padded with [`PAD_TOKEN_INDEX`].
    pub input_ids: Vec<i64>,
    /// Labels, padded with -100.
    pub labels: Vec<i64>,
    /// True on real tokens, false on padding.
    pub attention_mask: Vec<bool>,
    /// Position of each token (restarting per sample with varlen; 0 on padding).
    pub position_ids: Vec<i64>,
    /// Per row, the sample boundaries (`Some` with varlen attention).
    pub cumulative_len: Option<Vec<Vec<usize>>>,
    /// The longest sample segment in the batch (`Some` with varlen attention).
    pub max_seqlen: Option<usize>,
}

impl Batch {
    /// Number of positions whose label is trained.
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l >= 0).count()
    }

    /// Number of real (unpadded) tokens.
    pub fn tokens(&self) -> usize {
        self.attention_mask.iter().filter(|&&m| m).count()
    }
}

/// Collates rows into a batch. With `varlen`, positions restart at every sample start
/// and the boundaries are kept; without it, each row is one causal sequence.
pub fn collate(rows: &[&PackedRow], varlen: bool) -> Batch {
    let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let n = rows.len() * seq_len;
    let mut batch = Batch {
        batch_size: rows.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        labels: Vec::with_capacity(n),
        attention_mask: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        cumulative_len: varlen.then(|| rows.iter().map(|r| r.cumulative_len.clone()).collect()),
        max_seqlen: varlen.then(|| rows.iter().map(|r| r.max_seqlen()).max().unwrap_or(0)),
    };
    for row in rows {
        let pad = seq_len - row.len();
        batch.input_ids.extend_from_slice(&row.input_ids);
        batch
            .input_ids
            .extend(std::iter::repeat_n(PAD_TOKEN_INDEX, pad));
        batch.labels.extend_from_slice(&row.labels);
        batch.labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        batch
            .attention_mask
            .extend(std::iter::repeat_n(true, row.len()));
        batch.attention_mask.extend(std::iter::repeat_n(false, pad));
        if varlen {
            batch
                .position_ids
                .extend(row.position_ids().into_iter().map(|p| p as i64));
        } else {
            batch.position_ids.extend(0..row.len() as i64);
        }
        batch.position_ids.extend(std::iter::repeat_n(0, pad));
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: &[i64], cu: &[usize]) -> PackedRow {
        PackedRow {
            input_ids: ids.to_vec(),
            labels: ids.to_vec(),
            cumulative_len: cu.to_vec(),
        }
    }

    #[test]
    fn right_pads_and_masks_by_length() {
        let a = row(&[5, 6, 7], &[0, 3]);
        let b = row(&[2], &[0, 1]); // id 2 could be EOS == pad: the mask ignores ids
        let batch = collate(&[&a, &b], false);
        assert_eq!((batch.batch_size, batch.seq_len), (2, 3));
        assert_eq!(batch.input_ids, vec![5, 6, 7, 2, 0, 0]);
        assert_eq!(batch.labels, vec![5, 6, 7, 2, -100, -100]);
        assert_eq!(
            batch.attention_mask,
            vec![true, true, true, true, false, false]
        );
        assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(batch.cumulative_len, None);
        assert_eq!(batch.trained_tokens(), 4);
    }

    #[test]
    fn varlen_keeps_boundaries_and_restarts_positions() {
        let a = row(&[1, 2, 3, 4, 5], &[0, 2, 5]);
        let batch = collate(&[&a], true);
        assert_eq!(batch.position_ids, vec![0, 1, 0, 1, 2]);
        assert_eq!(batch.cumulative_len, Some(vec![vec![0, 2, 5]]));
        assert_eq!(batch.max_seqlen, Some(3));
    }
}
