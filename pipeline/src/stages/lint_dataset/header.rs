//! Header-only inspection of image files: size, pixel format, orientation, animation and an
//! end-of-file check, without decoding any pixels.
//!
//! The decoders of the `image` crate hide the stored pixel format (palette PNGs arrive expanded,
//! CMYK JPEGs arrive as RGB), so PNG and JPEG containers are walked here directly; other formats
//! are asked through their `image` decoder.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use image::{ImageDecoder, ImageFormat};

/// How the pixels are stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredColor {
    /// 8-bit RGB (or YCbCr JPEG): what every stage expects.
    Rgb,
    /// RGB with an alpha channel.
    Rgba,
    /// Single-channel grayscale.
    Gray,
    /// Grayscale with an alpha channel.
    GrayAlpha,
    /// Palette (indexed) colour, optionally with transparent entries.
    Palette,
    /// Four-channel CMYK or YCCK JPEG (print files).
    Cmyk,
}

/// What the header of an image file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// Container format found from the file's first bytes.
    pub format: ImageFormat,
    /// Stored width in pixels (before EXIF orientation).
    pub width: u32,
    /// Stored height in pixels (before EXIF orientation).
    pub height: u32,
    /// Stored colour layout.
    pub color: StoredColor,
    /// Bits per channel (8 for ordinary files; 16 for deep PNGs, 12 for rare JPEGs).
    pub bits: u8,
    /// True when the file carries transparency (alpha channel or a `tRNS` chunk).
    pub transparency: bool,
    /// EXIF orientation value 2..=8 when the image must be turned or mirrored to display upright.
    pub orientation: Option<u8>,
    /// True for animated files (APNG, animated WebP).
    pub animated: bool,
    /// Set when the file ends before its end-of-image marker (or RIFF length): a cut download.
    pub truncated: bool,
}

impl ImageHeader {
    /// Width and height as displayed, after the EXIF orientation is applied.
    pub fn upright_size(&self) -> (u32, u32) {
        match self.orientation {
            Some(5..=8) => (self.height, self.width),
            _ => (self.width, self.height),
        }
    }
}

/// Reads the header of the image at `path` (a few kilobytes at its start and end).
///
/// Errors are plain messages (the caller names the file): not an image, unsupported format,
/// header cut short.
pub fn read_header(path: &Path) -> Result<ImageHeader, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let length = file.metadata().map_err(|e| e.to_string())?.len();
    if length == 0 {
        return Err("empty file (0 bytes): delete it or copy it again".into());
    }
    let mut reader = BufReader::with_capacity(16 * 1024, file);
    let start = reader.fill_buf().map_err(|e| e.to_string())?;
    let format = image::guess_format(start).map_err(|_| {
        "not an image: the content matches no supported format (PNG, JPEG, WebP, BMP)".to_string()
    })?;
    let mut header = match format {
        ImageFormat::Png => png_header(&mut reader)?,
        ImageFormat::Jpeg => jpeg_header(&mut reader)?,
        _ => decoder_header(format, reader.get_mut())?,
    };
    header.truncated = match format {
        ImageFormat::Png => !tail_contains(reader.get_mut(), length, b"IEND")?,
        ImageFormat::Jpeg => !tail_contains(reader.get_mut(), length, &[0xFF, 0xD9])?,
        ImageFormat::WebP => {
            riff_length(reader.get_mut())?.is_some_and(|declared| declared > length)
        }
        _ => false,
    };
    Ok(header)
}

fn read_array<const N: usize>(reader: &mut impl Read) -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    reader
        .read_exact(&mut bytes)
        .map_err(|_| "file ends inside its header (truncated)".to_string())?;
    Ok(bytes)
}

fn skip(reader: &mut (impl Read + Seek), count: u64) -> Result<(), String> {
    reader
        .seek(SeekFrom::Current(count as i64))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn read_vec(reader: &mut impl Read, count: usize) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0u8; count];
    reader
        .read_exact(&mut bytes)
        .map_err(|_| "file ends inside its header (truncated)".to_string())?;
    Ok(bytes)
}

/// Largest metadata block read into memory to look for the EXIF orientation.
const MAX_EXIF_BYTES: u32 = 256 * 1024;

/// Walks PNG chunks up to the first image data chunk.
fn png_header(reader: &mut BufReader<File>) -> Result<ImageHeader, String> {
    read_array::<8>(reader)?;
    let mut header = None;
    loop {
        let [l0, l1, l2, l3, t0, t1, t2, t3] = read_array::<8>(reader)?;
        let length = u32::from_be_bytes([l0, l1, l2, l3]);
        let kind = [t0, t1, t2, t3];
        match &kind {
            b"IHDR" => {
                let ihdr = read_array::<13>(reader)?;
                let width = u32::from_be_bytes(ihdr[0..4].try_into().expect("4 bytes"));
                let height = u32::from_be_bytes(ihdr[4..8].try_into().expect("4 bytes"));
                let color = match ihdr[9] {
                    0 => StoredColor::Gray,
                    2 => StoredColor::Rgb,
                    3 => StoredColor::Palette,
                    4 => StoredColor::GrayAlpha,
                    6 => StoredColor::Rgba,
                    other => return Err(format!("invalid PNG colour type {other}")),
                };
                header = Some(ImageHeader {
                    format: ImageFormat::Png,
                    width,
                    height,
                    color,
                    bits: ihdr[8],
                    transparency: matches!(color, StoredColor::GrayAlpha | StoredColor::Rgba),
                    orientation: None,
                    animated: false,
                    truncated: false,
                });
                skip(reader, 4 + u64::from(length.saturating_sub(13)))?;
                continue;
            }
            b"IDAT" | b"IEND" => break,
            _ => {}
        }
        let Some(found) = header.as_mut() else {
            return Err("PNG without IHDR chunk (damaged file)".into());
        };
        match &kind {
            b"tRNS" => found.transparency = true,
            b"acTL" => found.animated = true,
            b"eXIf" if length <= MAX_EXIF_BYTES => {
                let exif = read_vec(reader, length as usize)?;
                found.orientation = turned_orientation(&exif);
                skip(reader, 4)?;
                continue;
            }
            _ => {}
        }
        skip(reader, u64::from(length) + 4)?;
    }
    header.ok_or_else(|| "PNG without IHDR chunk (damaged file)".into())
}

/// Walks JPEG markers up to the first scan.
fn jpeg_header(reader: &mut BufReader<File>) -> Result<ImageHeader, String> {
    read_array::<2>(reader)?;
    let mut orientation = None;
    let mut frame: Option<(u8, u16, u16, u8)> = None;
    loop {
        let [first, mut marker] = read_array::<2>(reader)?;
        if first != 0xFF {
            return Err("JPEG marker expected (damaged file)".into());
        }
        while marker == 0xFF {
            marker = read_array::<1>(reader)?[0];
        }
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            continue;
        }
        if marker == 0xD9 || marker == 0xDA {
            break;
        }
        let length = u16::from_be_bytes(read_array::<2>(reader)?).saturating_sub(2);
        match marker {
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                let [bits, h0, h1, w0, w1, components] = read_array::<6>(reader)?;
                frame = Some((
                    bits,
                    u16::from_be_bytes([w0, w1]),
                    u16::from_be_bytes([h0, h1]),
                    components,
                ));
                skip(reader, u64::from(length.saturating_sub(6)))?;
            }
            0xE1 => {
                let segment = read_vec(reader, usize::from(length))?;
                if let Some(tiff) = segment.strip_prefix(b"Exif\0\0") {
                    orientation = turned_orientation(tiff);
                }
            }
            _ => skip(reader, u64::from(length))?,
        }
    }
    let (bits, width, height, components) =
        frame.ok_or("JPEG without a frame header (damaged or truncated file)")?;
    let color = match components {
        1 => StoredColor::Gray,
        3 => StoredColor::Rgb,
        4 => StoredColor::Cmyk,
        other => {
            return Err(format!(
                "JPEG with {other} colour components is not supported"
            ))
        }
    };
    Ok(ImageHeader {
        format: ImageFormat::Jpeg,
        width: u32::from(width),
        height: u32::from(height),
        color,
        bits,
        transparency: false,
        orientation,
        animated: false,
        truncated: false,
    })
}

/// Asks the `image` crate's decoder of `format` (WebP, BMP, ...) for the header facts.
fn decoder_header(format: ImageFormat, file: &mut File) -> Result<ImageHeader, String> {
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let reader = BufReader::new(file);
    let unreadable = |e: image::ImageError| format!("unreadable {format:?} header: {e}");
    let (mut decoder, animated): (Box<dyn ImageDecoder + '_>, bool) = match format {
        ImageFormat::WebP => {
            let decoder = image::codecs::webp::WebPDecoder::new(reader).map_err(unreadable)?;
            let animated = decoder.has_animation();
            (Box::new(decoder), animated)
        }
        _ => {
            let decoder = image::ImageReader::with_format(reader, format)
                .into_decoder()
                .map_err(unreadable)?;
            (Box::new(decoder), false)
        }
    };
    let (width, height) = decoder.dimensions();
    let color_type = decoder.color_type();
    let color = match (color_type.has_color(), color_type.has_alpha()) {
        (true, false) => StoredColor::Rgb,
        (true, true) => StoredColor::Rgba,
        (false, false) => StoredColor::Gray,
        (false, true) => StoredColor::GrayAlpha,
    };
    let orientation = decoder
        .orientation()
        .ok()
        .map(|o| o.to_exif())
        .filter(|&o| o > 1);
    Ok(ImageHeader {
        format,
        width,
        height,
        color,
        bits: (color_type.bits_per_pixel() / u16::from(color_type.channel_count())) as u8,
        transparency: color_type.has_alpha(),
        orientation,
        animated,
        truncated: false,
    })
}

/// The EXIF orientation of a TIFF-structured EXIF block, when it is not "upright".
fn turned_orientation(tiff: &[u8]) -> Option<u8> {
    image::metadata::Orientation::from_exif_chunk(tiff)
        .map(|o| o.to_exif())
        .filter(|&o| o > 1)
}

/// True when `needle` occurs in the last 4 KiB of the file (end-of-image markers; files may
/// carry a few bytes of padding after them).
fn tail_contains(file: &mut File, length: u64, needle: &[u8]) -> Result<bool, String> {
    let window = length.min(4096);
    file.seek(SeekFrom::Start(length - window))
        .map_err(|e| e.to_string())?;
    let mut tail = Vec::with_capacity(window as usize);
    file.take(window)
        .read_to_end(&mut tail)
        .map_err(|e| e.to_string())?;
    Ok(tail.windows(needle.len()).any(|w| w == needle))
}

/// The total file length a RIFF (WebP) header declares.
fn riff_length(file: &mut File) -> Result<Option<u64>, String> {
    file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
    let mut start = [0u8; 8];
    if file.read_exact(&mut start).is_err() || &start[0..4] != b"RIFF" {
        return Ok(None);
    }
    Ok(Some(
        u64::from(u32::from_le_bytes(start[4..8].try_into().expect("4 bytes"))) + 8,
    ))
}
