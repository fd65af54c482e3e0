//! Generator of the bad-input corpus: damaged, unusual and hostile files that every lorakit tool
//! must survive (per-file message naming the file, no panic, no partial output).
//!
//! Everything is written from code so the repository holds no binary test files. Broken
//! containers (PNG chunks, a CMYK JPEG, an animated WebP, `.npz` zips, safetensors headers) are
//! assembled byte by byte here, because no encoder writes them on purpose.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

/// What a tool should do with a corpus file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A valid input: it must be processed.
    Good,
    /// Unusual but valid (mode conversion, rotation, odd name): it must be processed.
    Unusual,
    /// Broken: tools that read it must skip it with a message naming it.
    Bad,
    /// Not an input of any tool (hidden, AppleDouble, wrong extension): must be ignored.
    Ignored,
}

/// One generated file (or folder).
#[derive(Debug, Clone)]
pub struct Item {
    /// Path relative to the corpus root.
    pub path: PathBuf,
    /// What it exercises.
    pub description: &'static str,
    /// How tools must treat it.
    pub expect: Expect,
}

/// A generated corpus: `images/` (a dataset folder with captions `.caption` and tags `.txt`),
/// `json/` (metadata documents), `npz/` (cache files) and `models/` (checkpoints).
#[derive(Debug, Clone)]
pub struct Corpus {
    /// The corpus root.
    pub root: PathBuf,
    /// Every generated item.
    pub items: Vec<Item>,
}

impl Corpus {
    /// The dataset folder.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Absolute path of an item given relative to the root.
    pub fn path(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.root.join(relative)
    }

    /// The items whose path starts with `folder` and that are expected as `expect`.
    pub fn items_in(&self, folder: &str, expect: Expect) -> Vec<&Item> {
        self.items
            .iter()
            .filter(|item| item.path.starts_with(folder) && item.expect == expect)
            .collect()
    }
}

/// Writes the corpus under `root` (created if needed) and lists what it wrote.
pub fn generate(root: &Path) -> std::io::Result<Corpus> {
    let mut corpus = Corpus {
        root: root.to_path_buf(),
        items: Vec::new(),
    };
    for folder in ["images", "json", "npz", "models"] {
        std::fs::create_dir_all(root.join(folder))?;
    }
    write_images(&mut corpus)?;
    write_sidecars(&mut corpus)?;
    write_metadata(&mut corpus)?;
    write_caches(&mut corpus)?;
    write_models(&mut corpus)?;
    Ok(corpus)
}

impl Corpus {
    fn add(
        &mut self,
        path: impl Into<PathBuf>,
        bytes: &[u8],
        description: &'static str,
        expect: Expect,
    ) -> std::io::Result<()> {
        let path = path.into();
        std::fs::write(self.root.join(&path), bytes)?;
        self.items.push(Item {
            path,
            description,
            expect,
        });
        Ok(())
    }
}

/// A small RGB test picture: a 5x4 grid of cells whose brightness comes from a hash of `seed`
/// (so pictures of different seeds are neither duplicates nor near-duplicates), plus fine grain.
pub fn picture(width: u32, height: u32, seed: u32) -> RgbImage {
    let cell_level = |column: u32, row: u32| {
        let mut h = (seed.wrapping_mul(0x9E37_79B9) ^ (column * 31 + row * 131)).wrapping_add(7);
        h ^= h >> 15;
        h = h.wrapping_mul(0x2C1B_3C6D);
        h ^= h >> 12;
        (h % 200) as u8 + 20
    };
    RgbImage::from_fn(width, height, |x, y| {
        let level = cell_level(x * 5 / width, y * 4 / height);
        let grain = ((x * 7 + y * 13 + seed * 5) % 16) as u8;
        Rgb([level.saturating_add(grain), level, 255 - level])
    })
}

/// PNG bytes of an RGB picture.
pub fn png_bytes(image: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .expect("PNG encodes");
    out
}

/// JPEG bytes of an RGB picture, optionally with an EXIF orientation.
pub fn jpeg_bytes(image: &RgbImage, orientation: Option<u16>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    if let Some(orientation) = orientation {
        encoder
            .set_exif_metadata(exif_orientation(orientation))
            .expect("JPEG takes EXIF");
    }
    encoder
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            image::ExtendedColorType::Rgb8,
        )
        .expect("JPEG encodes");
    out
}

/// A little-endian TIFF block with one IFD entry: Orientation (0x0112) = `value`.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut tiff = b"II*\0".to_vec();
    tiff.extend_from_slice(&8u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&value.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes());
    tiff
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// zlib stream of `data` in stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(65535).collect()
    };
    for (index, block) in blocks.iter().enumerate() {
        out.push(u8::from(index + 1 == blocks.len()));
        let length = block.len() as u16;
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&(!length).to_le_bytes());
        out.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in data {
        a = (a + u32::from(byte)) % 65521;
        b = (b + a) % 65521;
    }
    out.extend_from_slice(&((b << 16) | a).to_be_bytes());
    out
}

/// A PNG with the given IHDR fields, extra chunks before the image data, and raw scanlines
/// (each row already prefixed with its filter byte).
fn raw_png(
    width: u32,
    height: u32,
    bit_depth: u8,
    color_type: u8,
    extra: &[(&[u8; 4], Vec<u8>)],
    scanlines: &[u8],
) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    for (kind, data) in extra {
        png_chunk(&mut out, kind, data);
    }
    png_chunk(&mut out, b"IDAT", &zlib_stored(scanlines));
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// Scanlines of `height` rows of `row_bytes` bytes from `pixel(x_byte, y)`, filter type 0.
fn scanlines(row_bytes: usize, height: usize, pixel: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut out = Vec::with_capacity((row_bytes + 1) * height);
    for y in 0..height {
        out.push(0);
        out.extend((0..row_bytes).map(|x| pixel(x, y)));
    }
    out
}

/// A baseline JPEG with four components (CMYK, Adobe transform 0), 8x8 pixels of one flat
/// colour: every block has DC difference 0 and no AC coefficients.
fn cmyk_jpeg() -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    let mut segment = |marker: u8, body: &[u8]| {
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(body);
    };
    segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x00");
    let mut quant = vec![0u8];
    quant.extend_from_slice(&[1u8; 64]);
    segment(0xDB, &quant);
    let mut frame = vec![8, 0, 8, 0, 8, 4];
    for id in 1..=4 {
        frame.extend_from_slice(&[id, 0x11, 0]);
    }
    segment(0xC0, &frame);
    for class in [0x00u8, 0x10] {
        let mut table = vec![class, 1];
        table.extend_from_slice(&[0u8; 15]);
        table.push(0);
        segment(0xC4, &table);
    }
    let mut scan = vec![4];
    for id in 1..=4 {
        scan.extend_from_slice(&[id, 0x00]);
    }
    scan.extend_from_slice(&[0, 63, 0]);
    segment(0xDA, &scan);
    out.extend_from_slice(&[0x00, 0xFF, 0xD9]);
    out
}

/// A two-frame animated WebP assembled from lossless still frames.
fn animated_webp(width: u32, height: u32) -> Vec<u8> {
    let mut frames = Vec::new();
    for seed in 0..2 {
        let frame = RgbaImage::from_fn(width, height, |x, y| {
            Rgba([(x * 20 + seed * 100) as u8, (y * 20) as u8, 90, 255])
        });
        let mut still = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut still)
            .encode(
                frame.as_raw(),
                width,
                height,
                image::ExtendedColorType::Rgba8,
            )
            .expect("WebP encodes");
        frames.push(still[12..].to_vec());
    }
    let u24 = |value: u32| value.to_le_bytes()[..3].to_vec();
    let mut body = b"WEBP".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        body.extend_from_slice(kind);
        body.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    };
    let mut vp8x = vec![0x02 | 0x10, 0, 0, 0];
    vp8x.extend(u24(width - 1));
    vp8x.extend(u24(height - 1));
    chunk(b"VP8X", &vp8x);
    chunk(b"ANIM", &[255, 255, 255, 255, 0, 0]);
    for frame in &frames {
        let mut anmf = Vec::new();
        anmf.extend(u24(0));
        anmf.extend(u24(0));
        anmf.extend(u24(width - 1));
        anmf.extend(u24(height - 1));
        anmf.extend(u24(100));
        anmf.push(0);
        anmf.extend_from_slice(frame);
        chunk(b"ANMF", &anmf);
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn animated_gif() -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        let frames = (0..2).map(|seed| {
            image::Frame::new(RgbaImage::from_fn(16, 16, |x, y| {
                Rgba([(x * 16) as u8, (y * 16) as u8, seed * 200, 255])
            }))
        });
        encoder.encode_frames(frames).expect("GIF encodes");
    }
    out
}

/// Names of the good images in `images/` and the caption text written for each.
const GOOD_IMAGES: [&str; 4] = [
    "good_1.png",
    "good_2.jpg",
    "good with spaces.png",
    "雪景 猫.png",
];

fn write_images(corpus: &mut Corpus) -> std::io::Result<()> {
    use Expect::*;
    for (seed, name) in GOOD_IMAGES.iter().enumerate() {
        let picture = picture(96, 64, seed as u32);
        let bytes = if name.ends_with(".jpg") {
            jpeg_bytes(&picture, None)
        } else {
            png_bytes(&picture)
        };
        corpus.add(
            format!("images/{name}"),
            &bytes,
            "valid image with caption and tags",
            Good,
        )?;
    }
    corpus.add(
        "images/emoji_🐱.png",
        &png_bytes(&picture(64, 96, 7)),
        "emoji in the file name",
        Unusual,
    )?;
    let good_png = png_bytes(&picture(80, 60, 11));
    let good_jpeg = jpeg_bytes(&picture(80, 60, 12), None);
    corpus.add("images/empty.png", &[], "0-byte file", Bad)?;
    corpus.add(
        "images/truncated.png",
        &good_png[..good_png.len() / 2],
        "PNG cut in half",
        Bad,
    )?;
    corpus.add(
        "images/truncated.jpg",
        &good_jpeg[..good_jpeg.len() / 2],
        "JPEG cut in half",
        Bad,
    )?;
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    corpus.add("images/random.png", &noise, "random bytes named .png", Bad)?;
    corpus.add(
        "images/random.webp",
        &noise[7..],
        "random bytes named .webp",
        Bad,
    )?;
    corpus.add(
        "images/bomb.png",
        &raw_png(30000, 30000, 8, 2, &[], &[0; 64]),
        "PNG declaring 30000x30000 pixels (decompression bomb)",
        Bad,
    )?;
    corpus.add("images/cmyk.jpg", &cmyk_jpeg(), "CMYK JPEG", Unusual)?;
    corpus.add(
        "images/deep16.png",
        &raw_png(
            32,
            24,
            16,
            2,
            &[],
            &scanlines(32 * 6, 24, |x, y| (x * 5 + y * 3) as u8),
        ),
        "16-bit RGB PNG",
        Unusual,
    )?;
    let palette: Vec<u8> = (0..16u8)
        .flat_map(|i| [i * 16, 255 - i * 16, i * 8])
        .collect();
    let transparency: Vec<u8> = (0..16u8).map(|i| i * 17).collect();
    corpus.add(
        "images/palette_transparent.png",
        &raw_png(
            40,
            30,
            8,
            3,
            &[(b"PLTE", palette), (b"tRNS", transparency)],
            &scanlines(40, 30, |x, y| ((x + y) % 16) as u8),
        ),
        "palette PNG with transparency",
        Unusual,
    )?;
    corpus.add(
        "images/gray_alpha.png",
        &raw_png(
            30,
            30,
            8,
            4,
            &[],
            &scanlines(60, 30, |x, y| {
                if x % 2 == 0 {
                    (y * 8) as u8
                } else {
                    (x * 4) as u8
                }
            }),
        ),
        "grayscale + alpha PNG",
        Unusual,
    )?;
    corpus.add(
        "images/animated.webp",
        &animated_webp(12, 10),
        "animated WebP (two frames)",
        Unusual,
    )?;
    corpus.add(
        "images/animated.gif",
        &animated_gif(),
        "animated GIF (not a training image extension)",
        Ignored,
    )?;
    corpus.add(
        "images/rotated.jpg",
        &jpeg_bytes(&picture(90, 50, 13), Some(6)),
        "JPEG with EXIF orientation 6 (rotate 90 degrees)",
        Unusual,
    )?;
    corpus.add(
        "images/jpeg_named.png",
        &jpeg_bytes(&picture(50, 40, 14), None),
        "JPEG content with a .png extension",
        Unusual,
    )?;
    corpus.add(
        "images/._good_1.png",
        b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ",
        "macOS AppleDouble file",
        Ignored,
    )?;
    corpus.add(
        "images/.hidden.png",
        &png_bytes(&picture(20, 20, 15)),
        "hidden file",
        Ignored,
    )?;
    std::fs::create_dir_all(corpus.root.join("images/folder.png"))?;
    corpus.items.push(Item {
        path: "images/folder.png".into(),
        description: "a folder named like an image",
        expect: Bad,
    });
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"latin1_caf\xe9.png");
        let path = Path::new("images").join(name);
        corpus.add(
            path,
            &png_bytes(&picture(40, 40, 16)),
            "file name that is not UTF-8",
            Unusual,
        )?;
    }
    Ok(())
}

fn write_sidecars(corpus: &mut Corpus) -> std::io::Result<()> {
    use Expect::*;
    let mut stems: Vec<String> = GOOD_IMAGES
        .iter()
        .map(|n| n.rsplit_once('.').expect("extension").0.to_string())
        .collect();
    stems.push("emoji_🐱".into());
    for stem in &stems {
        corpus.add(
            format!("images/{stem}.caption"),
            format!("a picture of {stem}").as_bytes(),
            "caption of a valid image",
            Good,
        )?;
        corpus.add(
            format!("images/{stem}.txt"),
            b"1girl, solo, outdoors",
            "tags of a valid image",
            Good,
        )?;
    }
    let sidecar_cases: [(&str, &[u8], &'static str, Expect); 5] = [
        (
            "cap_bad_utf8",
            b"caf\xe9 au lait",
            "caption that is not UTF-8 (Latin-1)",
            Bad,
        ),
        (
            "cap_bom",
            b"\xEF\xBB\xBFa cat with a byte-order mark",
            "caption with a UTF-8 BOM",
            Unusual,
        ),
        (
            "cap_crlf",
            b"a cat\r\nwith windows line ends\r\n",
            "caption with CRLF line ends",
            Unusual,
        ),
        ("cap_empty", b"", "empty caption", Unusual),
        (
            "cap_missing",
            b"",
            "image whose caption file is missing",
            Bad,
        ),
    ];
    for (seed, (stem, caption, description, expect)) in sidecar_cases.into_iter().enumerate() {
        corpus.add(
            format!("images/{stem}.png"),
            &png_bytes(&picture(48, 48, 20 + seed as u32)),
            "valid image (its caption is the case)",
            Good,
        )?;
        if stem == "cap_missing" {
            corpus.items.push(Item {
                path: format!("images/{stem}.caption").into(),
                description,
                expect,
            });
        } else {
            corpus.add(
                format!("images/{stem}.caption"),
                caption,
                description,
                expect,
            )?;
        }
        corpus.add(
            format!("images/{stem}.txt"),
            b"cat, indoors",
            "tags of a valid image",
            Good,
        )?;
    }
    let long: Vec<u8> = b"very long caption, "
        .iter()
        .copied()
        .cycle()
        .take(10 << 20)
        .collect();
    corpus.add(
        "images/cap_long.png",
        &png_bytes(&picture(48, 48, 30)),
        "valid image (its caption is the case)",
        Good,
    )?;
    corpus.add("images/cap_long.caption", &long, "10 MB caption", Unusual)?;
    corpus.add(
        "images/cap_long.txt",
        b"\xff\xfetags in UTF-16",
        "tag file that is not UTF-8 (UTF-16 byte-order mark)",
        Bad,
    )?;
    Ok(())
}

fn write_metadata(corpus: &mut Corpus) -> std::io::Result<()> {
    use Expect::*;
    let images = corpus.images();
    let good = serde_json::json!({
        images.join("good_1.png").display().to_string(): {"caption": "a picture", "tags": "1girl, solo"},
        images.join("good_2.jpg").display().to_string(): {"caption": "another picture", "tags": "1girl"},
    });
    let good_text = serde_json::to_string_pretty(&good).expect("JSON");
    corpus.add(
        "json/good.json",
        good_text.as_bytes(),
        "valid metadata",
        Good,
    )?;
    corpus.add(
        "json/truncated.json",
        &good_text.as_bytes()[..good_text.len() / 2],
        "metadata JSON cut mid-file",
        Bad,
    )?;
    corpus.add(
        "json/wrong_version.json",
        good_text.as_bytes(),
        "metadata whose manifest declares a future schema version",
        Bad,
    )?;
    let manifest = serde_json::json!({
        "schema": "lorakit.manifest/v1",
        "tool": "merge-captions",
        "tool_version": "9.0.0",
        "output": "wrong_version.json",
        "output_schema": "lorakit.metadata/v9",
        "parameters": {},
        "inputs": [],
        "summary": {"done": 2, "up_to_date": 0, "failures": []}
    });
    corpus.add(
        "json/wrong_version.json.manifest.json",
        serde_json::to_string_pretty(&manifest)
            .expect("JSON")
            .as_bytes(),
        "manifest declaring lorakit.metadata/v9",
        Bad,
    )?;
    let dangling = serde_json::json!({
        images.join("good_1.png").display().to_string(): {"caption": "a picture", "tags": "1girl"},
        images.join("does_not_exist.png").display().to_string(): {"caption": "nothing", "tags": "ghost"},
    });
    corpus.add(
        "json/dangling_key.json",
        serde_json::to_string_pretty(&dangling)
            .expect("JSON")
            .as_bytes(),
        "metadata with a key that points to no image",
        Unusual,
    )?;
    let first = images.join("good_1.png").display().to_string();
    let duplicate =
        format!("{{\n  {first:?}: {{\"caption\": \"a picture\", \"caption\": \"another\"}}\n}}");
    corpus.add(
        "json/duplicate_key.json",
        duplicate.as_bytes(),
        "metadata with a key twice in one entry (JSON readers keep the last silently)",
        Bad,
    )?;
    let utf16: Vec<u8> = format!("\u{feff}{good_text}")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    corpus.add(
        "json/utf16.json",
        &utf16,
        "metadata saved as UTF-16 with a byte-order mark (Windows PowerShell's default)",
        Bad,
    )?;
    corpus.add(
        "json/utf8_bom.json",
        format!("\u{feff}{good_text}").as_bytes(),
        "metadata in UTF-8 with a byte-order mark",
        Unusual,
    )?;
    corpus.add(
        "json/not_an_object.json",
        b"[1, 2, 3]",
        "JSON that is an array, not a metadata object",
        Bad,
    )?;
    corpus.add(
        "json/wrong_types.json",
        br#"{"a.png": {"caption": 5, "tags": ["x"]}}"#,
        "metadata whose fields have the wrong types",
        Bad,
    )?;
    Ok(())
}

/// A `.npy` (format 1.0) file of `shape` with little-endian `descr` data.
fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A `np.savez`-style zip (stored members `<name>.npy`).
fn npz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in members {
        let file_name = format!("{name}.npy");
        let offset = out.len() as u32;
        let crc = crc32fast::hash(data);
        let mut common = Vec::new();
        common.extend_from_slice(&20u16.to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        common.extend_from_slice(&0x21u16.to_le_bytes());
        common.extend_from_slice(&crc.to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(file_name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&common);
        out.extend_from_slice(file_name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&20u16.to_le_bytes());
        central.extend_from_slice(&common);
        // Comment length, disk number, internal attributes (external attributes follow).
        central.extend_from_slice(&[0u8; 6]);
        central.extend_from_slice(&0u32.to_le_bytes());
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(file_name.as_bytes());
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06\0\0\0\0");
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(members.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn f32_bytes(values: impl IntoIterator<Item = f32>) -> Vec<u8> {
    values.into_iter().flat_map(f32::to_le_bytes).collect()
}

/// Latent-cache shaped arrays for a `width`x`height` bucket, with the latents from `latents`.
fn latent_members(width: usize, height: usize, latents: Vec<u8>) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("latents", npy("<f4", &[4, height / 8, width / 8], &latents)),
        (
            "original_size",
            npy(
                "<i8",
                &[2],
                &[(width as i64).to_le_bytes(), (height as i64).to_le_bytes()].concat(),
            ),
        ),
        (
            "crop_ltrb",
            npy(
                "<f8",
                &[4],
                &[0f64, 0.0, width as f64, height as f64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
        ),
    ]
}

fn write_caches(corpus: &mut Corpus) -> std::io::Result<()> {
    use Expect::*;
    let count = 4 * 8 * 12;
    let valid = npz(&latent_members(
        96,
        64,
        f32_bytes((0..count).map(|i| i as f32 / 100.0)),
    ));
    corpus.add(
        "npz/valid_latents.npz",
        &valid,
        "well-formed latent cache",
        Good,
    )?;
    corpus.add(
        "npz/wrong_keys.npz",
        &npz(&[("weights", npy("<f4", &[3], &f32_bytes([1.0, 2.0, 3.0])))]),
        "npz without the expected arrays",
        Bad,
    )?;
    corpus.add(
        "npz/wrong_shape.npz",
        &npz(&latent_members(
            32,
            32,
            f32_bytes((0..4 * 4 * 4).map(|i| i as f32)),
        )),
        "latent cache whose latents have another bucket's shape",
        Bad,
    )?;
    corpus.add(
        "npz/nan.npz",
        &npz(&latent_members(
            96,
            64,
            f32_bytes((0..count).map(|i| if i % 7 == 0 { f32::NAN } else { 0.5 })),
        )),
        "latent cache containing NaN values",
        Bad,
    )?;
    corpus.add(
        "npz/truncated.npz",
        &valid[..valid.len() * 2 / 3],
        "npz zip cut short",
        Bad,
    )?;
    corpus.add(
        "npz/huge_shape.npz",
        &npz(&[(
            "latents",
            npy("<f4", &[4, 16384, 16384], &f32_bytes([0.0; 16])),
        )]),
        "latent cache declaring a 4 GiB array in 64 bytes (must be refused unread)",
        Bad,
    )?;
    corpus.add(
        "npz/te_wrong_dtype.npz",
        &npz(&[
            ("hidden_state1", npy("<i8", &[2], &[0u8; 16])),
            ("pool2", npy("|u1", &[3], &[1, 2, 3])),
        ]),
        "text-encoder cache with integer arrays",
        Bad,
    )?;
    Ok(())
}

fn write_models(corpus: &mut Corpus) -> std::io::Result<()> {
    use Expect::*;
    let mut huge_length = (u64::MAX / 2).to_le_bytes().to_vec();
    huge_length.extend_from_slice(b"{}");
    corpus.add(
        "models/header_length.safetensors",
        &huge_length,
        "safetensors whose header length exceeds the file",
        Bad,
    )?;
    let garbage_header =
        b"{\"model.weight\": {\"dtype\": \"F32\", \"shape\": [2, 2], \"data_offsets\": [0, 16]";
    let mut corrupt = (garbage_header.len() as u64).to_le_bytes().to_vec();
    corrupt.extend_from_slice(garbage_header);
    corrupt.extend_from_slice(&[0u8; 16]);
    corpus.add(
        "models/corrupt_header.safetensors",
        &corrupt,
        "safetensors with an unterminated JSON header",
        Bad,
    )?;
    let header = b"{\"model.weight\": {\"dtype\": \"F32\", \"shape\": [64, 64], \"data_offsets\": [0, 16384]}}";
    let mut short = (header.len() as u64).to_le_bytes().to_vec();
    short.extend_from_slice(header);
    short.extend_from_slice(&[0u8; 100]);
    corpus.add(
        "models/truncated.safetensors",
        &short,
        "safetensors whose tensor data is cut short",
        Bad,
    )?;
    Ok(())
}

/// Copies the safetensors file `from` to `to` with the header entry of `tensor` changed to
/// `dtype` and `shape` (the data bytes unchanged, so the new dtype and shape must cover the
/// same number of bytes): a checkpoint with one damaged or re-typed tensor.
pub fn retyped_tensor(
    from: &Path,
    to: &Path,
    tensor: &str,
    dtype: &str,
    shape: &[usize],
) -> std::io::Result<()> {
    let bytes = std::fs::read(from)?;
    let length = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + length]).map_err(std::io::Error::other)?;
    let entry = header
        .get_mut(tensor)
        .ok_or_else(|| std::io::Error::other(format!("no tensor {tensor}")))?;
    entry["dtype"] = dtype.into();
    entry["shape"] = shape.into();
    let header = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[8 + length..]);
    std::fs::write(to, out)
}
