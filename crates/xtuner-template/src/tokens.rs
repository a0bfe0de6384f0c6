//! The special values every stage agrees on, XTuner's `xtuner/utils/constants.py`:
//! the image placeholder in text, the id it becomes, and the label that carries no
//! loss. Defined here, at the bottom of the crate graph, so the data pipeline and the
//! models read the same numbers.

/// LLaVA's image placeholder in text (XTuner's `DEFAULT_IMAGE_TOKEN`).
pub const IMAGE_TOKEN: &str = "<image>";

/// The id `<image>` becomes in `input_ids`, where the model splices the image's
/// features (XTuner's `IMAGE_TOKEN_INDEX`).
pub const IMAGE_TOKEN_INDEX: i64 = -200;

/// The label of a position that is not trained (XTuner's `IGNORE_INDEX`, PyTorch's
/// `ignore_index` of the cross-entropy).
pub const IGNORE_INDEX: i64 = -100;
