//! Image preprocessing for LLaVA, as XTuner's `LLaVADataset.__getitem__` does it: open
//! the file as RGB, optionally `expand2square` (paste the image centred on a square
//! canvas filled with the mean colour), then Hugging Face's (slow, PIL-based)
//! `CLIPImageProcessor.preprocess`: resize, center-crop, rescale, normalize.
//!
//! Settings come from the vision tower's `preprocessor_config.json`
//! ([`ImageProcessorConfig`]); the output is `pixel_values` `[3, H, W]` in f32.
//!
//! [`resize`] ports Pillow's `Image.resize` for 8-bit images (`libImaging/Resample.c`), so
//! the output matches Hugging Face's (slow, PIL-based) processor bit for bit.

mod resample;

use std::path::{Path, PathBuf};

use ::image::RgbImage;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use serde::Deserialize;

pub use self::resample::{Resample, resize};
use crate::{Error, Result};

/// CLIP's per-channel mean (`OPENAI_CLIP_MEAN`), the processor's default.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// CLIP's per-channel standard deviation (`OPENAI_CLIP_STD`), the processor's default.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The settings of a `CLIPImageProcessor` (`preprocessor_config.json`). Defaults are
/// the class defaults of transformers' `CLIPImageProcessor` (224 px, bicubic, CLIP
/// mean/std); unknown keys (`image_processor_type`, ...) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageProcessorConfig {
    /// Whether to resize.
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// The resize target: `{"shortest_edge": n}` (or a bare `n`) or `{"height", "width"}`.
    #[serde(default = "default_size")]
    pub size: ResizeTarget,
    /// The PIL resampling filter (`3` = bicubic).
    #[serde(default)]
    pub resample: Resample,
    /// Whether to center-crop.
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    /// The crop size: `{"height", "width"}` or a bare `n` (square).
    #[serde(default = "default_crop")]
    pub crop_size: CropSize,
    /// Whether to multiply by `rescale_factor`.
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// The rescale factor, `1/255`.
    #[serde(default = "default_rescale_factor")]
    pub rescale_factor: f64,
    /// Whether to normalize with `image_mean` / `image_std`.
    #[serde(default = "yes")]
    pub do_normalize: bool,
    /// Per-channel mean (a list of 3, or one number for all channels).
    #[serde(default = "clip_mean", deserialize_with = "channels")]
    pub image_mean: [f64; 3],
    /// Per-channel standard deviation (a list of 3, or one number).
    #[serde(default = "clip_std", deserialize_with = "channels")]
    pub image_std: [f64; 3],
}

impl Default for ImageProcessorConfig {
    fn default() -> Self {
        Self {
            do_resize: true,
            size: default_size(),
            resample: Resample::default(),
            do_center_crop: true,
            crop_size: default_crop(),
            do_rescale: true,
            rescale_factor: default_rescale_factor(),
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }
}

impl ImageProcessorConfig {
    /// Reads and validates a `preprocessor_config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::BadConfig`] naming the file
    /// when it cannot be parsed or holds an unusable value.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let config: Self = crate::error::read_json_file(path)?;
        config.validate().map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(config)
    }

    /// Checks that sizes are positive and the standard deviations non-zero.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &'static str, message: String| Err(Error::InvalidConfig { key, message });
        match self.size {
            ResizeTarget::ShortestEdge(0) => {
                return bad("size", "shortest_edge must be positive".into());
            }
            ResizeTarget::Exact { height, width } if height == 0 || width == 0 => {
                return bad("size", format!("must be positive, got {height}x{width}"));
            }
            _ => {}
        }
        if self.crop_size.height == 0 || self.crop_size.width == 0 {
            return bad(
                "crop_size",
                format!(
                    "must be positive, got {}x{}",
                    self.crop_size.height, self.crop_size.width
                ),
            );
        }
        if !self.rescale_factor.is_finite() {
            return bad(
                "rescale_factor",
                format!("must be finite, got {}", self.rescale_factor),
            );
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return bad(
                "image_std",
                format!("must be finite and non-zero, got {:?}", self.image_std),
            );
        }
        if self.image_mean.iter().any(|m| !m.is_finite()) {
            return bad(
                "image_mean",
                format!("must be finite, got {:?}", self.image_mean),
            );
        }
        Ok(())
    }

    /// XTuner's `expand2square` background: `int(mean * 255)` per channel
    /// ((122, 116, 104) for CLIP's mean).
    pub fn background(&self) -> [u8; 3] {
        // `as u8` saturates, which is what a mean outside [0, 1] deserves.
        self.image_mean.map(|m| (m * 255.0).trunc() as u8)
    }
}

/// Where `size` sends the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSize")]
pub enum ResizeTarget {
    /// Scale so the shorter side is `n`, keeping the aspect ratio
    /// (the longer side becomes `int(n · long / short)`).
    ShortestEdge(usize),
    /// Scale to exactly `height` × `width`.
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// `size` as written: an integer or a dict (`get_size_dict(default_to_square=False)`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Int(usize),
    Dict {
        shortest_edge: Option<usize>,
        height: Option<usize>,
        width: Option<usize>,
    },
}

impl TryFrom<RawSize> for ResizeTarget {
    type Error = String;

    fn try_from(raw: RawSize) -> Result<Self, String> {
        match raw {
            RawSize::Int(n)
            | RawSize::Dict {
                shortest_edge: Some(n),
                ..
            } => Ok(Self::ShortestEdge(n)),
            RawSize::Dict {
                height: Some(height),
                width: Some(width),
                ..
            } => Ok(Self::Exact { height, width }),
            RawSize::Dict { .. } => {
                Err("`size` needs `shortest_edge` or both `height` and `width`".into())
            }
        }
    }
}

/// The center-crop size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawCrop")]
pub struct CropSize {
    /// Crop height.
    pub height: usize,
    /// Crop width.
    pub width: usize,
}

/// `crop_size` as written (`get_size_dict(default_to_square=True)`).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawCrop {
    Int(usize),
    Dict { height: usize, width: usize },
}

impl TryFrom<RawCrop> for CropSize {
    type Error = String;

    fn try_from(raw: RawCrop) -> Result<Self, String> {
        Ok(match raw {
            RawCrop::Int(n) => Self {
                height: n,
                width: n,
            },
            RawCrop::Dict { height, width } => Self { height, width },
        })
    }
}

fn yes() -> bool {
    true
}
fn default_size() -> ResizeTarget {
    ResizeTarget::ShortestEdge(224)
}
fn default_crop() -> CropSize {
    CropSize {
        height: 224,
        width: 224,
    }
}
fn default_rescale_factor() -> f64 {
    1.0 / 255.0
}
fn clip_mean() -> [f64; 3] {
    OPENAI_CLIP_MEAN
}
fn clip_std() -> [f64; 3] {
    OPENAI_CLIP_STD
}

/// `image_mean` / `image_std`: three numbers, or one for every channel.
fn channels<'de, D: serde::Deserializer<'de>>(de: D) -> Result<[f64; 3], D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(f64),
        Three([f64; 3]),
    }
    Ok(match Raw::deserialize(de)? {
        Raw::One(v) => [v; 3],
        Raw::Three(v) => v,
    })
}

/// XTuner's LLaVA image pipeline: a processor config plus the `pad_image_to_square`
/// switch (on for fine-tuning, chat and evaluation; off for pretraining).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    /// The `CLIPImageProcessor` settings.
    pub config: ImageProcessorConfig,
    /// Whether to `expand2square` with the mean colour before the processor.
    pub pad_to_square: bool,
}

impl ImageProcessor {
    /// A processor from validated settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `config` does not validate.
    pub fn new(config: ImageProcessorConfig, pad_to_square: bool) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            pad_to_square,
        })
    }

    /// A processor reading `preprocessor_config.json` at `path`.
    ///
    /// # Errors
    /// As [`ImageProcessorConfig::from_file`].
    pub fn from_file(path: impl AsRef<Path>, pad_to_square: bool) -> Result<Self> {
        Ok(Self {
            config: ImageProcessorConfig::from_file(path)?,
            pad_to_square,
        })
    }

    /// Preprocesses an RGB image into `pixel_values`.
    ///
    /// # Shapes
    /// Output `[3, H, W]` f32, channel-major: `H × W` is the crop size when cropping is
    /// on, else the resized size.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an image with no pixels.
    pub fn preprocess(&self, image: &RgbImage) -> Result<TensorData> {
        let (w, h) = image.dimensions();
        if w == 0 || h == 0 {
            return Err(Error::InvalidInput {
                name: "image",
                message: format!("image is empty ({w}x{h})"),
            });
        }
        let cfg = &self.config;
        let padded;
        let mut image = if self.pad_to_square {
            padded = expand_to_square(image, cfg.background());
            &padded
        } else {
            image
        };
        let resized;
        if cfg.do_resize {
            let [out_h, out_w] =
                resize_output_size(image.height() as usize, image.width() as usize, cfg.size);
            resized = resize(image, out_w, out_h, cfg.resample);
            image = &resized;
        }
        let cropped;
        if cfg.do_center_crop {
            cropped = center_crop(image, cfg.crop_size.height, cfg.crop_size.width);
            image = &cropped;
        }
        Ok(self.to_pixel_values(image))
    }

    /// Opens the image file at `path` and preprocesses it onto `device`.
    ///
    /// # Shapes
    /// Output `[3, H, W]`, as [`ImageProcessor::preprocess`].
    ///
    /// # Errors
    /// [`Error::Image`] naming the file when it is missing, unreadable or undecodable.
    pub fn preprocess_file<B: Backend>(
        &self,
        path: impl AsRef<Path>,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>> {
        Ok(Tensor::from_data(
            self.preprocess_path(path.as_ref())?,
            device,
        ))
    }

    /// A training batch's `pixel_values`, the images decoded and preprocessed in
    /// parallel; `None` (a text-only sample) gives the blank image.
    ///
    /// # Shapes
    /// Output `[N, 3, H, W]` for N `files`.
    ///
    /// # Errors
    /// [`Error::Image`] naming the first file that is missing, unreadable or
    /// undecodable; [`Error::InvalidInput`] for no files.
    pub fn preprocess_batch<B: Backend>(
        &self,
        files: &[Option<PathBuf>],
        device: &B::Device,
    ) -> Result<Tensor<B, 4>> {
        let data = files
            .par_iter()
            .map(|file| match file {
                Some(path) => self.preprocess_path(path),
                None => Ok(self.blank()),
            })
            .collect::<Result<Vec<_>>>()?;
        stack_pixel_values(
            data.into_iter()
                .map(|d| Tensor::from_data(d, device))
                .collect(),
        )
    }

    fn preprocess_path(&self, path: &Path) -> Result<TensorData> {
        let image = open_rgb(path)?;
        self.preprocess(&image).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// The all-zero `pixel_values` that XTuner's dataset gives a text-only sample
    /// (`torch.zeros(3, crop_h, crop_w)`): it still fills an image slot of the batch.
    ///
    /// # Shapes
    /// Output `[3, crop_height, crop_width]`.
    pub fn blank(&self) -> TensorData {
        TensorData::zeros::<f32, _>([3, self.config.crop_size.height, self.config.crop_size.width])
    }

    /// Rescales and normalizes `u8` RGB into channel-major f32, as HF's `rescale`
    /// (`x · factor`) then `normalize` (`(x − mean) / std`).
    fn to_pixel_values(&self, image: &RgbImage) -> TensorData {
        let cfg = &self.config;
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut values = vec![0.0f32; 3 * h * w];
        for (i, pixel) in image.pixels().enumerate() {
            for (c, &v) in pixel.0.iter().enumerate() {
                let mut x = f64::from(v);
                if cfg.do_rescale {
                    x *= cfg.rescale_factor;
                }
                if cfg.do_normalize {
                    x = (x - cfg.image_mean[c]) / cfg.image_std[c];
                }
                values[c * h * w + i] = x as f32;
            }
        }
        TensorData::new(values, [3, h, w])
    }
}

/// Opens an image file and converts it to 8-bit RGB (`Image.open(p).convert('RGB')`;
/// alpha is dropped, as PIL does).
///
/// # Errors
/// [`Error::Image`] naming the file when it is missing, unreadable or undecodable.
pub fn open_rgb(path: impl AsRef<Path>) -> Result<RgbImage> {
    let path = path.as_ref();
    let err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    let reader = ::image::ImageReader::open(path).map_err(|e| err(e.to_string()))?;
    let reader = reader
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?;
    let image = reader.decode().map_err(|e| err(e.to_string()))?;
    Ok(image.to_rgb8())
}

/// Checks that `path` is an image file this crate decodes, reading only its header
/// (fast enough to check a data set's images before training starts). Returns
/// `(width, height)`.
///
/// # Errors
/// [`Error::Image`] naming the file when it is missing or not a readable image.
pub fn probe(path: impl AsRef<Path>) -> Result<(u32, u32)> {
    let path = path.as_ref();
    let err = |message: String| Error::Image {
        path: path.to_path_buf(),
        message,
    };
    ::image::ImageReader::open(path)
        .map_err(|e| err(e.to_string()))?
        .with_guessed_format()
        .map_err(|e| err(e.to_string()))?
        .into_dimensions()
        .map_err(|e| err(e.to_string()))
}

/// Stacks per-image `pixel_values` into a batch.
///
/// # Shapes
/// `images`: N × `[3, H, W]` → `[N, 3, H, W]`.
///
/// # Errors
/// [`Error::InvalidInput`] when `images` is empty or the sizes differ.
pub fn stack_pixel_values<B: Backend>(images: Vec<Tensor<B, 3>>) -> Result<Tensor<B, 4>> {
    let Some(first) = images.first() else {
        return Err(Error::InvalidInput {
            name: "pixel_values",
            message: "no images to stack".into(),
        });
    };
    let dims = first.dims();
    if let Some((i, other)) = images.iter().enumerate().find(|(_, t)| t.dims() != dims) {
        return Err(Error::InvalidInput {
            name: "pixel_values",
            message: format!("image {i} is {:?}, image 0 is {dims:?}", other.dims()),
        });
    }
    Ok(Tensor::stack(images, 0))
}

/// XTuner's `expand2square`: pastes `image` centred on a square canvas of side
/// `max(w, h)` filled with `background`; the offset along the short side is
/// `(long − short) / 2`, rounded down (PIL `paste`).
pub fn expand_to_square(image: &RgbImage, background: [u8; 3]) -> RgbImage {
    let (w, h) = image.dimensions();
    if w == h {
        return image.clone();
    }
    let side = w.max(h);
    let mut canvas = RgbImage::from_pixel(side, side, ::image::Rgb(background));
    let (x0, y0) = ((side - w) / 2, (side - h) / 2);
    for (x, y, p) in image.enumerate_pixels() {
        canvas.put_pixel(x0 + x, y0 + y, *p);
    }
    canvas
}

/// HF's `get_resize_output_image_size(default_to_square=False)`: `[height, width]`.
fn resize_output_size(height: usize, width: usize, target: ResizeTarget) -> [usize; 2] {
    match target {
        ResizeTarget::Exact { height, width } => [height, width],
        ResizeTarget::ShortestEdge(short_out) => {
            let (short, long) = if width <= height {
                (width, height)
            } else {
                (height, width)
            };
            // Python: int(requested_short * long / short), a true division then truncation.
            let long_out = ((short_out * long) as f64 / short as f64) as usize;
            if width <= height {
                [long_out, short_out]
            } else {
                [short_out, long_out]
            }
        }
    }
}

/// HF's `center_crop`: the window starts at `(size − crop) // 2`; a crop larger than
/// the image pads with black, the image placed at `ceil((crop − size) / 2)`.
pub fn center_crop(image: &RgbImage, height: usize, width: usize) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    // Offset of the crop window in the image (>= 0), or of the image in the crop.
    let axis = |size: usize, crop: usize| -> (usize, usize) {
        if crop <= size {
            ((size - crop) / 2, 0)
        } else {
            (0, (crop - size).div_ceil(2))
        }
    };
    let (src_y, dst_y) = axis(in_h, height);
    let (src_x, dst_x) = axis(in_w, width);
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let inside =
            x >= dst_x && y >= dst_y && x - dst_x + src_x < in_w && y - dst_y + src_y < in_h;
        if inside {
            *image.get_pixel((x - dst_x + src_x) as u32, (y - dst_y + src_y) as u32)
        } else {
            ::image::Rgb([0, 0, 0])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestBackend;
    use crate::test_util::max_abs_diff;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        crate::test_support::fixture("clip-vit-tiny").join(name)
    }

    fn golden(key: &str) -> (Vec<f32>, Vec<usize>) {
        let bytes = std::fs::read(fixture("golden.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor(key).unwrap();
        let values = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (values, view.shape().to_vec())
    }

    #[test]
    fn fixture_image_matches_the_reference_pixel_values() {
        let processor =
            ImageProcessor::from_file(fixture("preprocessor_config.json"), true).unwrap();
        let pixels = processor
            .preprocess_file::<TestBackend>(fixture("image.png"), &Default::default())
            .unwrap();
        let (expected, shape) = golden("pixel_values_image_png");
        assert_eq!(shape, [1, 3, 28, 28]);
        assert_eq!(pixels.dims(), [3, 28, 28]);
        let got = pixels.into_data().to_vec::<f32>().unwrap();
        let err = max_abs_diff(&got, &expected);
        // README tolerance is 2e-2; a faithful port of PIL's resampler is exact up to
        // f32 rounding of the normalisation.
        assert!(err < 1e-5, "max-abs {err}");
    }

    #[test]
    fn reads_the_fixture_config() {
        let config = ImageProcessorConfig::from_file(fixture("preprocessor_config.json")).unwrap();
        assert_eq!(config.size, ResizeTarget::ShortestEdge(28));
        assert_eq!(
            config.crop_size,
            CropSize {
                height: 28,
                width: 28
            }
        );
        assert_eq!(config.resample, Resample::Bicubic);
        assert_eq!(config.background(), [122, 116, 104]);
    }

    #[test]
    fn config_accepts_the_short_forms_and_defaults() {
        let config: ImageProcessorConfig = serde_json::from_str(
            r#"{"size": 336, "crop_size": 336, "image_mean": 0.5, "image_std": [1, 2, 3]}"#,
        )
        .unwrap();
        assert_eq!(config.size, ResizeTarget::ShortestEdge(336));
        assert_eq!(
            config.crop_size,
            CropSize {
                height: 336,
                width: 336
            }
        );
        assert_eq!(config.image_mean, [0.5; 3]);
        assert_eq!(config.image_std, [1.0, 2.0, 3.0]);
        let exact: ImageProcessorConfig =
            serde_json::from_str(r#"{"size": {"height": 3, "width": 4}}"#).unwrap();
        assert_eq!(
            exact.size,
            ResizeTarget::Exact {
                height: 3,
                width: 4
            }
        );
        let defaults: ImageProcessorConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(defaults, ImageProcessorConfig::default());
        assert!(serde_json::from_str::<ImageProcessorConfig>(r#"{"resample": 9}"#).is_err());
        assert!(
            serde_json::from_str::<ImageProcessorConfig>(r#"{"size": {"longest_edge": 9}}"#)
                .is_err()
        );
        let zero = ImageProcessorConfig {
            crop_size: CropSize {
                height: 0,
                width: 4,
            },
            ..Default::default()
        };
        assert!(ImageProcessor::new(zero, true).is_err());
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let processor = ImageProcessor::new(ImageProcessorConfig::default(), true).unwrap();
        let missing = dir.path().join("missing.png");
        let err = processor
            .preprocess_file::<TestBackend>(&missing, &Default::default())
            .unwrap_err();
        assert!(
            matches!(&err, Error::Image { path, .. } if *path == missing),
            "{err}"
        );
        let garbage = dir.path().join("garbage.jpg");
        std::fs::write(&garbage, b"not an image").unwrap();
        let err = processor
            .preprocess_file::<TestBackend>(&garbage, &Default::default())
            .unwrap_err();
        assert!(err.to_string().contains("garbage.jpg"), "{err}");
        let err = ImageProcessorConfig::from_file(dir.path().join("nope.json")).unwrap_err();
        assert!(err.to_string().contains("nope.json"), "{err}");
    }

    #[test]
    fn expand_to_square_centres_with_the_floor_offset() {
        let image = RgbImage::from_pixel(4, 1, ::image::Rgb([9, 9, 9]));
        let square = expand_to_square(&image, [1, 2, 3]);
        assert_eq!(square.dimensions(), (4, 4));
        // (4 - 1) // 2 = 1: row 1 holds the image.
        assert_eq!(square.get_pixel(0, 1).0, [9, 9, 9]);
        assert_eq!(square.get_pixel(0, 0).0, [1, 2, 3]);
        assert_eq!(square.get_pixel(0, 2).0, [1, 2, 3]);
        let tall = expand_to_square(
            &RgbImage::from_pixel(1, 2, ::image::Rgb([9, 9, 9])),
            [0, 0, 0],
        );
        assert_eq!(tall.get_pixel(0, 0).0, [9, 9, 9]);
        assert_eq!(tall.get_pixel(1, 0).0, [0, 0, 0]);
    }

    #[test]
    fn center_crop_follows_hf_rounding_and_pads() {
        let image = RgbImage::from_fn(5, 3, |x, y| ::image::Rgb([x as u8, y as u8, 0]));
        let crop = center_crop(&image, 2, 2);
        // top = (3 - 2) // 2 = 0, left = (5 - 2) // 2 = 1.
        assert_eq!(crop.get_pixel(0, 0).0, [1, 0, 0]);
        assert_eq!(crop.get_pixel(1, 1).0, [2, 1, 0]);
        let padded = center_crop(&image, 6, 5);
        // The image sits at row ceil((6 - 3) / 2) = 2; rows 0, 1 and 5 are black.
        assert_eq!(padded.get_pixel(3, 2).0, [3, 0, 0]);
        assert_eq!(padded.get_pixel(3, 1).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(3, 4).0, [3, 2, 0]);
    }

    #[test]
    fn stacking_checks_sizes() {
        let device = Default::default();
        let a = Tensor::<TestBackend, 3>::zeros([3, 2, 2], &device);
        let b = Tensor::<TestBackend, 3>::zeros([3, 2, 3], &device);
        assert_eq!(
            stack_pixel_values(vec![a.clone(), a.clone()])
                .unwrap()
                .dims(),
            [2, 3, 2, 2]
        );
        assert!(stack_pixel_values(vec![a, b]).is_err());
        assert!(stack_pixel_values::<TestBackend>(vec![]).is_err());
    }
}
