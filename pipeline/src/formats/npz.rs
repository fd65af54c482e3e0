//! Numpy `.npz` archives: the one reader and writer of every array cache lorakit produces.
//!
//! Files are plain uncompressed `np.savez` archives (one `<name>.npy` member per array, C order,
//! little endian), so numpy and sd-scripts load them without pickle.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use half::f16;
use npyz::WriterBuilder;

use crate::{infra::fsio, Error, Result};

/// Name of the array holding the content key that produced a cache file.
pub const KEY_ARRAY: &str = "lorakit_key";

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

    fn member(&mut self, name: &str) -> Result<npyz::NpyFile<zip::read::ZipFile<'_>>> {
        let path = &self.path;
        match self.archive.by_name(name) {
            Ok(Some(file)) => Ok(file),
            Ok(None) => Err(Error::bad_file(
                path,
                format!("has no array `{name}`; delete it to have it re-created"),
            )),
            Err(e) => Err(Error::bad_file(
                path,
                format!(
                    "array `{name}` is unreadable ({e}); delete the file to have it re-created"
                ),
            )),
        }
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

/// Stores `key_hex` as the [`KEY_ARRAY`] uint8 array (the ASCII bytes of the hex key).
pub fn store_key(writer: &mut NpzWriter, key_hex: &str) -> Result<()> {
    let bytes = key_hex.as_bytes().to_vec();
    let len = bytes.len();
    writer.add_u8(KEY_ARRAY, bytes, &[len])
}

/// The content key stored in `reader`, if it has a readable one.
pub fn stored_key(reader: &mut NpzReader) -> Option<String> {
    if !reader.contains(KEY_ARRAY) {
        return None;
    }
    let (bytes, _) = reader.read_u8(KEY_ARRAY).ok()?;
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
}
