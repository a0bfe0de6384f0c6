//! Orders in which the training loop visits the rows: a seeded shuffle, or XTuner's
//! `LengthGroupedSampler` for unpacked data (rows of similar length batched together, so
//! less padding), which also keeps image and text-only samples apart (LLaVA's
//! `modality_length`: positive for samples with an image, negative for text only).

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

/// A seeded random permutation of `0..len`.
pub fn shuffled(len: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order
}

/// `items` in the order of [`shuffled`] with `seed`.
pub fn shuffle<T>(items: Vec<T>, seed: u64) -> Vec<T> {
    let order = shuffled(items.len(), seed);
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    order
        .into_iter()
        .filter_map(|i| slots.get_mut(i).and_then(Option::take))
        .collect()
}

/// A seeded random subset of at most `max` items, in their order (XTuner's
/// `max_dataset_length`).
pub fn subset<T>(items: Vec<T>, max: Option<usize>, seed: u64) -> Vec<T> {
    match max {
        Some(max) if max < items.len() => {
            let mut keep = shuffled(items.len(), seed);
            keep.truncate(max);
            keep.sort_unstable();
            let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
            keep.into_iter()
                .filter_map(|i| slots.get_mut(i).and_then(Option::take))
                .collect()
        }
        _ => items,
    }
}

/// XTuner's length-grouped order.
///
/// `lengths` are modality lengths (text-only samples negative; 0 is treated as text).
/// Indices are shuffled, cut into mega-batches of `mega_batch_mult × batch_size` (with
/// `mega_batch_mult = clamp(len / (batch_size × 4), 1, 50)`), and each mega-batch is
/// sorted by length, longest first; the mega-batch holding the longest sample goes
/// first. With both modalities present each is grouped on its own, the mega-batches
/// are shuffled together and the two leftover tails are merged into the last one.
pub fn length_grouped(lengths: &[i64], batch_size: usize, seed: u64) -> Vec<usize> {
    let batch_size = batch_size.max(1);
    let mega_batch_mult = (lengths.len() / (batch_size * 4)).clamp(1, 50);
    let group = mega_batch_mult * batch_size;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let key = |i: &usize| lengths.get(*i).map_or(0, |l| l.unsigned_abs());

    let grouped = |indices: Vec<usize>, rng: &mut ChaCha8Rng| -> Vec<Vec<usize>> {
        let mut indices = indices;
        indices.shuffle(rng);
        indices
            .chunks(group)
            .map(|chunk| {
                let mut chunk = chunk.to_vec();
                chunk.sort_by_key(|i| std::cmp::Reverse(key(i)));
                chunk
            })
            .collect()
    };

    let (image, text): (Vec<usize>, Vec<usize>) = (0..lengths.len()).partition(|&i| lengths[i] > 0);
    let mut megabatches = if image.is_empty() || text.is_empty() {
        grouped((0..lengths.len()).collect(), &mut rng)
    } else {
        let mut image_batches = grouped(image, &mut rng);
        let mut text_batches = grouped(text, &mut rng);
        let mut last = image_batches.pop().unwrap_or_default();
        last.extend(text_batches.pop().unwrap_or_default());
        let mut all: Vec<Vec<usize>> = image_batches.into_iter().chain(text_batches).collect();
        all.shuffle(&mut rng);
        if !last.is_empty() {
            last.sort_by_key(|i| std::cmp::Reverse(key(i)));
            all.push(last);
        }
        all
    };
    // As XTuner: the longest sample trades places with the first one, so that an
    // out-of-memory shows on the first step rather than hours in.
    let longest = (0..megabatches.len())
        .max_by_key(|&b| megabatches[b].first().map(key).unwrap_or(0))
        .unwrap_or(0);
    let (head, tail) = megabatches.split_at_mut(longest);
    if let (Some(a), Some(b)) = (
        head.first_mut().and_then(|m| m.first_mut()),
        tail.first_mut().and_then(|m| m.first_mut()),
    ) {
        std::mem::swap(a, b);
    }
    megabatches.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let a = shuffled(100, 7);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, shuffled(100, 7));
        assert_ne!(a, shuffled(100, 8));
    }

    #[test]
    fn groups_by_length_longest_first() {
        let lengths: Vec<i64> = (1..=64).collect();
        let order = length_grouped(&lengths, 4, 0);
        assert_eq!(order.len(), 64);
        assert_eq!(lengths[order[0]], 64, "longest sample first");
        // mega_batch_mult = 4 → groups of 16 sorted descending.
        for group in order.chunks(16) {
            assert!(group.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
    }

    #[test]
    fn modalities_are_grouped_apart() {
        let lengths: Vec<i64> = (0..40)
            .map(|i| if i % 2 == 0 { 10 + i } else { -(10 + i) })
            .collect();
        let order = length_grouped(&lengths, 2, 3);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(sorted, (0..40).collect::<Vec<_>>());
        // 20 of each modality in mega-batches of 10: two full batches each, the last of
        // each merged into a 20-sample tail. Before the tail every batch holds one
        // modality, but for the longest sample's swap to the front (one element).
        let tail = 20;
        for chunk in order[..order.len() - tail].chunks(10) {
            let image = chunk.iter().filter(|&&i| lengths[i] > 0).count();
            assert!(
                image.min(chunk.len() - image) <= 1,
                "{chunk:?} in {order:?}"
            );
        }
    }
}
