//! Image decoding and resampling: the one place where lorakit turns image files into pixels.
//!
//! * [`open`] / [`decode`] read PNG, JPEG, WebP, BMP (and GIF: first frame) with explicit
//!   decompression-bomb limits, apply the EXIF orientation only when asked ([`DecodeOptions`];
//!   sd-scripts never does) and report every failure as an [`Error::BadFile`] naming the file.
//! * [`LoadedImage`] converts any decoded mode (16-bit, grey, palette, CMYK JPEG, alpha) to the
//!   8-bit RGB / RGBA buffers the stages use.
//! * The resamplers reproduce, bit for bit, the two libraries sd-scripts resizes with:
//!   OpenCV `INTER_AREA` ([`resize_area`]) for shrinking and Pillow's convolution filters
//!   ([`resize_lanczos`], [`resize_bicubic`]) for enlarging and for BLIP.
//!   [`resize_sd_scripts`] applies sd-scripts' rule for choosing between them.

use std::io::{BufReader, Cursor};
use std::path::Path;

use image::{
    DynamicImage, ImageBuffer, ImageDecoder, ImageError, ImageReader, Pixel, RgbImage, RgbaImage,
};
use rayon::prelude::*;

use crate::{Error, Result};

/// Largest image (in pixels) decoded by default: Pillow's own decompression-bomb error threshold
/// (twice its `MAX_IMAGE_PIXELS` warning level).
pub const DEFAULT_MAX_PIXELS: u64 = 178_956_970;

/// Longest image side decoded by default.
pub const DEFAULT_MAX_SIDE: u32 = 65_535;

/// Decompression-bomb limits, checked from the file header before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Maximum `width * height`.
    pub max_pixels: u64,
    /// Maximum width and maximum height.
    pub max_side: u32,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: DEFAULT_MAX_PIXELS,
            max_side: DEFAULT_MAX_SIDE,
        }
    }
}

/// How the stages decode image files: the limits and whether EXIF orientation is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeOptions {
    /// Decompression-bomb limits.
    pub limits: DecodeLimits,
    /// Turn images upright by their EXIF orientation tag (Pillow's `exif_transpose`). Off by
    /// default because sd-scripts reads the stored pixels as they are.
    pub exif_transpose: bool,
}

impl DecodeOptions {
    /// The part of the options that changes decoded pixels, as text for content keys.
    pub fn key_text(&self) -> &'static str {
        if self.exif_transpose {
            "exif-transpose"
        } else {
            "stored-orientation"
        }
    }
}

impl DecodeLimits {
    /// The same limits expressed for the `image` crate (its allocation cap sized for the largest
    /// allowed 16-bit RGBA image).
    fn decoder_limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(self.max_side);
        limits.max_image_height = Some(self.max_side);
        limits.max_alloc = Some(self.max_pixels.saturating_mul(8));
        limits
    }

    /// Rejects a `(width, height)` above the limits with a message naming the file.
    fn check(&self, path: &Path, (width, height): (u32, u32)) -> Result<()> {
        let pixels = u64::from(width) * u64::from(height);
        if width > self.max_side || height > self.max_side || pixels > self.max_pixels {
            return Err(Error::bad_file(
                path,
                format!(
                    "image is {width}x{height} ({pixels} pixels), above the decompression-bomb \
                     limits ({} pixels, {} per side); raise the limit (--max_image_pixels) only \
                     if you trust the file",
                    self.max_pixels, self.max_side
                ),
            ));
        }
        Ok(())
    }
}

/// A decoded image with its EXIF orientation already applied.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    image: DynamicImage,
}

impl LoadedImage {
    /// Wraps an already decoded image.
    pub fn new(image: DynamicImage) -> Self {
        LoadedImage { image }
    }

    /// `(width, height)` after orientation: the size sd-scripts records as `original_size`.
    pub fn original_size(&self) -> (u32, u32) {
        (self.image.width(), self.image.height())
    }

    /// Whether the decoded image carries an alpha channel (including palette or colour-key
    /// transparency, which the decoder expands to alpha).
    pub fn has_alpha(&self) -> bool {
        self.image.color().has_alpha()
    }

    /// The decoded image in its own mode.
    pub fn image(&self) -> &DynamicImage {
        &self.image
    }

    /// 8-bit RGB: alpha dropped (as Pillow's `convert("RGB")`), grey replicated, 16-bit
    /// samples reduced to their high byte (as Pillow reads 16-bit PNGs).
    pub fn to_rgb8(&self) -> RgbImage {
        self.eight_bit().to_rgb8()
    }

    /// 8-bit RGBA (opaque alpha added when the image has none).
    pub fn to_rgba8(&self) -> RgbaImage {
        self.eight_bit().to_rgba8()
    }

    /// The image with 16-bit samples reduced to their high byte; other modes unchanged.
    fn eight_bit(&self) -> std::borrow::Cow<'_, DynamicImage> {
        use std::borrow::Cow;
        fn high_bytes<P, Q>(image: &ImageBuffer<P, Vec<u16>>) -> ImageBuffer<Q, Vec<u8>>
        where
            P: Pixel<Subpixel = u16>,
            Q: Pixel<Subpixel = u8>,
        {
            let bytes = image.as_raw().iter().map(|v| (v >> 8) as u8).collect();
            ImageBuffer::from_raw(image.width(), image.height(), bytes).expect("same layout")
        }
        match &self.image {
            DynamicImage::ImageLuma16(i) => Cow::Owned(DynamicImage::ImageLuma8(high_bytes(i))),
            DynamicImage::ImageLumaA16(i) => Cow::Owned(DynamicImage::ImageLumaA8(high_bytes(i))),
            DynamicImage::ImageRgb16(i) => Cow::Owned(DynamicImage::ImageRgb8(high_bytes(i))),
            DynamicImage::ImageRgba16(i) => Cow::Owned(DynamicImage::ImageRgba8(high_bytes(i))),
            other => Cow::Borrowed(other),
        }
    }

    /// 8-bit RGB with transparent parts composited onto white, exactly as Pillow's
    /// `white_canvas.paste(rgba, mask=alpha)`: `(255 * (255 - a) + c * a) / 255` rounded.
    pub fn composite_on_white(&self) -> RgbImage {
        if !self.has_alpha() {
            return self.to_rgb8();
        }
        let rgba = self.to_rgba8();
        let (width, height) = rgba.dimensions();
        let mut out = RgbImage::new(width, height);
        for (target, source) in out.pixels_mut().zip(rgba.pixels()) {
            let alpha = u32::from(source[3]);
            for channel in 0..3 {
                let mixed = 255 * (255 - alpha) + u32::from(source[channel]) * alpha;
                target[channel] = div255(mixed);
            }
        }
        out
    }
}

/// Pillow's rounding division by 255 for blend results in `0..=255*255`.
fn div255(value: u32) -> u8 {
    let shifted = value + 128;
    (((shifted >> 8) + shifted) >> 8) as u8
}

/// Reads and decodes `path`.
pub fn open(path: &Path, options: &DecodeOptions) -> Result<LoadedImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode(path, &bytes, options)
}

/// Decodes the content `bytes` of the file `path` (named in errors): format guessed from the
/// content, limits checked from the header, EXIF orientation applied if the options say so.
pub fn decode(path: &Path, bytes: &[u8], options: &DecodeOptions) -> Result<LoadedImage> {
    if bytes.is_empty() {
        return Err(Error::bad_file(
            path,
            "empty file (0 bytes); re-export or remove it",
        ));
    }
    let limits = &options.limits;
    let mut decoder = decoder_for(path, Cursor::new(bytes), limits)?;
    limits.check(path, decoder.dimensions())?;
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills missing data with grey instead of failing (Pillow refuses).
        return Err(Error::bad_file(
            path,
            "truncated file (the JPEG data has no end marker after its last scan)",
        ));
    }
    let orientation = stated_orientation(&mut decoder, options.exif_transpose);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| describe(path, e))?;
    image.apply_orientation(orientation);
    Ok(LoadedImage { image })
}

/// The orientation to apply: the file's EXIF tag when `exif_transpose`, else none.
fn stated_orientation(
    decoder: &mut impl ImageDecoder,
    exif_transpose: bool,
) -> image::metadata::Orientation {
    let stated = if exif_transpose {
        decoder.orientation().ok()
    } else {
        None
    };
    stated.unwrap_or(image::metadata::Orientation::NoTransforms)
}

/// Whether a JPEG stream has an end-of-image marker after its last start-of-scan (markers
/// cannot occur inside entropy-coded data, which stuffs every 0xFF byte).
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    matches!((last(0xDA), last(0xD9)), (Some(scan), Some(end)) if end > scan)
}

/// `(width, height)` of `path` read from its header only, as [`decode`] with `exif_transpose`
/// would return it.
pub fn image_size(path: &Path, exif_transpose: bool) -> Result<(u32, u32)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    if file.metadata().map_err(|e| Error::io(path, e))?.len() == 0 {
        return Err(Error::bad_file(
            path,
            "empty file (0 bytes); re-export or remove it",
        ));
    }
    let limits = DecodeLimits {
        max_pixels: u64::MAX,
        max_side: u32::MAX,
    };
    let mut decoder = decoder_for(path, BufReader::new(file), &limits)?;
    let (width, height) = decoder.dimensions();
    Ok(
        if swaps_axes(stated_orientation(&mut decoder, exif_transpose)) {
            (height, width)
        } else {
            (width, height)
        },
    )
}

/// Whether an EXIF orientation exchanges width and height.
fn swaps_axes(orientation: image::metadata::Orientation) -> bool {
    use image::metadata::Orientation::*;
    matches!(
        orientation,
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH
    )
}

/// A header-initialised decoder for `reader`, the format guessed from the content.
fn decoder_for<'a, R: std::io::BufRead + std::io::Seek + 'a>(
    path: &Path,
    reader: R,
    limits: &DecodeLimits,
) -> Result<impl ImageDecoder + 'a> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    if reader.format().is_none() {
        return Err(Error::bad_file(
            path,
            "not a recognised image format (expected PNG, JPEG, WebP, BMP or GIF content)",
        ));
    }
    reader.limits(limits.decoder_limits());
    reader.into_decoder().map_err(|e| describe(path, e))
}

/// Turns a decoder error into a per-file message saying what is wrong.
fn describe(path: &Path, error: ImageError) -> Error {
    let message = match &error {
        ImageError::Limits(_) => format!(
            "image exceeds the decompression-bomb limits ({error}); raise the limit \
             (--max_image_pixels) only if you trust the file"
        ),
        ImageError::Unsupported(_) => format!("unsupported image variant: {error}"),
        ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "truncated file (ends before the image data is complete)".to_string()
        }
        _ => format!("corrupt or truncated image: {error}"),
    };
    Error::bad_file(path, message)
}

/// Resizes with sd-scripts' default rule (`--resize_interpolation` unset): OpenCV `INTER_AREA`
/// when neither side grows, Pillow `LANCZOS` otherwise.
pub fn resize_sd_scripts<P: Pixel<Subpixel = u8>>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> ImageBuffer<P, Vec<u8>> {
    if image.width() >= width && image.height() >= height {
        resize_area(image, width, height)
    } else {
        resize_lanczos(image, width, height)
    }
}

/// OpenCV `cv2.resize(..., interpolation=INTER_AREA)` for 8-bit images, bit-exact.
///
/// True area averaging is only defined when neither side grows; for an enlargement (which
/// sd-scripts never sends to `INTER_AREA`) the Pillow `LANCZOS` result is returned instead,
/// as [`resize_sd_scripts`] would.
pub fn resize_area<P: Pixel<Subpixel = u8>>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> ImageBuffer<P, Vec<u8>> {
    if image.width() < width || image.height() < height {
        return resize_lanczos(image, width, height);
    }
    let source = Plane::of(image);
    let pixels = if empty(&source, width, height) {
        vec![0; width as usize * height as usize * source.channels]
    } else {
        area::resize(&source, width as usize, height as usize)
    };
    ImageBuffer::from_raw(width, height, pixels).expect("buffer size matches")
}

/// Pillow `Image.resize(..., Image.LANCZOS)` for 8-bit images, bit-exact.
pub fn resize_lanczos<P: Pixel<Subpixel = u8>>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> ImageBuffer<P, Vec<u8>> {
    resize_pillow(image, width, height, pillow::Filter::Lanczos)
}

/// Pillow `Image.resize(..., Image.BICUBIC)` for 8-bit images, bit-exact.
pub fn resize_bicubic<P: Pixel<Subpixel = u8>>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> ImageBuffer<P, Vec<u8>> {
    resize_pillow(image, width, height, pillow::Filter::Bicubic)
}

fn resize_pillow<P: Pixel<Subpixel = u8>>(
    image: &ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    filter: pillow::Filter,
) -> ImageBuffer<P, Vec<u8>> {
    let source = Plane::of(image);
    let pixels = if empty(&source, width, height) {
        vec![0; width as usize * height as usize * source.channels]
    } else {
        pillow::resize(&source, width as usize, height as usize, filter)
    };
    ImageBuffer::from_raw(width, height, pixels).expect("buffer size matches")
}

/// Whether either the source or the target has no pixels (nothing to resample).
fn empty(source: &Plane, width: u32, height: u32) -> bool {
    source.width == 0 || source.height == 0 || width == 0 || height == 0
}

/// Borrowed interleaved 8-bit pixels.
struct Plane<'a> {
    data: &'a [u8],
    width: usize,
    height: usize,
    channels: usize,
}

impl<'a> Plane<'a> {
    fn of<P: Pixel<Subpixel = u8>>(image: &'a ImageBuffer<P, Vec<u8>>) -> Self {
        Plane {
            data: image.as_raw(),
            width: image.width() as usize,
            height: image.height() as usize,
            channels: usize::from(P::CHANNEL_COUNT),
        }
    }

    fn row(&self, y: usize) -> &'a [u8] {
        let stride = self.width * self.channels;
        &self.data[y * stride..(y + 1) * stride]
    }
}

/// OpenCV `INTER_AREA` (imgproc `resize.cpp`): an integer-factor block average when both
/// factors are whole numbers, otherwise fractional-coverage weights accumulated in `f32`.
mod area {
    use super::*;

    /// One source sample contributing to one destination sample.
    struct Tap {
        destination: usize,
        source: usize,
        weight: f32,
    }

    pub(super) fn resize(source: &Plane, width: usize, height: usize) -> Vec<u8> {
        if source.width == width && source.height == height {
            return source.data.to_vec();
        }
        // OpenCV derives the factors as the inverse of the inverse scale, in f64.
        let scale_x = 1.0 / (width as f64 / source.width as f64);
        let scale_y = 1.0 / (height as f64 / source.height as f64);
        let whole_x = scale_x.round_ties_even();
        let whole_y = scale_y.round_ties_even();
        if (scale_x - whole_x).abs() < f64::EPSILON && (scale_y - whole_y).abs() < f64::EPSILON {
            block_average(source, width, height, whole_x as usize, whole_y as usize)
        } else {
            fractional(source, width, height, scale_x, scale_y)
        }
    }

    /// Integer factors: sum of each block. 2x2 blocks of 1/3/4-channel images use
    /// `(sum + 2) >> 2`; everything else `round_half_even(sum * (1/area as f32))`.
    fn block_average(
        source: &Plane,
        width: usize,
        height: usize,
        factor_x: usize,
        factor_y: usize,
    ) -> Vec<u8> {
        let channels = source.channels;
        let area = factor_x * factor_y;
        let inverse_area = 1.0f32 / area as f32;
        let shift_path = factor_x == 2 && factor_y == 2 && matches!(channels, 1 | 3 | 4);
        let stride = width * channels;
        let mut out = vec![0u8; stride * height];
        out.par_chunks_mut(stride).enumerate().for_each(|(y, row)| {
            for x in 0..width {
                for c in 0..channels {
                    let mut sum = 0u32;
                    for dy in 0..factor_y {
                        let line = source.row(y * factor_y + dy);
                        for dx in 0..factor_x {
                            sum += u32::from(line[(x * factor_x + dx) * channels + c]);
                        }
                    }
                    row[x * channels + c] = if shift_path {
                        ((sum + 2) >> 2) as u8
                    } else {
                        saturate_u8(sum as f32 * inverse_area)
                    };
                }
            }
        });
        out
    }

    /// Coverage table of one axis (OpenCV `computeResizeAreaTab`), indices pre-multiplied by
    /// `channels`.
    fn taps(source_size: usize, target_size: usize, channels: usize, scale: f64) -> Vec<Tap> {
        let mut taps = Vec::with_capacity(source_size * 2);
        let source_len = source_size as f64;
        for target in 0..target_size {
            let start = target as f64 * scale;
            let end = start + scale;
            let cell = scale.min(source_len - start);
            let last = (end.floor() as i64).min(source_size as i64 - 1);
            let first = (start.ceil() as i64).min(last);
            let mut push = |source: i64, weight: f32| {
                taps.push(Tap {
                    destination: target * channels,
                    source: source as usize * channels,
                    weight,
                })
            };
            if first as f64 - start > 1e-3 {
                push(first - 1, ((first as f64 - start) / cell) as f32);
            }
            for source in first..last {
                push(source, (1.0 / cell) as f32);
            }
            if end - last as f64 > 1e-3 {
                push(last, ((end - last as f64).min(1.0).min(cell) / cell) as f32);
            }
        }
        taps
    }

    /// Non-integer factors: per destination row, accumulate `weight_y * row_sum` in f32 where
    /// each row sum accumulates `pixel * weight_x` in f32, in OpenCV's order. Every source
    /// row's horizontal sum is computed once (as OpenCV does) and shared by the destination
    /// rows it covers.
    fn fractional(
        source: &Plane,
        width: usize,
        height: usize,
        scale_x: f64,
        scale_y: f64,
    ) -> Vec<u8> {
        let channels = source.channels;
        let columns = taps(source.width, width, channels, scale_x);
        let rows = taps(source.height, height, 1, scale_y);
        let mut row_starts = vec![0usize; height + 1];
        for (index, tap) in rows.iter().enumerate().rev() {
            row_starts[tap.destination] = index;
        }
        row_starts[height] = rows.len();
        let stride = width * channels;
        let mut horizontal = vec![0f32; stride * source.height];
        horizontal
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(y, line)| {
                let pixels = source.row(y);
                for column in &columns {
                    for c in 0..channels {
                        line[column.destination + c] +=
                            f32::from(pixels[column.source + c]) * column.weight;
                    }
                }
            });
        let mut out = vec![0u8; stride * height];
        out.par_chunks_mut(stride).enumerate().for_each(|(y, row)| {
            let mut sum = vec![0f32; stride];
            for tap in &rows[row_starts[y]..row_starts[y + 1]] {
                let line = &horizontal[tap.source * stride..(tap.source + 1) * stride];
                for (total, value) in sum.iter_mut().zip(line) {
                    *total += tap.weight * value;
                }
            }
            for (target, value) in row.iter_mut().zip(&sum) {
                *target = saturate_u8(*value);
            }
        });
        out
    }

    /// OpenCV `saturate_cast<uchar>(float)`: round half to even, then clamp.
    fn saturate_u8(value: f32) -> u8 {
        value.round_ties_even().clamp(0.0, 255.0) as u8
    }
}

/// Pillow's separable convolution resampler (`libImaging/Resample.c`, 8 bits per channel):
/// f64 filter weights normalised per output sample, converted to 22-bit fixed point, a
/// horizontal pass to an 8-bit intermediate and a vertical pass.
mod pillow {
    use super::*;

    /// Fixed-point precision of the weights.
    const PRECISION_BITS: u32 = 32 - 8 - 2;

    /// The convolution kernels used by lorakit.
    #[derive(Debug, Clone, Copy)]
    pub(super) enum Filter {
        /// Lanczos, 3 lobes.
        Lanczos,
        /// Keys cubic with a = -0.5.
        Bicubic,
    }

    impl Filter {
        fn support(self) -> f64 {
            match self {
                Filter::Lanczos => 3.0,
                Filter::Bicubic => 2.0,
            }
        }

        fn weight(self, x: f64) -> f64 {
            match self {
                Filter::Lanczos => {
                    if (-3.0..3.0).contains(&x) {
                        sinc(x) * sinc(x / 3.0)
                    } else {
                        0.0
                    }
                }
                Filter::Bicubic => {
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
            }
        }
    }

    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }

    /// Per output sample: first source index, number of taps, and `ksize` fixed-point weights.
    struct Kernel {
        size: usize,
        bounds: Vec<(usize, usize)>,
        weights: Vec<i32>,
    }

    impl Kernel {
        fn new(source_size: usize, target_size: usize, filter: Filter) -> Self {
            let scale = source_size as f32 as f64 / target_size as f64;
            let filter_scale = scale.max(1.0);
            let support = filter.support() * filter_scale;
            let size = support.ceil() as usize * 2 + 1;
            let mut bounds = Vec::with_capacity(target_size);
            let mut weights = vec![0i32; target_size * size];
            let mut taps = vec![0f64; size];
            let inverse = 1.0 / filter_scale;
            for target in 0..target_size {
                let center = (target as f64 + 0.5) * scale;
                let first = ((center - support + 0.5) as i64).max(0);
                let end = ((center + support + 0.5) as i64).min(source_size as i64);
                let count = (end - first).max(0) as usize;
                let mut total = 0.0;
                for (offset, tap) in taps.iter_mut().enumerate().take(count) {
                    let w =
                        filter.weight(((offset as i64 + first) as f64 - center + 0.5) * inverse);
                    *tap = w;
                    total += w;
                }
                let row = &mut weights[target * size..(target + 1) * size];
                for (fixed, &tap) in row.iter_mut().zip(&taps[..count]) {
                    let normalised = if total != 0.0 { tap / total } else { tap };
                    let scaled = normalised * f64::from(1u32 << PRECISION_BITS);
                    *fixed = if normalised < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    };
                }
                bounds.push((first as usize, count));
            }
            Kernel {
                size,
                bounds,
                weights,
            }
        }

        fn taps(&self, target: usize) -> (usize, &[i32]) {
            let (first, count) = self.bounds[target];
            let start = target * self.size;
            (first, &self.weights[start..start + count])
        }
    }

    /// Rounds a fixed-point accumulator back to 8 bits, clamping.
    fn clip8(accumulator: i32) -> u8 {
        (accumulator >> PRECISION_BITS).clamp(0, 255) as u8
    }

    const HALF: i32 = 1 << (PRECISION_BITS - 1);

    /// Most channels of an 8-bit `image` pixel type (RGBA).
    const MAX_CHANNELS: usize = 4;

    pub(super) fn resize(source: &Plane, width: usize, height: usize, filter: Filter) -> Vec<u8> {
        if source.width == width && source.height == height {
            return source.data.to_vec();
        }
        let channels = source.channels;
        assert!(
            channels <= MAX_CHANNELS,
            "8-bit pixels have at most 4 channels"
        );
        let horizontal = Kernel::new(source.width, width, filter);
        let vertical = Kernel::new(source.height, height, filter);

        // Horizontal pass, restricted to the source rows the vertical pass will read.
        let (intermediate, first_row) = if width != source.width {
            let first_row = vertical.bounds[0].0;
            let (last_first, last_count) = vertical.bounds[height - 1];
            let last_row = last_first + last_count;
            let stride = width * channels;
            let mut rows = vec![0u8; stride * (last_row - first_row)];
            rows.par_chunks_mut(stride)
                .enumerate()
                .for_each(|(index, row)| {
                    let pixels = source.row(first_row + index);
                    for (x, target) in row.chunks_exact_mut(channels).enumerate() {
                        let (first, weights) = horizontal.taps(x);
                        let window = &pixels[first * channels..(first + weights.len()) * channels];
                        let mut sums = [HALF; MAX_CHANNELS];
                        for (pixel, &w) in window.chunks_exact(channels).zip(weights) {
                            for (sum, &value) in sums.iter_mut().zip(pixel) {
                                *sum += i32::from(value) * w;
                            }
                        }
                        for (value, &sum) in target.iter_mut().zip(&sums) {
                            *value = clip8(sum);
                        }
                    }
                });
            (std::borrow::Cow::Owned(rows), first_row)
        } else {
            (std::borrow::Cow::Borrowed(source.data), 0)
        };
        if height == source.height {
            return intermediate.into_owned();
        }

        let stride = width * channels;
        let mut out = vec![0u8; stride * height];
        out.par_chunks_mut(stride).enumerate().for_each(|(y, row)| {
            let (first, weights) = vertical.taps(y);
            let first = first - first_row;
            // Whole source rows at a time (integer sums: the order does not change the result).
            let mut sums = vec![HALF; stride];
            for (offset, &w) in weights.iter().enumerate() {
                let line = &intermediate[(first + offset) * stride..(first + offset + 1) * stride];
                for (sum, &value) in sums.iter_mut().zip(line) {
                    *sum += i32::from(value) * w;
                }
            }
            for (target, &sum) in row.iter_mut().zip(&sums) {
                *target = clip8(sum);
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::infra::test_support::fixtures;

    /// Reads a uint8 array from a golden `.npz`, with its shape.
    fn golden_u8(file: &str, name: &str) -> (Vec<u8>, Vec<u64>) {
        let path = fixtures().join("golden").join(file);
        let mut archive = npyz::npz::NpzArchive::open(&path).expect("golden npz present");
        let array = archive
            .by_name(name)
            .expect("readable npz")
            .unwrap_or_else(|| panic!("{name} missing in {}", path.display()));
        let shape = array.shape().to_vec();
        (array.into_vec::<u8>().expect("uint8 array"), shape)
    }

    fn golden_i64(file: &str, name: &str) -> Vec<i64> {
        let path = fixtures().join("golden").join(file);
        let mut archive = npyz::npz::NpzArchive::open(&path).expect("golden npz present");
        let array = archive.by_name(name).expect("readable npz").expect("key");
        array.into_vec::<i64>().expect("int64 array")
    }

    fn image(name: &str) -> LoadedImage {
        open(
            &fixtures().join("images").join(name),
            &DecodeOptions::default(),
        )
        .expect("fixture image decodes")
    }

    /// Max abs difference and count of differing bytes.
    fn compare(ours: &[u8], golden: &[u8]) -> (u8, usize) {
        assert_eq!(ours.len(), golden.len(), "sizes differ");
        ours.iter()
            .zip(golden)
            .fold((0, 0), |(max, count), (a, b)| {
                let d = a.abs_diff(*b);
                (max.max(d), count + usize::from(d != 0))
            })
    }

    /// The golden tagger input is BGR; compare our RGB result channel-swapped.
    fn to_bgr(rgb: &RgbImage) -> Vec<u8> {
        rgb.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect()
    }

    fn png_bytes(image: &DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .expect("encode png");
        bytes
    }

    fn message(result: Result<LoadedImage>) -> String {
        match result {
            Err(Error::BadFile { path, message }) => {
                assert_eq!(path, Path::new("x.png"));
                message
            }
            other => panic!("expected a per-file error, got {other:?}"),
        }
    }

    #[test]
    fn bad_files_are_per_file_errors() {
        let options = DecodeOptions::default();
        let path = Path::new("x.png");
        assert!(message(decode(path, b"", &options)).contains("empty file"));
        assert!(
            message(decode(path, b"hello world, not an image", &options))
                .contains("not a recognised image format")
        );

        let good = png_bytes(&DynamicImage::new_rgb8(64, 64));
        let truncated = &good[..good.len() / 2];
        assert!(decode(path, truncated, &options).is_err());

        // A valid header announcing 30000x30000 pixels is refused before decoding.
        let mut bomb = good.clone();
        bomb[16..20].copy_from_slice(&30000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&30000u32.to_be_bytes());
        let crc = crc32fast::hash(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let text = message(decode(path, &bomb, &options));
        assert!(text.contains("30000x30000"), "{text}");
        assert!(text.contains("decompression-bomb"), "{text}");
        let tight = DecodeOptions {
            limits: DecodeLimits {
                max_pixels: 100,
                max_side: 1000,
            },
            exif_transpose: false,
        };
        assert!(message(decode(path, &good, &tight)).contains("64x64"));
    }

    #[test]
    fn modes_convert_like_pillow() {
        let options = DecodeOptions::default();
        let path = Path::new("x.png");
        // 16-bit RGB keeps the high byte.
        let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            2,
            1,
            image::Rgb([0x12ff, 0x8000, 0xffff]),
        );
        let loaded = decode(path, &png_bytes(&DynamicImage::ImageRgb16(deep)), &options).unwrap();
        assert_eq!(loaded.to_rgb8().get_pixel(1, 0).0, [0x12, 0x80, 0xff]);
        assert!(!loaded.has_alpha());
        // Grey is replicated.
        let grey = image::GrayImage::from_pixel(1, 1, image::Luma([77]));
        let loaded = decode(path, &png_bytes(&DynamicImage::ImageLuma8(grey)), &options).unwrap();
        assert_eq!(loaded.to_rgb8().get_pixel(0, 0).0, [77, 77, 77]);
        // Alpha: dropped by to_rgb8, blended onto white by composite_on_white.
        let rgba = RgbaImage::from_pixel(1, 1, image::Rgba([0, 100, 200, 128]));
        let loaded = decode(path, &png_bytes(&DynamicImage::ImageRgba8(rgba)), &options).unwrap();
        assert!(loaded.has_alpha());
        assert_eq!(loaded.to_rgb8().get_pixel(0, 0).0, [0, 100, 200]);
        // (255*127 + c*128 + 128) / 255 with Pillow's rounding.
        assert_eq!(
            loaded.composite_on_white().get_pixel(0, 0).0,
            [127, 177, 227]
        );
    }

    #[test]
    fn header_size_matches_decoded_size() {
        for name in ["chelsea.png", "hubble_deep_field.jpg", "text.png"] {
            let path = fixtures().join("images").join(name);
            assert_eq!(
                image_size(&path, false).unwrap(),
                open(&path, &DecodeOptions::default())
                    .unwrap()
                    .original_size()
            );
        }
        assert!(image_size(&fixtures().join("images/astronaut.caption"), false).is_err());
    }

    #[test]
    fn bicubic_matches_pillow_on_the_blip_inputs() {
        // BLIP's pixel_values are Pillow BICUBIC 384x384 resizes, normalised; undo the
        // normalisation to recover the uint8 image.
        let path = fixtures().join("blip-tiny/golden.npz");
        let mut archive = npyz::npz::NpzArchive::open(&path).expect("blip golden present");
        let values = archive.by_name("pixel_values").unwrap().unwrap();
        let values = values.into_vec::<f32>().unwrap();
        let mean = [0.48145466f64, 0.4578275, 0.40821073];
        let std = [0.26862954f64, 0.26130258, 0.27577711];
        let plane = 384 * 384;
        for (index, stem) in ["astronaut", "chelsea", "coins", "text"].iter().enumerate() {
            let ours = resize_bicubic(&image(&format!("{stem}.png")).to_rgb8(), 384, 384);
            let start = index * 3 * plane;
            let golden: Vec<u8> = (0..plane)
                .flat_map(|p| (0..3).map(move |c| (c, p)))
                .map(|(c, p)| {
                    let v = f64::from(values[start + c * plane + p]);
                    ((v * std[c] + mean[c]) * 255.0).round() as u8
                })
                .collect();
            assert_eq!(compare(ours.as_raw(), &golden), (0, 0), "{stem}");
        }
    }

    #[test]
    fn area_matches_opencv_on_the_tagger_downscale() {
        let astronaut = image("astronaut.png").to_rgb8();
        assert_eq!(astronaut.dimensions(), (512, 512));
        let ours = to_bgr(&resize_area(&astronaut, 448, 448));
        let (golden, shape) = golden_u8("wd14/preprocessed_inputs.npz", "astronaut__bgr_uint8");
        assert_eq!(shape, [448, 448, 3]);
        assert_eq!(compare(&ours, &golden), (0, 0));
    }

    #[test]
    fn lanczos_matches_pillow_on_the_tagger_upscale() {
        let small = image("microaneurysms.png").to_rgb8();
        assert_eq!(small.dimensions(), (102, 102));
        let ours = to_bgr(&resize_lanczos(&small, 448, 448));
        let (golden, _) = golden_u8("wd14/preprocessed_inputs.npz", "microaneurysms__bgr_uint8");
        assert_eq!(compare(&ours, &golden), (0, 0));
    }

    #[test]
    fn area_matches_opencv_on_the_vae_buckets() {
        for stem in ["astronaut", "chelsea", "cell", "text"] {
            let file = format!("vae/{stem}_vae.npz");
            let resized = golden_i64(&file, "resized_wh");
            let bucket = golden_i64(&file, "bucket_wh");
            let rgb = image(&format!("{stem}.png")).to_rgb8();
            let scaled = resize_sd_scripts(&rgb, resized[0] as u32, resized[1] as u32);
            let left = (resized[0] - bucket[0]) as u32 / 2;
            let top = (resized[1] - bucket[1]) as u32 / 2;
            let cropped =
                image::imageops::crop_imm(&scaled, left, top, bucket[0] as u32, bucket[1] as u32)
                    .to_image();
            let (golden, _) = golden_u8(&file, "image_resized_cropped_rgb_uint8");
            assert_eq!(compare(cropped.as_raw(), &golden), (0, 0), "{stem}");
        }
    }
}
