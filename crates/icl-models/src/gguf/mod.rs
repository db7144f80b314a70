//! GGUF (llama.cpp's checkpoint format), versions 2 and 3: a memory-mapped, validated [`GgufFile`] with
//! typed access to its metadata and tensor directory, and dequantization of tensors to f32.
//!
//! Files: `reader.rs` parses the binary layout (header, metadata, tensor directory) and validates it;
//! `values.rs` holds the metadata value types ([`GgufValue`], [`GgufArray`]) and [`GgmlType`];
//! `dequant.rs` decodes F32, F16, BF16, Q8_0, Q4_0 and Q4_1 blocks. Nothing here knows an
//! architecture: the Llama mapping to Hugging Face names and config ([`GgufFile::llama_params`],
//! [`GgufFile::llama_plan`], [`GgufFile::read_llama_tensor`]) is in `llama_gguf.rs`, next to `llama.rs`.
//!
//! Invariant: the whole directory is validated against the file length while it is parsed, before
//! anything is allocated from a count in the file, so a truncated or hostile file gives an error
//! naming the file (and tensor or key) instead of a panic or a huge allocation. Tensor data stays in
//! the memory map and is dequantized one tensor at a time.

mod dequant;
mod reader;
mod values;

pub use crate::llama_gguf::{llama_hf_name, LlamaTensorPlan};
pub use values::{GgmlType, GgufArray, GgufValue};

use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

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

impl GgufFile {
    /// Maps and validates `path`: header, metadata, tensor directory, and that every tensor of a
    /// known type lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
        // SAFETY: the map is read-only; a file changed by another process while it is mapped could give
        // wrong values (caught by the bounds checks or not), never memory unsafety in Rust.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.to_owned(), source })?;
        let parsed = reader::parse(&map, path)?;
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

    pub(crate) fn meta_error(&self, key: &str, message: String) -> Error {
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

    pub(crate) fn tensor_error(&self, tensor: &str, message: String) -> Error {
        Error::Tensor { path: self.path.clone(), tensor: tensor.to_owned(), message }
    }

    /// Fails, naming the tensor and its type, unless [`GgufFile::dequantize`] reads the tensor's type.
    pub(crate) fn check_supported(&self, info: &GgufTensorInfo) -> Result<()> {
        if info.ggml_type.is_supported() {
            Ok(())
        } else {
            Err(self.unsupported(info))
        }
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> Error {
        self.tensor_error(
            &info.name,
            format!("unsupported quantization type {} for tensor {}", info.ggml_type.name(), info.name),
        )
    }

    /// The raw bytes of a tensor of a known type.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let n = info.n_bytes.ok_or_else(|| self.unsupported(info))?;
        // In range: checked against the file length when the directory was parsed.
        Ok(&self.map[info.offset as usize..(info.offset + n) as usize])
    }

    /// The tensor as f32, row-major in [`GgufTensorInfo::shape`]. Supported types: F32, F16, BF16,
    /// Q8_0, Q4_0, Q4_1.
    pub fn dequantize(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        self.check_supported(info)?;
        let bytes = self.tensor_bytes(info)?;
        let mut out = Vec::with_capacity(info.n_elements() as usize);
        dequant::dequantize_into(info.ggml_type, bytes, &mut out);
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
        self.check_supported(info)?;
        let bytes = self.tensor_bytes(info)?;
        let row_elements = info.dims[0] as usize;
        let n_rows = (info.n_elements() / info.dims[0]) as usize;
        // Rows are whole blocks (checked when the directory was parsed), so they split the bytes evenly.
        let row_bytes = bytes.len() / n_rows.max(1);
        let rows_per_chunk = (chunk_elements / row_elements).max(1);
        let mut out = Vec::with_capacity(rows_per_chunk.min(n_rows) * row_elements);
        for piece in bytes.chunks(rows_per_chunk * row_bytes) {
            out.clear();
            dequant::dequantize_into(info.ggml_type, piece, &mut out);
            f(&out)?;
        }
        Ok(())
    }
}
