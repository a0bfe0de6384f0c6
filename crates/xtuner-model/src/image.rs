//! Image preprocessing for LLaVA, as XTuner's `LLaVADataset.__getitem__` does it: open
//! the file as RGB, optionally `expand2square` (paste the image centred on a square
//! canvas filled with the mean colour), then Hugging Face's (slow, PIL-based)
//! `CLIPImageProcessor.preprocess`: resize, center-crop, rescale, normalize.
//!
//! Settings come from the vision tower's `preprocessor_config.json`
//! ([`ImageProcessorConfig`]); the output is `pixel_values` `[3, H, W]` in f32.
//!
//! Resampling is a port of Pillow's `Image.resize` for 8-bit images
//! (`libImaging/Resample.c`): separable convolution whose support widens by the
//! downscale factor (antialiasing), coefficients in 22-bit fixed point, and a rounded,
//! clamped `u8` after each pass, horizontal first. Hugging Face's (slow) processor
//! resizes the `u8` image with PIL, so this reproduces its output bit for bit (the
//! clip-vit-tiny fixture agrees to 1.2e-7, f32 rounding of the normalisation). Pillow
//! 13 runs the vertical pass first when the height shrinks much more than the width
//! (Pillow PR #9549), which can move such outputs by a few grey levels; CLIP's resize
//! scales both axes alike, where every Pillow version goes horizontal first. The `image`
//! crate's `imageops::resize` with `FilterType::CatmullRom` (the same cubic, a = -0.5)
//! is not used: it rounds differently, off by up to 2 grey levels on the fixture
//! (max-abs 2.9e-2 after normalisation, over the 2e-2 tolerance).

use std::path::Path;

use ::image::RgbImage;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::Deserialize;

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
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| Error::BadConfig {
            path: path.to_path_buf(),
            message,
        };
        let config: Self = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        config.validate().map_err(|e| bad(e.to_string()))?;
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

/// PIL's resampling filters, by their integer codes in `preprocessor_config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "u8")]
pub enum Resample {
    /// `0`: nearest neighbour.
    Nearest,
    /// `1`: Lanczos (a = 3).
    Lanczos,
    /// `2`: bilinear (triangle).
    Bilinear,
    /// `3`: bicubic (Keys cubic, a = -0.5); the CLIP default.
    #[default]
    Bicubic,
    /// `4`: box.
    Box,
    /// `5`: Hamming-windowed sinc.
    Hamming,
}

impl TryFrom<u8> for Resample {
    type Error = String;

    fn try_from(code: u8) -> Result<Self, String> {
        Ok(match code {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => {
                return Err(format!(
                    "unknown PIL resample filter {code} (expected 0..=5)"
                ));
            }
        })
    }
}

impl Resample {
    /// The filter's support radius at scale 1 (PIL's `struct filter`).
    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    /// The filter's kernel (PIL's `*_filter` functions).
    fn kernel(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => (1.0 - x.abs()).max(0.0),
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    x.sin() / x * (0.54 + 0.46 * x.cos())
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if -3.0 < x && x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
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
        let path = path.as_ref();
        let image = open_rgb(path)?;
        let data = self.preprocess(&image).map_err(|e| Error::Image {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Tensor::from_data(data, device))
    }

    /// The all-zero `pixel_values` that XTuner's dataset gives a text-only sample
    /// (`torch.zeros(3, crop_h, crop_w)`): it still fills an image slot of the batch.
    ///
    /// # Shapes
    /// Output `[3, crop_height, crop_width]`.
    pub fn blank<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3> {
        Tensor::zeros(
            [3, self.config.crop_size.height, self.config.crop_size.width],
            device,
        )
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

/// Resizes like Pillow's `Image.resize(size, resample)` on an 8-bit RGB image
/// (`reducing_gap=None`, the whole image as the box): horizontal pass, then vertical,
/// each rounding back to `u8`. A side whose size does not change is not resampled.
pub fn resize(image: &RgbImage, width: usize, height: usize, resample: Resample) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    if (width, height) == (in_w, in_h) || width == 0 || height == 0 || in_w == 0 || in_h == 0 {
        return if width == 0 || height == 0 {
            RgbImage::new(width as u32, height as u32)
        } else {
            image.clone()
        };
    }
    if resample == Resample::Nearest {
        return resize_nearest(image, width, height);
    }
    let mut pixels: Vec<u8> = image.as_raw().clone();
    let (mut cur_w, mut cur_h) = (in_w, in_h);
    if width != cur_w {
        let coeffs = Coefficients::new(cur_w, width, resample);
        let mut out = vec![0u8; width * cur_h * 3];
        for y in 0..cur_h {
            let row = &pixels[y * cur_w * 3..(y + 1) * cur_w * 3];
            for x in 0..width {
                let (start, taps) = coeffs.taps(x);
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, &k) in taps.iter().enumerate() {
                        acc += i64::from(row[(start + j) * 3 + c]) * i64::from(k);
                    }
                    out[(y * width + x) * 3 + c] = clip8(acc);
                }
            }
        }
        pixels = out;
        cur_w = width;
    }
    if height != cur_h {
        let coeffs = Coefficients::new(cur_h, height, resample);
        let mut out = vec![0u8; cur_w * height * 3];
        for y in 0..height {
            let (start, taps) = coeffs.taps(y);
            for x in 0..cur_w {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (j, &k) in taps.iter().enumerate() {
                        acc += i64::from(pixels[((start + j) * cur_w + x) * 3 + c]) * i64::from(k);
                    }
                    out[(y * cur_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        pixels = out;
        cur_h = height;
    }
    // The buffer is exactly cur_w × cur_h × 3 by construction.
    RgbImage::from_raw(cur_w as u32, cur_h as u32, pixels)
        .unwrap_or_else(|| RgbImage::new(cur_w as u32, cur_h as u32))
}

/// Fixed-point precision of Pillow's 8-bit resampler (`32 − 8 − 2`).
const PRECISION_BITS: u32 = 22;

/// Pillow's `clip8`: drop the fraction of a fixed-point sum and clamp to `0..=255`.
fn clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PRECISION_BITS) << 8 {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// One resampling pass's taps (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`):
/// for each output index, the first input index and the fixed-point weights.
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

impl Coefficients {
    fn new(in_size: usize, out_size: usize, filter: Resample) -> Self {
        let scale = in_size as f64 / out_size as f64;
        // Downscaling widens the kernel by the scale factor: this is the antialiasing.
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut k = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero; Rust's `as` does too.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(xmin as i64) as usize
                - xmin;
            let xmax = xmax.min(ksize);
            let mut ww = 0.0;
            for (x, kx) in k.iter_mut().enumerate().take(xmax) {
                let w = filter.kernel(((x + xmin) as f64 - center + 0.5) * ss);
                *kx = w;
                ww += w;
            }
            for (x, kx) in k.iter().enumerate().take(xmax) {
                let w = if ww != 0.0 { kx / ww } else { *kx };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                weights[xx * ksize + x] = if w < 0.0 {
                    (fixed - 0.5) as i32
                } else {
                    (fixed + 0.5) as i32
                };
            }
            bounds.push((xmin, xmax));
        }
        Self {
            ksize,
            bounds,
            weights,
        }
    }

    /// The first input index and the weights of output index `i`.
    fn taps(&self, i: usize) -> (usize, &[i32]) {
        let (start, len) = self.bounds[i];
        (start, &self.weights[i * self.ksize..i * self.ksize + len])
    }
}

/// Pillow's nearest-neighbour resize: source index `floor((i + 0.5) · in / out)`.
fn resize_nearest(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (sx, sy) = (in_w as f64 / width as f64, in_h as f64 / height as f64);
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let src_x = (((f64::from(x) + 0.5) * sx) as usize).min(in_w - 1);
        let src_y = (((f64::from(y) + 0.5) * sy) as usize).min(in_h - 1);
        *image.get_pixel(src_x as u32, src_y as u32)
    })
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
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/clip-vit-tiny")
            .join(name)
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

    fn max_abs(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
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
        let err = max_abs(&got, &expected);
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
    fn resize_keeps_constant_images_and_aspect() {
        let flat = RgbImage::from_pixel(37, 23, ::image::Rgb([200, 17, 90]));
        for filter in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
            Resample::Nearest,
        ] {
            let out = resize(&flat, 11, 50, filter);
            assert_eq!(out.dimensions(), (11, 50));
            assert!(out.pixels().all(|p| p.0 == [200, 17, 90]), "{filter:?}");
        }
        assert_eq!(
            resize_output_size(24, 40, ResizeTarget::ShortestEdge(28)),
            [28, 46]
        );
        assert_eq!(
            resize_output_size(40, 24, ResizeTarget::ShortestEdge(28)),
            [46, 28]
        );
    }

    /// Expected outputs computed by Pillow 13 `Image.resize` on the 6×4 pattern below.
    #[test]
    fn resize_matches_pillow_bit_for_bit() {
        let source = RgbImage::from_fn(6, 4, |x, y| {
            ::image::Rgb([
                ((x * 53 + y * 31) % 256) as u8,
                ((x * x * 17 + y * 7) % 256) as u8,
                (255 - x * 40 - y * 9) as u8,
            ])
        });
        let cases: [(usize, usize, Resample, &[u8]); 4] = [
            (
                9,
                6,
                Resample::Bicubic,
                &[
                    0, 0, 255, 20, 5, 240, 60, 23, 209, 95, 57, 183, 131, 122, 156, 169, 140, 129,
                    216, 25, 103, 106, 89, 72, 0, 179, 53, 11, 2, 253, 35, 8, 235, 75, 26, 204,
                    110, 60, 178, 145, 125, 151, 186, 143, 124, 245, 28, 98, 129, 92, 67, 10, 182,
                    48, 33, 7, 248, 58, 13, 228, 98, 31, 197, 133, 65, 171, 171, 130, 144, 203,
                    148, 117, 225, 33, 91, 128, 97, 60, 34, 187, 41, 54, 12, 242, 79, 18, 223, 119,
                    36, 192, 154, 70, 166, 204, 135, 139, 198, 153, 112, 64, 38, 86, 45, 102, 55,
                    67, 192, 36, 77, 17, 235, 102, 23, 216, 142, 41, 185, 177, 75, 159, 230, 140,
                    132, 215, 158, 105, 44, 43, 79, 44, 107, 48, 93, 197, 29, 92, 20, 230, 117, 26,
                    211, 157, 44, 180, 192, 78, 154, 244, 143, 127, 232, 161, 100, 73, 46, 74, 67,
                    110, 43, 107, 200, 24,
                ],
            ),
            (
                4,
                3,
                Resample::Bicubic,
                &[
                    21, 4, 241, 96, 62, 185, 195, 101, 121, 94, 111, 65, 62, 14, 230, 143, 72, 174,
                    183, 111, 110, 78, 121, 54, 102, 23, 218, 189, 81, 162, 171, 120, 98, 62, 130,
                    42,
                ],
            ),
            (
                3,
                2,
                Resample::Lanczos,
                &[
                    39, 13, 231, 163, 93, 150, 126, 108, 69, 107, 26, 214, 194, 106, 133, 82, 121,
                    52,
                ],
            ),
            (
                8,
                3,
                Resample::Bilinear,
                &[
                    9, 2, 252, 42, 13, 227, 82, 38, 197, 122, 81, 167, 161, 144, 137, 201, 69, 107,
                    145, 75, 77, 18, 171, 52, 47, 11, 242, 80, 22, 217, 120, 47, 187, 160, 90, 157,
                    199, 153, 127, 159, 78, 97, 103, 84, 67, 56, 180, 42, 84, 19, 231, 117, 30,
                    206, 157, 55, 176, 197, 98, 146, 236, 161, 116, 116, 86, 86, 60, 92, 56, 93,
                    188, 31,
                ],
            ),
        ];
        for (w, h, filter, expected) in cases {
            let out = resize(&source, w, h, filter);
            assert_eq!(out.as_raw().as_slice(), expected, "{w}x{h} {filter:?}");
        }
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
