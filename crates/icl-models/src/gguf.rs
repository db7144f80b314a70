//! GGUF (llama.cpp's checkpoint format), versions 2 and 3: metadata, tensor directory, dequantization
//! to f32, and the Llama architecture's mapping to Hugging Face tensor names.
//!
//! Layout (little-endian): `"GGUF"`, version u32, tensor count u64, metadata count u64; metadata as
//! (key string, value type u32, value); tensor infos as (name, n_dims u32, dims u64 x n_dims in
//! ggml order — fastest-varying first, ggml type u32, offset u64); padding to `general.alignment`
//! (default 32); then tensor data, each tensor at its offset from the start of the data section.
//!
//! Invariant: the whole directory is validated against the file length while it is parsed, before
//! anything is allocated from a count in the file, so a truncated or hostile file gives an error
//! naming the file (and tensor or key) instead of a panic or a huge allocation. Tensor data stays in
//! the memory map and is dequantized one tensor at a time.

use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; a limit keeps a hostile file from recursing the stack away.
const MAX_ARRAY_DEPTH: usize = 8;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(GgufArray),
}

/// A metadata array, stored by element type so that a long array costs what it costs in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
}

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F32(_) => "float32",
            Self::F64(_) => "float64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
        }
    }

    /// Any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

impl GgufArray {
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn element_type_name(&self) -> &'static str {
        match self {
            Self::U8(_) => "uint8",
            Self::I8(_) => "int8",
            Self::U16(_) => "uint16",
            Self::I16(_) => "int16",
            Self::U32(_) => "uint32",
            Self::I32(_) => "int32",
            Self::U64(_) => "uint64",
            Self::I64(_) => "int64",
            Self::F32(_) => "float32",
            Self::F64(_) => "float64",
            Self::Bool(_) => "bool",
            Self::String(_) => "string",
            Self::Array(_) => "array",
        }
    }

    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an integer array as i64 (`None` for other types or a u64 above i64::MAX).
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T], f: impl Fn(T) -> Option<i64>) -> Option<Vec<i64>> {
            v.iter().map(|&x| f(x)).collect()
        }
        match self {
            Self::U8(v) => all(v, |x| Some(x.into())),
            Self::I8(v) => all(v, |x| Some(x.into())),
            Self::U16(v) => all(v, |x| Some(x.into())),
            Self::I16(v) => all(v, |x| Some(x.into())),
            Self::U32(v) => all(v, |x| Some(x.into())),
            Self::I32(v) => all(v, |x| Some(x.into())),
            Self::U64(v) => all(v, |x| i64::try_from(x).ok()),
            Self::I64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// A ggml tensor type (`ggml_type`), known or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q8_0: Self = Self(8);
    pub const BF16: Self = Self(30);

    /// `(name, elements per block, bytes per block)` of the types ggml defines (gguf-py's
    /// `GGML_QUANT_SIZES`); ids 4 and 5 (removed Q4_2/Q4_3) and other gaps are unknown.
    fn info(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 40),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            40 => ("NVFP4", 64, 36),
            41 => ("Q1_0", 128, 18),
            _ => return None,
        })
    }

    /// `Q4_1`, or `unknown type 5` for ids ggml does not define.
    pub fn name(self) -> String {
        match self.info() {
            Some((name, _, _)) => name.to_owned(),
            None => format!("unknown type {}", self.0),
        }
    }

    /// Whether [`GgufFile::dequantize`] reads this type.
    pub fn is_supported(self) -> bool {
        matches!(self, Self::F32 | Self::F16 | Self::BF16 | Self::Q8_0 | Self::Q4_0 | Self::Q4_1)
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` varies fastest (a matrix of `rows x cols` is `[cols, rows]`).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data; `None` for types whose block size is unknown.
    pub n_bytes: Option<u64>,
}

impl GgufTensorInfo {
    /// Row-major shape (`dims` reversed), as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A memory-mapped, validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

/// Bounds-checked little-endian reads over the file; every error names the file and what was read.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, message: String) -> Error {
        Error::Gguf { path: self.path.to_owned(), message }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!(
                "truncated: {} needs {n} bytes at offset {}, the file has {} bytes",
                what(),
                self.pos,
                self.buf.len()
            )));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.buf[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit in the rest of the file:
    /// called before allocating anything sized by `count`.
    fn check_room(&self, count: u64, min_size: u64, what: &dyn Fn() -> String) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(bytes) if bytes <= self.remaining() => Ok(()),
            _ => Err(self.error(format!(
                "{}: count {count} cannot fit in the {} bytes left in the file (at least {min_size} bytes each)",
                what(),
                self.remaining()
            ))),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(&|| format!("{} (length)", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.error(format!("{}: not valid UTF-8 ({e})", what())))
    }
}

/// Smallest encoding of a value of metadata type `ty` (`None` for unknown types).
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        8 => 8,  // u64 length
        9 => 12, // u32 element type + u64 length
        _ => return None,
    })
}

fn read_value(r: &mut Reader, ty: u32, key: &str, depth: usize) -> Result<GgufValue> {
    let what = || format!("metadata `{key}`");
    Ok(match ty {
        0 => GgufValue::U8(u8::from_le_bytes(r.array(&what)?)),
        1 => GgufValue::I8(i8::from_le_bytes(r.array(&what)?)),
        2 => GgufValue::U16(u16::from_le_bytes(r.array(&what)?)),
        3 => GgufValue::I16(i16::from_le_bytes(r.array(&what)?)),
        4 => GgufValue::U32(u32::from_le_bytes(r.array(&what)?)),
        5 => GgufValue::I32(i32::from_le_bytes(r.array(&what)?)),
        6 => GgufValue::F32(f32::from_le_bytes(r.array(&what)?)),
        7 => GgufValue::Bool(read_bool(r, key)?),
        8 => GgufValue::String(r.string(&what)?),
        9 => GgufValue::Array(read_array(r, key, depth)?),
        10 => GgufValue::U64(u64::from_le_bytes(r.array(&what)?)),
        11 => GgufValue::I64(i64::from_le_bytes(r.array(&what)?)),
        12 => GgufValue::F64(f64::from_le_bytes(r.array(&what)?)),
        other => return Err(r.error(format!("metadata `{key}`: unknown value type {other}"))),
    })
}

fn read_bool(r: &mut Reader, key: &str) -> Result<bool> {
    match r.array::<1>(&|| format!("metadata `{key}`"))?[0] {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(r.error(format!("metadata `{key}`: bool byte is {other}, expected 0 or 1"))),
    }
}

fn read_array(r: &mut Reader, key: &str, depth: usize) -> Result<GgufArray> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(r.error(format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}")));
    }
    let what = || format!("metadata `{key}` (array)");
    let elem = r.u32(&what)?;
    let len = r.u64(&what)?;
    let min =
        min_value_size(elem).ok_or_else(|| r.error(format!("metadata `{key}`: unknown array element type {elem}")))?;
    r.check_room(len, min, &what)?;
    // Safe to allocate: `len` elements of at least `min` bytes each are in the file.
    let n = len as usize;
    fn fixed<T, const N: usize>(
        r: &mut Reader,
        n: usize,
        what: &dyn Fn() -> String,
        f: fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let bytes = r.take((n * N) as u64, what)?;
        Ok(bytes.chunks_exact(N).map(|c| f(c.try_into().unwrap_or([0; N]))).collect())
    }
    Ok(match elem {
        0 => GgufArray::U8(fixed(r, n, &what, u8::from_le_bytes)?),
        1 => GgufArray::I8(fixed(r, n, &what, i8::from_le_bytes)?),
        2 => GgufArray::U16(fixed(r, n, &what, u16::from_le_bytes)?),
        3 => GgufArray::I16(fixed(r, n, &what, i16::from_le_bytes)?),
        4 => GgufArray::U32(fixed(r, n, &what, u32::from_le_bytes)?),
        5 => GgufArray::I32(fixed(r, n, &what, i32::from_le_bytes)?),
        6 => GgufArray::F32(fixed(r, n, &what, f32::from_le_bytes)?),
        7 => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_bool(r, key)?);
            }
            GgufArray::Bool(v)
        }
        8 => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                v.push(r.string(&|| format!("metadata `{key}`[{i}]"))?);
            }
            GgufArray::String(v)
        }
        9 => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(r, key, depth + 1)?);
            }
            GgufArray::Array(v)
        }
        10 => GgufArray::U64(fixed(r, n, &what, u64::from_le_bytes)?),
        11 => GgufArray::I64(fixed(r, n, &what, i64::from_le_bytes)?),
        12 => GgufArray::F64(fixed(r, n, &what, f64::from_le_bytes)?),
        _ => unreachable!("min_value_size accepted type {elem}"),
    })
}

impl GgufFile {
    /// Maps and validates `path`: header, metadata, tensor directory, and that every tensor of a
    /// known type lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        // SAFETY: the map is read-only; a file changed by another process while it is mapped could give
        // wrong values (caught by the bounds checks or not), never memory unsafety in Rust.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.to_owned(), source })?;
        let parsed = parse(&map, path)?;
        Ok(Self {
            path: path.to_owned(),
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            by_name: parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            tensors: parsed.tensors,
            map,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn meta_error(&self, key: &str, message: String) -> Error {
        Error::Gguf { path: self.path.clone(), message: format!("metadata `{key}`: {message}") }
    }

    fn typed<T>(&self, key: &str, want: &str, f: impl Fn(&GgufValue) -> Option<T>) -> Result<Option<T>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => f(v)
                .map(Some)
                .ok_or_else(|| self.meta_error(key, format!("expected {want}, found {} {v:?}", v.type_name()))),
        }
    }

    /// An integer value that must be non-negative, if present.
    pub fn meta_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", GgufValue::as_u64)
    }

    pub fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", GgufValue::as_f64)
    }

    pub fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.meta_error(key, format!("expected a string, found {}", v.type_name()))),
        }
    }

    pub fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn meta_strings(&self, key: &str) -> Result<Option<&[String]>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(GgufArray::String(v))) => Ok(Some(v)),
            Some(GgufValue::Array(a)) => Err(self
                .meta_error(key, format!("expected an array of strings, found an array of {}", a.element_type_name()))),
            Some(v) => Err(self.meta_error(key, format!("expected an array of strings, found {}", v.type_name()))),
        }
    }

    /// An array of any integer type, as i64.
    pub fn meta_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => a.to_i64s().map(Some).ok_or_else(|| {
                self.meta_error(
                    key,
                    format!("expected an array of integers, found an array of {}", a.element_type_name()),
                )
            }),
            Some(v) => Err(self.meta_error(key, format!("expected an array of integers, found {}", v.type_name()))),
        }
    }

    pub fn require<T>(&self, key: &str, value: Result<Option<T>>) -> Result<T> {
        value?.ok_or_else(|| self.meta_error(key, "missing".into()))
    }

    fn tensor_error(&self, tensor: &str, message: String) -> Error {
        Error::Tensor { path: self.path.clone(), tensor: tensor.to_owned(), message }
    }

    /// The raw bytes of a tensor of a known type.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let n = info.n_bytes.ok_or_else(|| {
            self.tensor_error(
                &info.name,
                format!("unsupported quantization type {} for tensor {}", info.ggml_type.name(), info.name),
            )
        })?;
        // In range: checked against the file length when the directory was parsed.
        Ok(&self.map[info.offset as usize..(info.offset + n) as usize])
    }

    /// The tensor as f32, row-major in [`GgufTensorInfo::shape`]. Supported types: F32, F16, BF16,
    /// Q8_0, Q4_0, Q4_1.
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        if !info.ggml_type.is_supported() {
            return Err(self.tensor_error(
                &info.name,
                format!("unsupported quantization type {} for tensor {}", info.ggml_type.name(), info.name),
            ));
        }
        let bytes = self.tensor_bytes(info)?;
        let mut out = Vec::with_capacity(info.n_elements() as usize);
        dequantize_into(info.ggml_type, bytes, &mut out);
        Ok(out)
    }

    /// The tensor as f32 in consecutive pieces of whole rows (`dims[0]` elements), about
    /// `chunk_elements` each, handed to `f` in order: a converter holds one piece, not the tensor.
    pub fn dequantize_chunks(
        &self,
        info: &GgufTensorInfo,
        chunk_elements: usize,
        mut f: impl FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        if !info.ggml_type.is_supported() {
            return Err(self.tensor_error(
                &info.name,
                format!("unsupported quantization type {} for tensor {}", info.ggml_type.name(), info.name),
            ));
        }
        let bytes = self.tensor_bytes(info)?;
        let row_elements = info.dims[0] as usize;
        let n_rows = (info.n_elements() / info.dims[0]) as usize;
        // Rows are whole blocks (checked when the directory was parsed), so they split the bytes evenly.
        let row_bytes = bytes.len() / n_rows.max(1);
        let rows_per_chunk = (chunk_elements / row_elements).max(1);
        let mut out = Vec::with_capacity(rows_per_chunk.min(n_rows) * row_elements);
        for piece in bytes.chunks(rows_per_chunk * row_bytes) {
            out.clear();
            dequantize_into(info.ggml_type, piece, &mut out);
            f(&out)?;
        }
        Ok(())
    }
}

struct Parsed {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.array::<4>(&|| "the magic number".into())?;
    if &magic != MAGIC {
        return Err(r.error(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
    }
    let version = r.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => return Err(r.error("GGUF version 1 is not supported (supported: 2, 3)".into())),
        v if (2..=3).contains(&v.swap_bytes()) => {
            return Err(r.error(format!("big-endian GGUF (version {}) is not supported", v.swap_bytes())))
        }
        v => return Err(r.error(format!("unsupported GGUF version {v} (supported: 2, 3)"))),
    }
    let tensor_count = r.u64(&|| "the tensor count".into())?;
    let kv_count = r.u64(&|| "the metadata count".into())?;
    // A metadata entry is at least a key length, a type and one byte; a tensor info at least a name
    // length, n_dims, one dim, a type and an offset.
    r.check_room(kv_count, 8 + 4 + 1, &|| "metadata count".into())?;
    r.check_room(tensor_count, 8 + 4 + 8 + 4 + 8, &|| "tensor count".into())?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&|| format!("metadata key #{i}"))?;
        let ty = r.u32(&|| format!("metadata `{key}` (type)"))?;
        let value = read_value(&mut r, ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.error(format!("metadata `{key}` appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(r.error(format!("metadata `general.alignment`: expected a power-of-two uint32, found {v:?}")))
        }
    };

    let mut tensors = Vec::with_capacity(tensor_count as usize);
    let mut names = HashMap::new();
    for i in 0..tensor_count {
        let name = r.string(&|| format!("tensor #{i} (name)"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = r.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(r.error(format!("tensor `{name}`: {n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&what)?);
        }
        let ggml_type = GgmlType(r.u32(&what)?);
        let offset = r.u64(&what)?;
        if names.insert(name.clone(), i).is_some() {
            return Err(r.error(format!("tensor `{name}` appears twice")));
        }
        tensors.push((name, dims, ggml_type, offset));
    }
    let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;

    let tensors = tensors
        .into_iter()
        .map(|(name, dims, ggml_type, offset)| {
            let bad = |message: String| Error::Tensor { path: path.to_owned(), tensor: name.clone(), message };
            // ggml indexes with int64: every dimension and the element count must fit in it.
            let n_elements = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64 && dims.iter().all(|&d| d >= 1))
                .ok_or_else(|| {
                    bad(format!("invalid shape {dims:?} (each dimension at least 1, at most 2^63 - 1 elements)"))
                })?;
            if offset % alignment != 0 {
                return Err(bad(format!("data offset {offset} is not a multiple of the alignment {alignment}")));
            }
            let n_bytes = match ggml_type.info() {
                None => None,
                Some((type_name, block, block_bytes)) => {
                    if dims[0] % block != 0 {
                        return Err(bad(format!(
                            "first dimension {} is not a multiple of the {type_name} block size {block}",
                            dims[0]
                        )));
                    }
                    let n_bytes = (n_elements / block).checked_mul(block_bytes);
                    let end = n_bytes.and_then(|b| data_start.checked_add(offset)?.checked_add(b));
                    match end {
                        Some(end) if end <= file_len => n_bytes,
                        _ => {
                            return Err(bad(format!(
                                "{type_name} data of shape {dims:?} at offset {offset} runs past the end of the file \
                                 ({file_len} bytes; data section starts at {data_start}): truncated or corrupt file"
                            )))
                        }
                    }
                }
            };
            Ok(GgufTensorInfo { name, dims, ggml_type, offset: data_start + offset, n_bytes })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Parsed { version, alignment, metadata, tensors })
}

fn f16_to_f32(b: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(b).to_f32()
}

/// Appends the values of `bytes` (whole blocks of `ty`) to `out`. Quantized blocks follow ggml:
/// Q8_0 `{d: f16, q: [i8; 32]}` -> `q * d`; Q4_0 `{d: f16, q: [u8; 16]}` -> low nibbles are elements
/// 0..16 and high nibbles 16..32, `(nibble - 8) * d`; Q4_1 `{d: f16, m: f16, q: [u8; 16]}` ->
/// `nibble * d + m`, same order. Products are rounded to f32 before adding, as gguf-py computes them.
fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    match ty {
        GgmlType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        GgmlType::F16 => out.extend(bytes.chunks_exact(2).map(|c| f16_to_f32([c[0], c[1]]))),
        GgmlType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        GgmlType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = f16_to_f32([block[0], block[1]]);
                out.extend(block[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for block in bytes.chunks_exact(18) {
                let d = f16_to_f32([block[0], block[1]]);
                let qs = &block[2..];
                out.extend(qs.iter().map(|&q| f32::from((q & 0x0f) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for block in bytes.chunks_exact(20) {
                let d = f16_to_f32([block[0], block[1]]);
                let m = f16_to_f32([block[2], block[3]]);
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
        _ => unreachable!("callers check GgmlType::is_supported"),
    }
}

/// The Hugging Face name of a llama.cpp Llama tensor, or `None` for names outside the mapping.
pub fn llama_hf_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.to_owned());
    }
    let (layer, rest) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    if layer.is_empty() || !layer.bytes().all(|b| b.is_ascii_digit()) || (layer.len() > 1 && layer.starts_with('0')) {
        return None;
    }
    let hf = match rest {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// A Llama GGUF's hyper-parameters, from the `llama.*` and `tokenizer.ggml.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaGgufParams {
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// No `output.weight`: the output head is the token embedding.
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

/// One tensor of the Hugging Face checkpoint and where it comes from.
#[derive(Debug, Clone)]
pub struct LlamaTensorPlan {
    pub hf_name: String,
    /// Row-major Hugging Face shape.
    pub shape: Vec<usize>,
    /// Index into [`GgufFile::tensors`].
    pub source: usize,
    /// Heads whose rows llama.cpp's converter interleaved (q: attention heads, k: key-value heads).
    permute_heads: Option<usize>,
}

impl GgufFile {
    /// Hyper-parameters of a `general.architecture = "llama"` file, checked for what the Hugging Face
    /// Llama model can represent.
    pub fn llama_params(&self) -> Result<LlamaGgufParams> {
        let arch = self.require("general.architecture", self.meta_str("general.architecture"))?;
        if arch != "llama" {
            return Err(self
                .meta_error("general.architecture", format!("unsupported architecture `{arch}` (supported: llama)")));
        }
        let key = |k: &str| format!("llama.{k}");
        let int = |k: &str| -> Result<Option<usize>> {
            let k = key(k);
            match self.metadata.get(&k) {
                Some(GgufValue::Array(_)) => Err(self.meta_error(&k, "per-layer values are not supported".into())),
                _ => Ok(self.meta_u64(&k)?.map(|v| v as usize)),
            }
        };
        let req = |k: &str| -> Result<usize> {
            let v = self.require(&key(k), int(k))?;
            if v == 0 {
                return Err(self.meta_error(&key(k), "must be positive".into()));
            }
            Ok(v)
        };
        if int("expert_count")?.unwrap_or(0) > 0 {
            return Err(self.meta_error(&key("expert_count"), "mixture-of-experts Llama is not supported".into()));
        }
        if let Some(scaling) = self.meta_str(&key("rope.scaling.type"))? {
            if scaling != "none" {
                return Err(
                    self.meta_error(&key("rope.scaling.type"), format!("RoPE scaling `{scaling}` is not supported"))
                );
            }
        }
        if self.tensor("rope_freqs.weight").is_some() {
            return Err(self.tensor_error(
                "rope_freqs.weight",
                "RoPE frequency factors (Llama 3 scaling) are not supported".into(),
            ));
        }
        let n_layers = req("block_count")?;
        let hidden_size = req("embedding_length")?;
        let intermediate_size = req("feed_forward_length")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = int("attention.head_count_kv")?.unwrap_or(n_heads);
        if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(self.meta_error(
                &key("attention.head_count_kv"),
                format!("{n_kv_heads} key-value heads do not divide {n_heads} attention heads"),
            ));
        }
        let head_dim = match int("attention.key_length")? {
            Some(d) => d,
            None if hidden_size % n_heads == 0 => hidden_size / n_heads,
            None => {
                return Err(self.meta_error(
                    &key("embedding_length"),
                    format!("{hidden_size} is not a multiple of the {n_heads} heads"),
                ))
            }
        };
        if let Some(v) = int("attention.value_length")? {
            if v != head_dim {
                return Err(self.meta_error(
                    &key("attention.value_length"),
                    format!("{v} differs from the key length {head_dim}"),
                ));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(self
                .meta_error(&key("attention.key_length"), format!("head size {head_dim} must be even and positive")));
        }
        if let Some(rot) = int("rope.dimension_count")? {
            if rot != head_dim {
                return Err(self.meta_error(
                    &key("rope.dimension_count"),
                    format!("partial rotary embedding ({rot} of {head_dim} dimensions) is not supported"),
                ));
            }
        }
        let tokens = self.meta_strings("tokenizer.ggml.tokens")?;
        let embd = self
            .tensor("token_embd.weight")
            .ok_or_else(|| self.tensor_error("token_embd.weight", "missing (the token embedding)".into()))?;
        let vocab_size = match int("vocab_size")? {
            Some(v) => v,
            None => tokens.map(|t| t.len()).unwrap_or(*embd.dims.last().unwrap_or(&0) as usize),
        };
        let token_id = |k: &str| -> Result<Option<u32>> {
            let k = format!("tokenizer.ggml.{k}");
            match self.meta_u64(&k)? {
                None => Ok(None),
                Some(id) if (id as usize) < vocab_size => Ok(Some(id as u32)),
                Some(id) => {
                    Err(self.meta_error(&k, format!("token id {id} is outside the vocabulary of {vocab_size}")))
                }
            }
        };
        let rms_norm_eps = self.require(
            &key("attention.layer_norm_rms_epsilon"),
            self.meta_f64(&key("attention.layer_norm_rms_epsilon")),
        )?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(self.meta_error(
                &key("attention.layer_norm_rms_epsilon"),
                format!("{rms_norm_eps} is not a positive number"),
            ));
        }
        // llama.cpp's default base when the file gives none.
        let rope_theta = self.meta_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
        if !(rope_theta.is_finite() && rope_theta > 0.0) {
            return Err(self.meta_error(&key("rope.freq_base"), format!("{rope_theta} is not a positive number")));
        }
        Ok(LlamaGgufParams {
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: req("context_length")?,
            rms_norm_eps,
            rope_theta,
            tie_word_embeddings: self.tensor("output.weight").is_none(),
            bos_token_id: token_id("bos_token_id")?,
            eos_token_id: token_id("eos_token_id")?,
            pad_token_id: token_id("padding_token_id")?,
        })
    }

    /// Every tensor of the Hugging Face checkpoint, in file order, with its name and shape checked
    /// against `params`. Fails on a missing tensor, an unknown one, or a wrong shape.
    pub fn llama_plan(&self, params: &LlamaGgufParams) -> Result<Vec<LlamaTensorPlan>> {
        let p = params;
        let (q_rows, kv_rows) = (p.n_heads * p.head_dim, p.n_kv_heads * p.head_dim);
        let expected = |hf: &str| -> Option<(Vec<usize>, Option<usize>)> {
            Some(match hf {
                "model.embed_tokens.weight" | "lm_head.weight" => (vec![p.vocab_size, p.hidden_size], None),
                "model.norm.weight" => (vec![p.hidden_size], None),
                _ => {
                    let rest = hf.strip_prefix("model.layers.")?;
                    let (layer, what) = rest.split_once('.')?;
                    if layer.parse::<usize>().ok()? >= p.n_layers {
                        return None;
                    }
                    match what {
                        "self_attn.q_proj.weight" => (vec![q_rows, p.hidden_size], Some(p.n_heads)),
                        "self_attn.k_proj.weight" => (vec![kv_rows, p.hidden_size], Some(p.n_kv_heads)),
                        "self_attn.v_proj.weight" => (vec![kv_rows, p.hidden_size], None),
                        "self_attn.o_proj.weight" => (vec![p.hidden_size, q_rows], None),
                        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => {
                            (vec![p.intermediate_size, p.hidden_size], None)
                        }
                        "mlp.down_proj.weight" => (vec![p.hidden_size, p.intermediate_size], None),
                        "input_layernorm.weight" | "post_attention_layernorm.weight" => (vec![p.hidden_size], None),
                        _ => return None,
                    }
                }
            })
        };
        let mut plan = Vec::with_capacity(self.tensors.len());
        for (source, info) in self.tensors.iter().enumerate() {
            let hf_name = llama_hf_name(&info.name).ok_or_else(|| {
                self.tensor_error(
                    &info.name,
                    "not a tensor of the Llama architecture (no Hugging Face name for it)".into(),
                )
            })?;
            let (shape, permute_heads) = expected(&hf_name).ok_or_else(|| {
                self.tensor_error(&info.name, format!("layer beyond llama.block_count = {}", p.n_layers))
            })?;
            if info.shape() != shape {
                return Err(self.tensor_error(
                    &info.name,
                    format!("shape {:?} (row-major), the metadata implies {shape:?} for {hf_name}", info.shape()),
                ));
            }
            if !info.ggml_type.is_supported() {
                return Err(self.tensor_error(
                    &info.name,
                    format!("unsupported quantization type {} for tensor {}", info.ggml_type.name(), info.name),
                ));
            }
            plan.push(LlamaTensorPlan { hf_name, shape, source, permute_heads });
        }
        let mut required = vec!["token_embd.weight".to_owned(), "output_norm.weight".to_owned()];
        for layer in 0..p.n_layers {
            for t in
                ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm"]
            {
                required.push(format!("blk.{layer}.{t}.weight"));
            }
        }
        if let Some(missing) = required.iter().find(|n| self.tensor(n).is_none()) {
            return Err(self.tensor_error(missing, "missing from the file".into()));
        }
        Ok(plan)
    }

    /// A planned tensor as f32 in its Hugging Face layout: dequantized, and for q/k projections with
    /// llama.cpp's row interleaving undone.
    pub fn read_llama_tensor(&self, plan: &LlamaTensorPlan) -> Result<Vec<f32>> {
        let info = &self.tensors[plan.source];
        let data = self.dequantize(info)?;
        match plan.permute_heads {
            None => Ok(data),
            Some(heads) => self.unpermute(plan, heads, &data),
        }
    }

    /// [`GgufFile::read_llama_tensor`] in row-aligned pieces of about `chunk_elements` handed to `f`
    /// in order (q/k projections, whose rows move between heads, come in one piece).
    pub fn read_llama_tensor_chunks(
        &self,
        plan: &LlamaTensorPlan,
        chunk_elements: usize,
        mut f: impl FnMut(&[f32]) -> Result<()>,
    ) -> Result<()> {
        let info = &self.tensors[plan.source];
        match plan.permute_heads {
            None => self.dequantize_chunks(info, chunk_elements, f),
            Some(heads) => f(&self.unpermute(plan, heads, &self.dequantize(info)?)?),
        }
    }

    fn unpermute(&self, plan: &LlamaTensorPlan, heads: usize, data: &[f32]) -> Result<Vec<f32>> {
        unpermute_rows(data, &plan.shape, heads).ok_or_else(|| {
            let name = &self.tensors[plan.source].name;
            self.tensor_error(name, format!("{:?} rows do not split into {heads} heads of even size", plan.shape))
        })
    }
}

/// Undoes llama.cpp's converter, which stores the rows of each head's q/k projection as
/// `[r0, r_half, r1, r_half+1, ...]` (pairs interleaved, its RoPE layout); Hugging Face keeps
/// `[r0, r1, ..., r_half, ...]` (rotate-half layout). For head `h` with `half = head_dim / 2`, file row
/// `h*head_dim + 2*j + i` is Hugging Face row `h*head_dim + i*half + j` — what transformers' GGUF loader
/// does with `reshape(heads, half, 2, cols).swapaxes(1, 2)`.
fn unpermute_rows(data: &[f32], shape: &[usize], heads: usize) -> Option<Vec<f32>> {
    let (&rows, cols) = shape.split_first()?;
    let cols: usize = cols.iter().product();
    if heads == 0 || rows % (2 * heads) != 0 || data.len() != rows * cols {
        return None;
    }
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..heads {
        for j in 0..half {
            for i in 0..2 {
                let src = h * head_dim + 2 * j + i;
                let dst = h * head_dim + i * half + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names() {
        assert_eq!(llama_hf_name("blk.12.attn_q.weight").as_deref(), Some("model.layers.12.self_attn.q_proj.weight"));
        assert_eq!(
            llama_hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(llama_hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        for bad in [
            "blk..attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_qq.weight",
            "rope_freqs.weight",
        ] {
            assert_eq!(llama_hf_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp's permute, written independently: reshape(heads, 2, half, cols).swapaxes(1, 2).
        let (heads, head_dim, cols) = (3, 4, 2);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        let half = head_dim / 2;
        for h in 0..heads {
            for i in 0..2 {
                for j in 0..half {
                    let hf_row = h * head_dim + i * half + j;
                    let gguf_row = h * head_dim + j * 2 + i;
                    for c in 0..cols {
                        gguf[gguf_row * cols + c] = hf[hf_row * cols + c];
                    }
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, &[rows, cols], heads), Some(hf));
        assert_eq!(unpermute_rows(&gguf, &[rows, cols], 5), None);
    }
}
