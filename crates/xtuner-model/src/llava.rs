//! LLaVA's splice of image features into the token embeddings: XTuner's
//! `prepare_inputs_labels_for_multimodal` (`xtuner/model/utils.py`, after LLaVA's
//! `llava_arch.py`), as a pure function of tensors, independent of the LLM type (the
//! caller passes its token-embedding lookup).
//!
//! For each row of a right-padded batch:
//! 1. drop padding (positions whose attention mask is false);
//! 2. split the row at every [`IMAGE_TOKEN_INDEX`] (-200); embed the text pieces;
//! 3. put the next image-feature block (P rows, consumed from the batch in order) where
//!    each -200 was; its labels are [`IGNORE_INDEX`];
//! 4. a row with no -200 (a text-only sample, whose dataset entry is an all-zero image)
//!    still consumes one image block, without inserting it.
//!
//! Rows are then right-padded to the longest: zero embeddings, label -100, mask false,
//! position 0; `position_ids` count `0..len` in each row.
//!
//! The splice is one gather (`select`) from `[text embeddings; image features; a zero
//! row]`, so gradients flow to both the embedding table and the projector.
//!
//! Dimension legend: B batch, T input length, T' spliced length, N images, P image
//! tokens per image, C LLM hidden.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use crate::clip_vit::ClipVisionTower;
use crate::decoder::Decoder;
use crate::projector::Projector;
use crate::{Error, Result};

pub use xtuner_template::tokens::{IGNORE_INDEX, IMAGE_TOKEN_INDEX};

/// The LLM's inputs after the splice (XTuner passes them with `input_ids=None`).
#[derive(Debug, Clone)]
pub struct MultimodalInputs<B: Backend> {
    /// `[B, T', C]`, zero on padding.
    pub inputs_embeds: Tensor<B, 3>,
    /// `[B, T']`, -100 on image rows and padding; `None` when no labels were given.
    pub labels: Option<Tensor<B, 2, Int>>,
    /// `[B, T']`, true on real (text or image) positions.
    pub attention_mask: Tensor<B, 2, Bool>,
    /// `[B, T']`, `0..len` per row, 0 on padding.
    pub position_ids: Tensor<B, 2, Int>,
}

/// XTuner's `LLaVAModel` image path: the vision tower's hidden state `select_layer`
/// (-2 in every XTuner config) without the CLS token, through the projector.
///
/// # Shapes
/// `pixel_values`: `[N, 3, H, W]` → `[N, P, C]` (P patches, C the LLM hidden size).
///
/// # Errors
/// [`Error::InvalidInput`] for a wrong image size or a layer out of range.
pub fn image_features<B: Backend>(
    tower: &ClipVisionTower<B>,
    projector: &Projector<B>,
    pixel_values: Tensor<B, 4>,
    select_layer: i64,
) -> Result<Tensor<B, 3>> {
    Ok(projector.forward(tower.forward_features(pixel_values, select_layer)?))
}

/// XTuner's `LLaVAModel`: the LLM, the CLIP vision tower and the projector between
/// them, as one module (so one optimizer and one checkpoint cover the trained parts).
/// Which parts train is decided by freezing and adapters, not here.
#[derive(Module, Debug)]
pub struct Llava<B: Backend> {
    /// The language model.
    pub llm: Decoder<B>,
    /// The vision tower.
    pub visual_encoder: ClipVisionTower<B>,
    /// Vision hidden size → LLM hidden size.
    pub projector: Projector<B>,
}

impl<B: Backend> Llava<B> {
    /// The LLM's inputs for a batch: image features (vision tower layer
    /// `select_layer`, CLS dropped, projected) spliced into the token embeddings.
    ///
    /// # Shapes
    /// `input_ids`, `attention_mask`, `labels`: `[B, T]`; `pixel_values`: `[N, 3, H, W]`,
    /// one image per row (a blank one for text-only rows).
    ///
    /// # Errors
    /// As [`image_features`] and [`prepare_inputs_labels_for_multimodal`].
    pub fn prepare_inputs(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Option<Tensor<B, 2, Bool>>,
        labels: Option<Tensor<B, 2, Int>>,
        pixel_values: Tensor<B, 4>,
        select_layer: i64,
    ) -> Result<MultimodalInputs<B>> {
        let features = image_features(
            &self.visual_encoder,
            &self.projector,
            pixel_values,
            select_layer,
        )?;
        prepare_inputs_labels_for_multimodal(input_ids, attention_mask, labels, features, |ids| {
            self.llm.embed(ids.unsqueeze::<2>()).squeeze_dim::<2>(0)
        })
    }
}

/// Where a spliced position reads from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Piece {
    /// `len` text tokens starting at `start` in the batch's text-token list.
    Text { start: usize, len: usize },
    /// Image block `index`.
    Image(usize),
}

/// XTuner's `prepare_inputs_labels_for_multimodal`.
///
/// `embed` maps text ids to the LLM's input embeddings (e.g. `table.select(0, ids)`);
/// it is called once, on all text tokens of the batch. A missing `attention_mask` means
/// no padding.
///
/// # Shapes
/// `input_ids`: `[B, T]` (with -200 for images); `attention_mask`, `labels`: `[B, T]`;
/// `image_features`: `[N, P, C]`; `embed`: `[n]` → `[n, C]`. See [`MultimodalInputs`]
/// for the outputs.
///
/// # Errors
/// [`Error::ImageCountMismatch`] when the batch does not consume exactly N image blocks;
/// [`Error::InvalidInput`] for mismatched shapes, a negative id other than -200, an
/// `embed` output of the wrong shape, or a batch with no tokens at all.
pub fn prepare_inputs_labels_for_multimodal<B, F>(
    input_ids: Tensor<B, 2, Int>,
    attention_mask: Option<Tensor<B, 2, Bool>>,
    labels: Option<Tensor<B, 2, Int>>,
    image_features: Tensor<B, 3>,
    embed: F,
) -> Result<MultimodalInputs<B>>
where
    B: Backend,
    F: FnOnce(Tensor<B, 1, Int>) -> Tensor<B, 2>,
{
    let device = input_ids.device();
    let [batch, t] = input_ids.dims();
    let ids = int_values(input_ids, "input_ids")?;
    let mask = match attention_mask {
        Some(mask) => {
            check_dims("attention_mask", mask.dims(), [batch, t])?;
            int_values(mask.int(), "attention_mask")?
                .into_iter()
                .map(|v| v != 0)
                .collect()
        }
        None => vec![true; batch * t],
    };
    let label_values = match labels {
        Some(labels) => {
            check_dims("labels", labels.dims(), [batch, t])?;
            Some(int_values(labels, "labels")?)
        }
        None => None,
    };
    let [n_images, p, c] = image_features.dims();

    // Plan the splice on the host: the text tokens in batch order and each row's pieces.
    let mut text_ids = Vec::new();
    let mut text_labels = Vec::new();
    let mut rows: Vec<Vec<Piece>> = Vec::with_capacity(batch);
    let mut next_image = 0;
    for r in 0..batch {
        let kept = (r * t..(r + 1) * t).filter(|&i| mask[i]);
        let mut pieces = Vec::new();
        let mut start = text_ids.len();
        let mut has_image = false;
        for i in kept {
            let id = ids[i];
            if id == IMAGE_TOKEN_INDEX {
                pieces.push(Piece::Text {
                    start,
                    len: text_ids.len() - start,
                });
                pieces.push(Piece::Image(next_image));
                next_image += 1;
                has_image = true;
                start = text_ids.len();
            } else if id < 0 {
                return Err(Error::InvalidInput {
                    name: "input_ids",
                    message: format!(
                        "row {r}, position {}: id {id} is negative and not {IMAGE_TOKEN_INDEX}",
                        i - r * t
                    ),
                });
            } else {
                text_ids.push(id);
                text_labels.push(label_values.as_ref().map_or(IGNORE_INDEX, |l| l[i]));
            }
        }
        pieces.push(Piece::Text {
            start,
            len: text_ids.len() - start,
        });
        if !has_image {
            // A text-only sample still owns an (all-zero) image in the batch.
            next_image += 1;
        }
        rows.push(pieces);
    }
    if next_image != n_images {
        return Err(Error::ImageCountMismatch {
            needed: next_image,
            given: n_images,
        });
    }
    let row_len = |pieces: &[Piece]| -> usize {
        pieces
            .iter()
            .map(|piece| {
                if let Piece::Text { len, .. } = piece {
                    *len
                } else {
                    p
                }
            })
            .sum()
    };
    let max_len = rows.iter().map(|pieces| row_len(pieces)).max().unwrap_or(0);
    if max_len == 0 {
        return Err(Error::InvalidInput {
            name: "input_ids",
            message: format!("no tokens in a batch of {batch} rows"),
        });
    }

    // Source table rows: text embeddings, then image rows, then one zero row for padding.
    let n_text = text_ids.len();
    let image_base = n_text;
    let zero_row = n_text + n_images * p;
    let mut index = Vec::with_capacity(batch * max_len);
    let mut out_labels = Vec::with_capacity(batch * max_len);
    let mut out_mask = Vec::with_capacity(batch * max_len);
    let mut positions = Vec::with_capacity(batch * max_len);
    for pieces in &rows {
        for piece in pieces {
            match *piece {
                Piece::Text { start, len } => {
                    index.extend(start..start + len);
                    out_labels.extend_from_slice(&text_labels[start..start + len]);
                }
                Piece::Image(k) => {
                    index.extend(image_base + k * p..image_base + (k + 1) * p);
                    out_labels.extend(std::iter::repeat_n(IGNORE_INDEX, p));
                }
            }
        }
        let len = row_len(pieces);
        index.extend(std::iter::repeat_n(zero_row, max_len - len));
        out_labels.extend(std::iter::repeat_n(IGNORE_INDEX, max_len - len));
        out_mask.extend((0..max_len).map(|j| j < len));
        positions.extend((0..max_len).map(|j| if j < len { j as i64 } else { 0 }));
    }

    let dtype = image_features.dtype();
    let mut table = Vec::with_capacity(3);
    if n_text > 0 {
        let text_embeds = embed(Tensor::from_data(
            TensorData::new(text_ids, [n_text]),
            &device,
        ));
        check_dims("embed", text_embeds.dims(), [n_text, c])?;
        table.push(text_embeds.cast(dtype));
    }
    table.push(image_features.reshape([n_images * p, c])); // [N·P, C]
    table.push(Tensor::<B, 2>::zeros([1, c], &device).cast(dtype));
    let table = Tensor::cat(table, 0); // [n_text + N·P + 1, C]
    let index = index.into_iter().map(|i| i as i64).collect::<Vec<_>>();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [batch * max_len]), &device);
    let inputs_embeds = table.select(0, index).reshape([batch, max_len, c]); // [B, T', C]

    let shape = [batch, max_len];
    Ok(MultimodalInputs {
        inputs_embeds,
        labels: label_values
            .map(|_| Tensor::from_data(TensorData::new(out_labels, shape), &device)),
        attention_mask: Tensor::from_data(TensorData::new(out_mask, shape), &device),
        position_ids: Tensor::from_data(TensorData::new(positions, shape), &device),
    })
}

/// Reads an integer tensor to the host as i64.
fn int_values<B: Backend>(tensor: Tensor<B, 2, Int>, name: &'static str) -> Result<Vec<i64>> {
    tensor
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| Error::InvalidInput {
            name,
            message: format!("cannot read the values: {e:?}"),
        })
}

fn check_dims(name: &'static str, found: [usize; 2], expected: [usize; 2]) -> Result<()> {
    if found == expected {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            name,
            message: format!("shape {found:?}, expected {expected:?}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::checkpoint::Checkpoint;
    use crate::test_util::max_abs_tensor;
    use std::path::PathBuf;

    type B = TestBackend;

    fn fixtures() -> PathBuf {
        crate::test_support::fixture("")
    }

    fn golden_float<const D: usize>(file: &str, key: &str) -> Tensor<B, D> {
        let ckpt = Checkpoint::open(&fixtures().join(file)).unwrap();
        let shape = ckpt.shape(key).unwrap();
        ckpt.tensor::<B, D>(key, shape.try_into().unwrap(), &Default::default())
            .unwrap()
    }

    fn golden_int(key: &str) -> Tensor<B, 2, Int> {
        let ckpt = Checkpoint::open(&fixtures().join("llava-tiny/golden.safetensors")).unwrap();
        let shape: [usize; 2] = ckpt.shape(key).unwrap().try_into().unwrap();
        Tensor::from_data(
            TensorData::new(ckpt.int_data(key).unwrap().to_vec::<i64>().unwrap(), shape),
            &Default::default(),
        )
    }

    fn ints<const D: usize>(t: Tensor<B, D, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().to_vec::<i64>().unwrap()
    }

    fn embedding_table() -> Tensor<B, 2> {
        golden_float::<2>(
            "internlm2-tiny/model.safetensors",
            "model.tok_embeddings.weight",
        )
    }

    #[test]
    fn image_features_match_the_reference() {
        let device = Default::default();
        let (tower, _) =
            ClipVisionTower::<B>::load(&fixtures().join("clip-vit-tiny"), &device).unwrap();
        let (projector, _) =
            Projector::<B>::load(&fixtures().join("llava-tiny/projector"), None, &device).unwrap();
        let pixel_values = golden_float::<4>("clip-vit-tiny/golden.safetensors", "pixel_values");
        let features = image_features(&tower, &projector, pixel_values, -2).unwrap();
        let err = max_abs_tensor(
            features,
            golden_float::<3>("llava-tiny/golden.safetensors", "image_features"),
        );
        assert!(err < 1e-4, "image_features max-abs {err}");
    }

    #[test]
    fn splice_matches_the_reference() {
        let table = embedding_table();
        let mask = golden_int("attention_mask").bool();
        let out = prepare_inputs_labels_for_multimodal(
            golden_int("input_ids"),
            Some(mask),
            Some(golden_int("labels")),
            golden_float::<3>("llava-tiny/golden.safetensors", "image_features"),
            |ids| table.select(0, ids),
        )
        .unwrap();
        let err = max_abs_tensor(
            out.inputs_embeds,
            golden_float::<3>("llava-tiny/golden.safetensors", "inputs_embeds"),
        );
        assert!(err < 1e-6, "inputs_embeds max-abs {err}");
        assert_eq!(ints(out.labels.unwrap()), ints(golden_int("new_labels")));
        assert_eq!(
            ints(out.attention_mask.int()),
            ints(golden_int("new_attention_mask"))
        );
        let lengths = [15, 10];
        let expected: Vec<i64> = lengths
            .iter()
            .flat_map(|&len| (0..15).map(move |j| if j < len { j } else { 0 }))
            .collect();
        assert_eq!(ints(out.position_ids), expected);
    }

    /// Ids 0..n embed to `[id, id]` so the output says where each row came from.
    fn toy(
        ids: [[i64; 4]; 2],
        mask: Option<[[bool; 4]; 2]>,
        images: usize,
    ) -> Result<MultimodalInputs<B>> {
        let device = Default::default();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::from(ids), &device);
        let mask = mask.map(|m| Tensor::<B, 2, Bool>::from_data(TensorData::from(m), &device));
        // Image k, token j: [100 + 10k + j, 100 + 10k + j].
        let features: Vec<f32> = (0..images)
            .flat_map(|k| (0..2).flat_map(move |j| [(100 + 10 * k + j) as f32; 2]))
            .collect();
        let features =
            Tensor::<B, 3>::from_data(TensorData::new(features, [images, 2, 2]), &device);
        prepare_inputs_labels_for_multimodal(ids, mask, None, features, |ids: Tensor<B, 1, Int>| {
            ids.float().unsqueeze_dim::<2>(1).repeat_dim(1, 2)
        })
    }

    fn first_channel(out: &MultimodalInputs<B>) -> Vec<f32> {
        out.inputs_embeds
            .clone()
            .narrow(2, 0, 1)
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    }

    #[test]
    fn text_only_rows_consume_an_image_slot() {
        let out = toy(
            [[1, 2, 3, 0], [4, IMAGE_TOKEN_INDEX, 5, 0]],
            Some([[true, true, true, false], [true, true, true, false]]),
            2,
        )
        .unwrap();
        assert_eq!(out.inputs_embeds.dims(), [2, 4, 2]);
        // Row 1 receives image 1, not image 0.
        assert_eq!(
            first_channel(&out),
            [1.0, 2.0, 3.0, 0.0, 4.0, 110.0, 111.0, 5.0]
        );
        assert!(out.labels.is_none());
        assert_eq!(ints(out.position_ids), [0, 1, 2, 0, 0, 1, 2, 3]);
        assert_eq!(ints(out.attention_mask.int()), [1, 1, 1, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn several_images_in_a_row_and_no_mask() {
        let out = toy(
            [
                [IMAGE_TOKEN_INDEX, 7, IMAGE_TOKEN_INDEX, 8],
                [IMAGE_TOKEN_INDEX, 9, 9, 9],
            ],
            None,
            3,
        )
        .unwrap();
        assert_eq!(out.inputs_embeds.dims(), [2, 6, 2]);
        assert_eq!(
            first_channel(&out),
            [
                100.0, 101.0, 7.0, 110.0, 111.0, 8.0, 120.0, 121.0, 9.0, 9.0, 9.0, 0.0
            ]
        );
    }

    #[test]
    fn mismatches_are_errors() {
        let err = toy([[1, IMAGE_TOKEN_INDEX, 2, 3], [4, 5, 6, 7]], None, 1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ImageCountMismatch {
                    needed: 2,
                    given: 1
                }
            ),
            "{err}"
        );
        let err = toy([[1, -7, 2, 3], [4, 5, 6, 7]], None, 2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    name: "input_ids",
                    ..
                }
            ),
            "{err}"
        );
        let device = Default::default();
        let ids = Tensor::<B, 2, Int>::zeros([1, 3], &device);
        let features = Tensor::<B, 3>::zeros([1, 2, 4], &device);
        let wrong_width =
            |ids: Tensor<B, 1, Int>| Tensor::<B, 2>::zeros([ids.dims()[0], 5], &Default::default());
        let err = prepare_inputs_labels_for_multimodal(
            ids.clone(),
            None,
            None,
            features.clone(),
            wrong_width,
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { name: "embed", .. }),
            "{err}"
        );
        let labels = Tensor::<B, 2, Int>::zeros([1, 2], &device);
        let err =
            prepare_inputs_labels_for_multimodal(ids, None, Some(labels), features, wrong_width)
                .unwrap_err();
        assert!(
            matches!(err, Error::InvalidInput { name: "labels", .. }),
            "{err}"
        );
    }
}
