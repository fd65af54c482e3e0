//! PNG files with text chunks, as PIL's `PngInfo.add_text` writes them: `tEXt` for Latin-1 text,
//! `iTXt` (uncompressed UTF-8) otherwise, placed after the header chunk.

use image::ImageEncoder;

use crate::{Error, Result};

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
/// PNG signature (8 bytes) plus the IHDR chunk (4 length + 4 type + 13 data + 4 CRC).
const HEADER_END: usize = 8 + 25;

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 12);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut digest = CRC32.digest();
    digest.update(kind);
    digest.update(data);
    out.extend_from_slice(&digest.finalize().to_be_bytes());
    out
}

fn text_chunk(key: &str, value: &str) -> Vec<u8> {
    let latin1: Option<Vec<u8>> = value
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect();
    match latin1 {
        Some(bytes) => {
            let mut data = key.as_bytes().to_vec();
            data.push(0);
            data.extend_from_slice(&bytes);
            chunk(b"tEXt", &data)
        }
        None => {
            let mut data = key.as_bytes().to_vec();
            // Null, compression flag 0, method 0, empty language tag and translated keyword.
            data.extend_from_slice(&[0, 0, 0, 0, 0]);
            data.extend_from_slice(value.as_bytes());
            chunk(b"iTXt", &data)
        }
    }
}

/// Encodes an RGB image as PNG with the `texts` (key, value) chunks.
pub fn encode_png(image: &image::RgbImage, texts: &[(String, String)]) -> Result<Vec<u8>> {
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Model(format!("PNG encoding: {e}")))?;
    let mut out = Vec::with_capacity(png.len() + 1024);
    out.extend_from_slice(&png[..HEADER_END]);
    for (key, value) in texts {
        out.extend(text_chunk(key, value));
    }
    out.extend_from_slice(&png[HEADER_END..]);
    Ok(out)
}

/// Reads the text chunks (`tEXt` and uncompressed `iTXt`) of a PNG file's bytes.
pub fn read_png_texts(bytes: &[u8]) -> Vec<(String, String)> {
    let mut texts = Vec::new();
    let mut at = 8;
    while at + 12 <= bytes.len() {
        let length = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let Some(data) = bytes.get(at + 8..at + 8 + length) else {
            break;
        };
        if let Some(split) = data.iter().position(|&b| b == 0) {
            let key = String::from_utf8_lossy(&data[..split]).into_owned();
            match kind {
                b"tEXt" => {
                    let value: String = data[split + 1..].iter().map(|&b| char::from(b)).collect();
                    texts.push((key, value));
                }
                b"iTXt" if data.len() >= split + 3 && data[split + 1] == 0 => {
                    // Skip the flags, the language tag and the translated keyword.
                    let rest = &data[split + 3..];
                    let mut parts = rest.splitn(3, |&b| b == 0);
                    let (_, _, value) =
                        (parts.next(), parts.next(), parts.next().unwrap_or_default());
                    texts.push((key, String::from_utf8_lossy(value).into_owned()));
                }
                _ => {}
            }
        }
        at += length + 12;
    }
    texts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chunks_round_trip_and_the_image_still_decodes() {
        let image =
            image::RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 40, y as u8 * 80, 7]));
        let texts = vec![
            ("prompt".to_string(), "a café, (cat:1.2)".to_string()),
            ("parameters".to_string(), "猫\nSteps: 4".to_string()),
        ];
        let bytes = encode_png(&image, &texts).unwrap();
        assert_eq!(read_png_texts(&bytes), texts);
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded, image);
    }
}
