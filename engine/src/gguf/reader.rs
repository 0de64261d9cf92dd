//! The GGUF container: header, metadata, tensor infos and the (memory-mapped) data section.
//!
//! Layout (little-endian, as written by llama.cpp's gguf.cpp / gguf-py):
//! ```text
//! magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
//! kv_count × (key: string, type: u32, value)
//! tensor_count × (name: string, n_dims: u32, ne: u64 × n_dims, type: u32, offset: u64)
//! padding to `general.alignment` (default 32)
//! data section; each tensor at data_start + offset
//! string = len: u64, bytes (UTF-8, no NUL)
//! array  = elem_type: u32, count: u64, elements
//! ```
//! Everything read from the file is bounds-checked before use, so a truncated or hostile file
//! yields a [`GgufError`] naming the file, never a panic or a huge allocation.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant;
use super::error::{GgufError, Result};
use super::ggml_type::GgmlType;
use super::metadata::{Metadata, Value, ValueType};

const MAGIC: [u8; 4] = *b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Nested metadata arrays deeper than this are rejected, so a crafted file cannot blow the stack.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Memory the parsed header (metadata values, tensor infos and their indexes) may take beyond
/// the file's own size. A decoded element is bigger than its encoding (a one-byte `u8` array
/// element becomes a 32-byte [`Value`]), so without a budget a crafted file of N bytes could
/// make the reader allocate 32·N. Real models' headers take a few MB to a few tens of MB
/// (a 256k-entry vocabulary with scores and types is ~30 MB), far less than their tensors.
const HEADER_MEMORY_SLACK: u64 = 64 << 20;

/// One tensor's description from the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in GGUF order: `dims[0]` (`ne[0]`) is the fastest-varying axis, i.e. the
    /// length of a row. PyTorch's shape is this reversed, see [`TensorInfo::shape`].
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes (derived from dims and type).
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape in row-major (PyTorch / safetensors) order: the GGUF dims reversed.
    /// A GGUF `[576, 49152]` embedding is `[49152, 576]` here.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Elements per row (`ne[0]`); quantization blocks never straddle rows.
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// Number of rows (all dims but the first, multiplied).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).product()
    }

    /// Bytes per row in the file's encoding.
    pub fn row_bytes(&self) -> u64 {
        self.ggml_type.bytes_for(self.row_len()).unwrap_or(0)
    }
}

/// A tensor's bytes as stored in the file, for callers that keep weights quantized.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    pub info: &'a TensorInfo,
    /// Exactly `info.n_bytes` bytes, blocks in file order (row after row).
    pub data: &'a [u8],
}

impl RawTensor<'_> {
    pub fn ggml_type(&self) -> GgmlType {
        self.info.ggml_type
    }

    /// Row-major shape, see [`TensorInfo::shape`].
    pub fn shape(&self) -> Vec<usize> {
        self.info.shape()
    }
}

/// A tensor expanded to f32, in row-major order with its PyTorch-order shape.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    pub data: Vec<f32>,
    pub shape: Vec<usize>,
}

enum Backing {
    Mmap(Mmap),
    Bytes(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

/// An open GGUF file: parsed header and metadata plus the mapped data.
pub struct GgufFile {
    path: PathBuf,
    backing: Backing,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and memory-maps a GGUF file, parsing and validating its header.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and lives as long as `self`. Like every mmap-based model
        // loader we assume nobody truncates or rewrites the model file while it is loaded; that
        // is a deployment rule, not something the process can enforce.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path, Backing::Mmap(mmap))
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.into(), Backing::Bytes(bytes))
    }

    /// The layout, in file order: header, metadata, tensor infos, then the aligned data
    /// that every tensor must lie inside.
    fn parse(path: PathBuf, backing: Backing) -> Result<Self> {
        let buf = backing.bytes();
        let mut cur = Cursor {
            buf,
            pos: 0,
            path: &path,
            budget: (buf.len() as u64).saturating_add(HEADER_MEMORY_SLACK),
        };
        let version = cur.header()?;
        let tensor_count = cur.u64("tensor count")?;
        let kv_count = cur.u64("metadata count")?;
        let metadata = cur.metadata(kv_count)?;
        let alignment = match metadata.value("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) if *a != 0 && a.is_power_of_two() => u64::from(*a),
            Some(other) => {
                return Err(cur.malformed(format!(
                    "`general.alignment` must be a u32 power of two, found {}",
                    other.describe()
                )));
            }
        };
        cur.check_count(tensor_count, 8 + 4 + 4 + 8, "tensor infos")?;
        cur.charge(
            tensor_count,
            (size_of::<TensorInfo>() + size_of::<(String, usize)>()) as u64,
            "tensor infos",
        )?;
        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut by_name = HashMap::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let info = cur.tensor_info(i, alignment)?;
            // The name is held twice (the info and the index), each dimension once.
            cur.charge(
                1,
                info.name.len() as u64 + 8 * info.dims.len() as u64,
                "tensor infos",
            )?;
            if by_name.insert(info.name.clone(), tensors.len()).is_some() {
                return Err(cur.malformed(format!("duplicate tensor name `{}`", info.name)));
            }
            tensors.push(info);
        }
        let data_offset = (cur.pos as u64).div_ceil(alignment) * alignment;
        check_tensor_data(&path, &tensors, data_offset, buf.len() as u64)?;
        Ok(Self {
            path,
            backing,
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.by_name
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| GgufError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// The tensor's bytes as stored (quantized blocks, f16 halves...), borrowed from the map.
    pub fn raw_tensor(&self, name: &str) -> Result<RawTensor<'_>> {
        let info = self.tensor_info(name)?;
        let start = self.data_offset + info.offset;
        let data = usize::try_from(start)
            .ok()
            .and_then(|s| Some(s..s.checked_add(usize::try_from(info.n_bytes).ok()?)?))
            .and_then(|r| self.backing.bytes().get(r))
            // Unreachable after the checks in `parse`, but never panic on file contents.
            .ok_or_else(|| GgufError::Tensor {
                path: self.path.clone(),
                name: name.to_string(),
                msg: "data lies outside the file".into(),
            })?;
        Ok(RawTensor { info, data })
    }

    /// The tensor expanded to f32, row-major, with its PyTorch-order shape.
    pub fn tensor_f32(&self, name: &str) -> Result<F32Tensor> {
        let raw = self.raw_tensor(name)?;
        // Refuse before allocating the output: an unsupported type would only fail later.
        if !raw.info.ggml_type.can_dequantize() {
            return Err(GgufError::UnsupportedType {
                path: self.path.clone(),
                name: name.to_string(),
                ty: raw.info.ggml_type.to_string(),
                op: "dequantize",
            });
        }
        let mut data = vec![0f32; raw.info.n_elements() as usize];
        self.dequantize_into(&raw, &mut data)?;
        Ok(F32Tensor {
            data,
            shape: raw.info.shape(),
        })
    }

    /// Expands `raw` into `out` (which must have exactly `n_elements` slots), so a caller can
    /// reuse one buffer across tensors.
    pub fn dequantize_into(&self, raw: &RawTensor<'_>, out: &mut [f32]) -> Result<()> {
        dequant::dequantize(raw.info.ggml_type, raw.data, out).map_err(|e| match e {
            dequant::DequantError::Unsupported(ty) => GgufError::UnsupportedType {
                path: self.path.clone(),
                name: raw.info.name.clone(),
                ty: ty.to_string(),
                op: "dequantize",
            },
            other => GgufError::Tensor {
                path: self.path.clone(),
                name: raw.info.name.clone(),
                msg: other.to_string(),
            },
        })
    }
}

/// A bounds-checked little-endian reader over the file image.
/// Every tensor's bytes lie inside the file.
fn check_tensor_data(
    path: &Path,
    tensors: &[TensorInfo],
    data_offset: u64,
    file_len: u64,
) -> Result<()> {
    for t in tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        if !matches!(end, Some(end) if end <= file_len) {
            return Err(GgufError::Truncated {
                path: path.to_path_buf(),
                what: format!("data of tensor `{}` ({} bytes)", t.name, t.n_bytes),
                offset: data_offset.saturating_add(t.offset),
                need: t.n_bytes,
                len: file_len,
            });
        }
    }
    Ok(())
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Bytes of memory the decoded header may still take, charged before each allocation.
    budget: u64,
}

impl<'a> Cursor<'a> {
    /// The magic and a supported version.
    fn header(&mut self) -> Result<u32> {
        let magic: [u8; 4] = self.array("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: self.path.to_path_buf(),
                found: magic,
            });
        }
        let version = self.u32("version")?;
        if version != 2 && version != 3 {
            if matches!(version.swap_bytes(), 2 | 3) {
                return Err(self.malformed("big-endian GGUF files are not supported".into()));
            }
            return Err(GgufError::UnsupportedVersion {
                path: self.path.to_path_buf(),
                version,
            });
        }
        Ok(version)
    }

    fn metadata(&mut self, count: u64) -> Result<Metadata> {
        // Each entry takes at least a few bytes; refuse counts the file cannot possibly hold
        // before reserving memory for them.
        self.check_count(count, 8 + 4 + 1, "metadata entries")?;
        let mut metadata = Metadata::new(self.path.to_path_buf());
        for i in 0..count {
            let key = self.string(&format!("metadata key #{i}"))?;
            // The entry, and its key again in the index.
            self.charge(
                1,
                (size_of::<(String, Value)>() + size_of::<(String, usize)>() + key.len()) as u64,
                "metadata entries",
            )?;
            let ty = self.u32(&format!("type of metadata `{key}`"))?;
            let value = self.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, value)?;
        }
        Ok(metadata)
    }

    /// Tensor info `#i`: name, dims, type and offset, checked for sizes that overflow or
    /// rows that are not whole blocks.
    fn tensor_info(&mut self, i: u64, alignment: u64) -> Result<TensorInfo> {
        let name = self.string(&format!("name of tensor #{i}"))?;
        let what = format!("tensor info of `{name}`");
        let n_dims = self.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(self.malformed(format!(
                "tensor `{name}` has {n_dims} dimensions (ggml allows at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(&what)?);
        }
        let type_id = self.u32(&what)?;
        let offset = self.u64(&what)?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(self.malformed(format!(
                "tensor `{name}` has unknown ggml type id {type_id}"
            )));
        };
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| self.malformed(format!("tensor `{name}` dims {dims:?} overflow")))?;
        let row = dims.first().copied().unwrap_or(1);
        if !row.is_multiple_of(ggml_type.block_size() as u64) {
            return Err(self.malformed(format!(
                "tensor `{name}`: row length {row} is not a multiple of the {ggml_type} block size {}",
                ggml_type.block_size()
            )));
        }
        let n_bytes = ggml_type
            .bytes_for(n_elements)
            .ok_or_else(|| self.malformed(format!("tensor `{name}`: size overflows")))?;
        if !offset.is_multiple_of(alignment) {
            return Err(self.malformed(format!(
                "tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_bytes,
        })
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&end| end <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                need: n,
                len: self.buf.len() as u64,
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        self.charge(1, len, what)?;
        // Files are supposed to hold UTF-8; a stray invalid byte in, say, a model name should
        // not make the whole model unloadable.
        Ok(match std::str::from_utf8(bytes) {
            Ok(s) => s.to_owned(),
            Err(_) => String::from_utf8_lossy(bytes).into_owned(),
        })
    }

    /// Takes `count × size` bytes from the memory budget, or errors: called before allocating
    /// what the file asks for, so that no file makes the reader allocate far beyond its size.
    fn charge(&mut self, count: u64, size: u64, what: &str) -> Result<()> {
        match count.checked_mul(size) {
            Some(need) if need <= self.budget => {
                self.budget -= need;
                Ok(())
            }
            _ => Err(self.malformed(format!(
                "{what}: the header would take more than {} bytes of memory for a file of {} bytes",
                (self.buf.len() as u64).saturating_add(HEADER_MEMORY_SLACK),
                self.buf.len()
            ))),
        }
    }

    fn malformed(&self, msg: String) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            msg,
        }
    }

    /// Errors if `count` items of at least `min_size` bytes cannot fit in the rest of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        let remaining = (self.buf.len() - self.pos) as u64;
        match count.checked_mul(min_size) {
            Some(need) if need <= remaining => Ok(()),
            _ => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!("{count} {what}"),
                offset: self.pos as u64,
                need: count.saturating_mul(min_size),
                len: self.buf.len() as u64,
            }),
        }
    }

    fn value(&mut self, type_id: u32, what: &str, depth: u32) -> Result<Value> {
        let Some(ty) = ValueType::from_id(type_id) else {
            return Err(self.malformed(format!("{what} has unknown value type {type_id}")));
        };
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(what)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => Value::U32(self.u32(what)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::Bool => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.malformed(format!("{what}: invalid bool byte {b}"))),
            },
            ValueType::String => Value::String(self.string(what)?),
            ValueType::U64 => Value::U64(self.u64(what)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(format!("{what}: arrays nested too deeply")));
                }
                let elem_id = self.u32(what)?;
                let count = self.u64(what)?;
                let Some(elem) = ValueType::from_id(elem_id) else {
                    return Err(
                        self.malformed(format!("{what}: array of unknown value type {elem_id}"))
                    );
                };
                self.check_count(count, elem.min_size(), &format!("elements of {what}"))?;
                self.charge(
                    count,
                    size_of::<Value>() as u64,
                    &format!("elements of {what}"),
                )?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_id, what, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}
