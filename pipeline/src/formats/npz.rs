//! Numpy `.npz` archives: the one reader and writer of every array cache lorakit produces.
//!
//! Files are plain uncompressed `np.savez` archives (one `<name>.npy` member per array, C order,
//! little endian), so numpy and sd-scripts load them without pickle.

use std::fs::File;
use std::io::{BufReader, Cursor, Read};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::f16;
use npyz::WriterBuilder;

use crate::{infra::fsio, Error, Result};

/// Name of the array holding the content key that produced a cache file.
pub const KEY_ARRAY: &str = "lorakit_key";
/// Name of the array holding the BLAKE3 (hex, as uint8 bytes) of the input file a cache was
/// computed from (the image of a latent cache): a cache of another setting whose image is
/// unchanged is told from a stale one by it.
pub const SOURCE_ARRAY: &str = "lorakit_source";

/// The largest array lorakit reads from a `.npz` file (256 MiB; the latents of a 4096x4096
/// image take 4 MiB, its alpha mask 64 MiB). An array declaring more, in its `.npy` header or
/// as the zip entry's uncompressed size, is refused before anything is decompressed.
pub const MAX_ARRAY_BYTES: u64 = 256 << 20;

/// The largest `.npy` header read (numpy's own `max_header_size` default).
const MAX_HEADER_BYTES: usize = 10_000;

/// An array member's bytes: the already-read `.npy` header, then the rest of the zip entry,
/// never more than the entry declares.
type MemberReader<'a> = std::io::Chain<Cursor<Vec<u8>>, std::io::Take<zip::read::ZipFile<'a>>>;

/// Element data of one array waiting to be written.
enum ArrayData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    F64(Vec<f64>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

/// Collects named arrays, then writes them as one `.npz` file atomically.
#[derive(Default)]
pub struct NpzWriter {
    arrays: Vec<(String, Vec<usize>, ArrayData)>,
}

impl NpzWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, name: &str, shape: &[usize], len: usize, data: ArrayData) -> Result<()> {
        let expected: usize = shape.iter().product();
        if expected != len {
            return Err(Error::Model(format!(
                "array `{name}`: {len} values do not fill shape {shape:?}"
            )));
        }
        self.arrays.retain(|(existing, _, _)| existing != name);
        self.arrays.push((name.to_string(), shape.to_vec(), data));
        Ok(())
    }

    /// Adds (or replaces) a float32 array.
    pub fn add_f32(&mut self, name: &str, data: Vec<f32>, shape: &[usize]) -> Result<()> {
        let len = data.len();
        self.push(name, shape, len, ArrayData::F32(data))
    }

    /// Adds (or replaces) a float16 array.
    pub fn add_f16(&mut self, name: &str, data: Vec<f16>, shape: &[usize]) -> Result<()> {
        let len = data.len();
        self.push(name, shape, len, ArrayData::F16(data))
    }

    /// Adds (or replaces) a float64 array.
    pub fn add_f64(&mut self, name: &str, data: Vec<f64>, shape: &[usize]) -> Result<()> {
        let len = data.len();
        self.push(name, shape, len, ArrayData::F64(data))
    }

    /// Adds (or replaces) an int64 array.
    pub fn add_i64(&mut self, name: &str, data: Vec<i64>, shape: &[usize]) -> Result<()> {
        let len = data.len();
        self.push(name, shape, len, ArrayData::I64(data))
    }

    /// Adds (or replaces) a uint8 array.
    pub fn add_u8(&mut self, name: &str, data: Vec<u8>, shape: &[usize]) -> Result<()> {
        let len = data.len();
        self.push(name, shape, len, ArrayData::U8(data))
    }

    /// Adds a candle tensor with its own shape; f32, f16, f64, i64 and u8 tensors are stored as
    /// such, bf16 is widened to f32 (numpy has no bfloat16).
    pub fn add_tensor(&mut self, name: &str, tensor: &Tensor) -> Result<()> {
        let shape = tensor.dims().to_vec();
        let flat = tensor.flatten_all().map_err(model_error)?;
        match tensor.dtype() {
            DType::F32 | DType::BF16 => {
                let values = flat.to_dtype(DType::F32).map_err(model_error)?;
                self.add_f32(name, values.to_vec1().map_err(model_error)?, &shape)
            }
            DType::F16 => self.add_f16(name, flat.to_vec1().map_err(model_error)?, &shape),
            DType::F64 => self.add_f64(name, flat.to_vec1().map_err(model_error)?, &shape),
            DType::I64 => self.add_i64(name, flat.to_vec1().map_err(model_error)?, &shape),
            DType::U8 => self.add_u8(name, flat.to_vec1().map_err(model_error)?, &shape),
            other => Err(Error::Model(format!(
                "array `{name}`: tensors of dtype {other:?} cannot be stored in .npz"
            ))),
        }
    }

    /// Writes every array to `path` (temporary file + rename; the old file stays on failure).
    pub fn write(&self, path: &Path) -> Result<()> {
        fsio::write_atomic_with(path, |out| {
            let mut archive = npyz::npz::NpzWriter::new(out);
            let options = zip::write::FileOptions::default()
                .compression_method(zip::CompressionMethod::Stored)
                .large_file(false);
            for (name, shape, data) in &self.arrays {
                let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
                match data {
                    ArrayData::F32(v) => write_member(&mut archive, name, &shape, options, v)?,
                    ArrayData::F16(v) => write_member(&mut archive, name, &shape, options, v)?,
                    ArrayData::F64(v) => write_member(&mut archive, name, &shape, options, v)?,
                    ArrayData::I64(v) => write_member(&mut archive, name, &shape, options, v)?,
                    ArrayData::U8(v) => write_member(&mut archive, name, &shape, options, v)?,
                }
            }
            archive.zip_writer().finish()?;
            Ok(())
        })
    }
}

fn write_member<T, W>(
    archive: &mut npyz::npz::NpzWriter<W>,
    name: &str,
    shape: &[u64],
    options: zip::write::FileOptions,
    values: &[T],
) -> std::io::Result<()>
where
    T: npyz::AutoSerialize + Copy,
    W: std::io::Write + std::io::Seek,
{
    let mut writer = archive
        .array::<T>(name, options)?
        .default_dtype()
        .shape(shape)
        .begin_nd()?;
    writer.extend(values.iter().copied())?;
    writer.finish()
}

/// An open `.npz` archive.
pub struct NpzReader {
    path: PathBuf,
    archive: npyz::npz::NpzArchive<BufReader<File>>,
}

impl NpzReader {
    /// Opens `path`; a file that is not a zip archive is a [`Error::BadFile`].
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let archive = npyz::npz::NpzArchive::new(BufReader::new(file)).map_err(|e| {
            Error::bad_file(
                path,
                format!("not a readable .npz archive ({e}); delete it to have it re-created"),
            )
        })?;
        Ok(NpzReader {
            path: path.to_path_buf(),
            archive,
        })
    }

    /// The archive's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all arrays, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.archive.array_names().map(str::to_string).collect();
        keys.sort();
        keys
    }

    /// Whether an array called `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.archive.array_names().any(|n| n == name)
    }

    /// Shape of array `name` without reading its data.
    pub fn shape(&mut self, name: &str) -> Result<Vec<usize>> {
        let file = self.member(name)?;
        Ok(file.shape().iter().map(|&d| d as usize).collect())
    }

    /// Opens array `name` after checking its declared sizes: the zip entry's uncompressed size
    /// and the header's shape x item size must both stay within [`MAX_ARRAY_BYTES`], and the
    /// entry must be large enough to hold the data the header declares.
    fn member(&mut self, name: &str) -> Result<npyz::NpyFile<MemberReader<'_>>> {
        let path = self.path.clone();
        let unreadable = |e: &dyn std::fmt::Display| {
            Error::bad_file(
                &path,
                format!(
                    "array `{name}` is unreadable ({e}); delete the file to have it re-created"
                ),
            )
        };
        let file_name = npyz::npz::file_name_from_array_name(name);
        let entry = match self.archive.zip_archive().by_name(&file_name) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(Error::bad_file(
                    &path,
                    format!("has no array `{name}`; delete it to have it re-created"),
                ))
            }
            Err(e) => return Err(unreadable(&e)),
        };
        let declared = entry.size();
        if declared > MAX_ARRAY_BYTES + MAX_HEADER_BYTES as u64 {
            return Err(too_large(
                &path,
                name,
                &format!("{declared} bytes uncompressed"),
            ));
        }
        let mut entry = entry.take(declared);
        let (header, data_bytes) = read_npy_header(&mut entry).map_err(|e| unreadable(&e))?;
        let data_bytes = match data_bytes {
            Some(bytes) if bytes <= MAX_ARRAY_BYTES => bytes,
            Some(bytes) => return Err(too_large(&path, name, &format!("{bytes} bytes of data"))),
            None => return Err(too_large(&path, name, "a shape whose size overflows")),
        };
        if header.len() as u64 + data_bytes > declared {
            return Err(Error::bad_file(
                &path,
                format!(
                    "array `{name}` is truncated: its header declares {data_bytes} bytes of data but the zip entry holds {declared} bytes in all; delete the file to have it re-created"
                ),
            ));
        }
        npyz::NpyFile::new(Cursor::new(header).chain(entry)).map_err(|e| unreadable(&e))
    }

    fn read_as<T: npyz::Deserialize>(
        &mut self,
        name: &str,
        wanted: &str,
    ) -> Result<(Vec<T>, Vec<usize>)> {
        let path = self.path.clone();
        let file = self.member(name)?;
        if file.order() != npyz::Order::C {
            return Err(Error::bad_file(
                &path,
                format!("array `{name}` is stored in Fortran order; only C order is supported"),
            ));
        }
        let shape: Vec<usize> = file.shape().iter().map(|&d| d as usize).collect();
        let dtype = dtype_text(&file.dtype());
        let data = file.data::<T>().map_err(|_| {
            Error::bad_file(
                &path,
                format!("array `{name}` has dtype {dtype}, expected {wanted}"),
            )
        })?;
        let values = data.collect::<std::io::Result<Vec<T>>>().map_err(|e| {
            Error::bad_file(
                &path,
                format!("array `{name}` is truncated or corrupt ({e}); delete the file to have it re-created"),
            )
        })?;
        Ok((values, shape))
    }

    /// Reads a float32 array (float16 arrays are widened), with its shape.
    pub fn read_f32(&mut self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        if self.dtype(name)? == "<f2" {
            let (values, shape) = self.read_f16(name)?;
            return Ok((values.into_iter().map(f32::from).collect(), shape));
        }
        self.read_as(name, "float32")
    }

    /// Reads a float16 array, with its shape.
    pub fn read_f16(&mut self, name: &str) -> Result<(Vec<f16>, Vec<usize>)> {
        self.read_as(name, "float16")
    }

    /// Reads a float64 array, with its shape.
    pub fn read_f64(&mut self, name: &str) -> Result<(Vec<f64>, Vec<usize>)> {
        self.read_as(name, "float64")
    }

    /// Reads an int64 array, with its shape.
    pub fn read_i64(&mut self, name: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        self.read_as(name, "int64")
    }

    /// Reads a uint8 array, with its shape.
    pub fn read_u8(&mut self, name: &str) -> Result<(Vec<u8>, Vec<usize>)> {
        self.read_as(name, "uint8")
    }

    /// The numpy dtype string of array `name` (e.g. `<f4`).
    pub fn dtype(&mut self, name: &str) -> Result<String> {
        Ok(dtype_text(&self.member(name)?.dtype()))
    }

    /// Reads array `name` as a float32 candle tensor on `device`.
    pub fn read_tensor_f32(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let (values, shape) = self.read_f32(name)?;
        Tensor::from_vec(values, shape, device).map_err(model_error)
    }
}

/// Reads the `.npy` header at the start of `reader` (magic, version, length, the Python dict
/// text) without trusting it: returns its bytes and the data size its shape and dtype declare
/// (`None` when that overflows), so the caller can refuse before reading the data.
fn read_npy_header(reader: &mut impl Read) -> std::io::Result<(Vec<u8>, Option<u64>)> {
    let invalid = |message: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, message);
    let mut bytes = vec![0u8; 8];
    reader.read_exact(&mut bytes)?;
    if &bytes[..6] != b"\x93NUMPY" {
        return Err(invalid("not an .npy array (no NUMPY magic)"));
    }
    let length_bytes = if bytes[6] == 1 { 2 } else { 4 };
    let mut length = [0u8; 4];
    reader.read_exact(&mut length[..length_bytes])?;
    bytes.extend_from_slice(&length[..length_bytes]);
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_HEADER_BYTES {
        return Err(invalid("the .npy header is longer than 10000 bytes"));
    }
    let start = bytes.len();
    bytes.resize(start + length, 0);
    reader.read_exact(&mut bytes[start..])?;
    let text = std::str::from_utf8(&bytes[start..]).map_err(|_| invalid("header is not text"))?;
    let py_literal::Value::Dict(entries) = text
        .trim_end()
        .parse::<py_literal::Value>()
        .map_err(|_| invalid("header is not a Python dict"))?
    else {
        return Err(invalid("header is not a Python dict"));
    };
    let field = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| matches!(k, py_literal::Value::String(s) if s == key))
            .map(|(_, v)| v)
    };
    let item_size = match field("descr") {
        Some(py_literal::Value::String(descr)) => descr
            .parse::<npyz::TypeStr>()
            .map_err(|_| invalid("unknown dtype"))?
            .num_bytes()
            .ok_or_else(|| invalid("unknown dtype"))?
            as u64,
        _ => return Err(invalid("only plain dtypes are supported")),
    };
    let dims = match field("shape") {
        Some(py_literal::Value::Tuple(dims) | py_literal::Value::List(dims)) => dims,
        _ => return Err(invalid("header has no shape")),
    };
    let mut data_bytes = Some(item_size);
    for dim in dims {
        let py_literal::Value::Integer(dim) = dim else {
            return Err(invalid("shape holds a non-integer"));
        };
        let dim = dim.to_string().parse::<u64>().ok();
        data_bytes = data_bytes.zip(dim).and_then(|(n, d)| n.checked_mul(d));
    }
    Ok((bytes, data_bytes))
}

/// The error for an array that declares more than [`MAX_ARRAY_BYTES`].
fn too_large(path: &Path, name: &str, what: &str) -> Error {
    Error::bad_file(
        path,
        format!(
            "array `{name}` declares {what} larger than the {} MiB any lorakit cache array needs; refused without reading it (delete the file to have it re-created)",
            MAX_ARRAY_BYTES >> 20
        ),
    )
}

/// Stores `key_hex` as the [`KEY_ARRAY`] uint8 array (the ASCII bytes of the hex key).
pub fn store_key(writer: &mut NpzWriter, key_hex: &str) -> Result<()> {
    store_text(writer, KEY_ARRAY, key_hex)
}

/// The content key stored in `reader`, if it has a readable one.
pub fn stored_key(reader: &mut NpzReader) -> Option<String> {
    stored_text(reader, KEY_ARRAY)
}

/// Stores `hash_hex`, the BLAKE3 of the input file a cache was computed from, as the
/// [`SOURCE_ARRAY`] uint8 array.
pub fn store_source(writer: &mut NpzWriter, hash_hex: &str) -> Result<()> {
    store_text(writer, SOURCE_ARRAY, hash_hex)
}

/// The source hash stored in `reader` ([`store_source`]), if it has a readable one.
pub fn stored_source(reader: &mut NpzReader) -> Option<String> {
    stored_text(reader, SOURCE_ARRAY)
}

fn store_text(writer: &mut NpzWriter, name: &str, text: &str) -> Result<()> {
    let bytes = text.as_bytes().to_vec();
    let len = bytes.len();
    writer.add_u8(name, bytes, &[len])
}

fn stored_text(reader: &mut NpzReader, name: &str) -> Option<String> {
    if !reader.contains(name) {
        return None;
    }
    let (bytes, _) = reader.read_u8(name).ok()?;
    String::from_utf8(bytes).ok()
}

/// A dtype as numpy spells it, without the quotes of its header form (e.g. `<f4`).
fn dtype_text(dtype: &npyz::DType) -> String {
    dtype.descr().trim_matches('\'').to_string()
}

fn model_error(e: candle_core::Error) -> Error {
    Error::Model(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_dtype_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npz");
        let mut writer = NpzWriter::new();
        writer
            .add_f32("latents", vec![1.5, -2.0, 3.25, 0.0, 1.0, 2.0], &[1, 2, 3])
            .unwrap();
        writer
            .add_f16("half", vec![f16::from_f32(0.5)], &[1])
            .unwrap();
        writer
            .add_f64("crop_ltrb", vec![0.0, 32.0, 384.0, 608.0], &[4])
            .unwrap();
        writer
            .add_i64("original_size", vec![1000, 1500], &[2])
            .unwrap();
        store_key(&mut writer, "abc123").unwrap();
        writer.write(&path).unwrap();

        let mut reader = NpzReader::open(&path).unwrap();
        assert_eq!(
            reader.keys(),
            vec!["crop_ltrb", "half", "latents", KEY_ARRAY, "original_size"]
        );
        let (latents, shape) = reader.read_f32("latents").unwrap();
        assert_eq!(shape, vec![1, 2, 3]);
        assert_eq!(latents[2], 3.25);
        assert_eq!(reader.read_f32("half").unwrap().0, vec![0.5]);
        assert_eq!(reader.read_f64("crop_ltrb").unwrap().0[3], 608.0);
        assert_eq!(
            reader.read_i64("original_size").unwrap().0,
            vec![1000, 1500]
        );
        assert_eq!(reader.dtype("crop_ltrb").unwrap(), "<f8");
        assert_eq!(stored_key(&mut reader).as_deref(), Some("abc123"));
    }

    #[test]
    fn reads_numpy_written_golden_file() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/golden/vae/astronaut_0512x0512_sd.npz");
        let mut reader = NpzReader::open(&path).unwrap();
        let (latents, shape) = reader.read_f32("latents").unwrap();
        assert_eq!(shape, vec![4, 32, 32]);
        assert_eq!(latents.len(), 4 * 32 * 32);
        assert_eq!(reader.read_i64("original_size").unwrap().0, vec![512, 512]);
        assert_eq!(reader.read_f64("crop_ltrb").unwrap().1, vec![4]);
        assert!(stored_key(&mut reader).is_none());
    }

    #[test]
    fn clear_errors_for_missing_key_wrong_dtype_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npz");
        let mut writer = NpzWriter::new();
        writer.add_i64("n", vec![1], &[1]).unwrap();
        writer.write(&path).unwrap();
        let mut reader = NpzReader::open(&path).unwrap();
        let missing = reader.read_f32("latents").unwrap_err().to_string();
        assert!(missing.contains("has no array `latents`"), "{missing}");
        let wrong = reader.read_f64("n").unwrap_err().to_string();
        assert!(wrong.contains("expected float64"), "{wrong}");

        let bytes = std::fs::read(&path).unwrap();
        let truncated = dir.path().join("t.npz");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let message = NpzReader::open(&truncated).err().unwrap().to_string();
        assert!(
            message.contains("t.npz") && message.contains("not a readable"),
            "{message}"
        );
        assert!(NpzWriter::new().add_f32("x", vec![1.0], &[2]).is_err());
    }

    /// `bytes` of a one-array archive with the `.npy` header's shape replaced by `shape` (the
    /// header keeps its length; its padding absorbs the change).
    fn with_shape(bytes: &[u8], shape: &str) -> Vec<u8> {
        let mut out = bytes.to_vec();
        let start = out.windows(9).position(|w| w == b"'shape': ").unwrap();
        let end = start + out[start..].iter().position(|&b| b == b'\n').unwrap();
        let text = format!("'shape': {shape}, }}");
        assert!(text.len() <= end - start);
        out[start..end].fill(b' ');
        out[start..start + text.len()].copy_from_slice(text.as_bytes());
        out
    }

    #[test]
    fn oversized_declarations_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npz");
        let mut writer = NpzWriter::new();
        writer.add_f32("latents", vec![0.5; 2], &[2]).unwrap();
        writer.write(&path).unwrap();
        let valid = std::fs::read(&path).unwrap();

        // The .npy header declares a 4 GiB array; the file holds 8 bytes of data.
        std::fs::write(&path, with_shape(&valid, "(4, 16384, 16384)")).unwrap();
        let started = std::time::Instant::now();
        let mut reader = NpzReader::open(&path).unwrap();
        let message = reader.read_f32("latents").unwrap_err().to_string();
        assert!(
            message.contains("a.npz") && message.contains("declares 4294967296 bytes"),
            "{message}"
        );
        assert!(started.elapsed().as_secs_f64() < 1.0);

        // A shape whose byte count overflows is refused, not multiplied.
        std::fs::write(&path, with_shape(&valid, "(4294967296, 4294967296, 4)")).unwrap();
        let message = NpzReader::open(&path)
            .unwrap()
            .shape("latents")
            .unwrap_err()
            .to_string();
        assert!(message.contains("overflows"), "{message}");

        // The zip entry declares 2 GiB uncompressed.
        let mut huge_entry = valid;
        let central = huge_entry
            .windows(4)
            .position(|w| w == b"PK\x01\x02")
            .unwrap();
        huge_entry[central + 24..central + 28].copy_from_slice(&0x7fff_0000u32.to_le_bytes());
        std::fs::write(&path, &huge_entry).unwrap();
        let message = NpzReader::open(&path)
            .unwrap()
            .read_f32("latents")
            .unwrap_err()
            .to_string();
        assert!(message.contains("bytes uncompressed"), "{message}");
    }
}
