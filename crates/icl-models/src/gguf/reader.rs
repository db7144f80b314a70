//! Binary parsing of a GGUF file: header, metadata, tensor directory, and their validation.
//!
//! Layout (little-endian): `"GGUF"`, version u32, tensor count u64, metadata count u64; metadata as
//! (key string, value type u32, value); tensor infos as (name, n_dims u32, dims u64 x n_dims in
//! ggml order — fastest-varying first, ggml type u32, offset u64); padding to `general.alignment`
//! (default 32); then tensor data, each tensor at its offset from the start of the data section.
//!
//! Invariant: the whole directory is validated against the file length while it is parsed, before
//! anything is allocated from a count in the file, so a truncated or hostile file gives an error
//! naming the file (and tensor or key) instead of a panic or a huge allocation.

use super::{GgmlType, GgufArray, GgufTensorInfo, GgufValue};
use crate::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; a limit keeps a hostile file from recursing the stack away.
const MAX_ARRAY_DEPTH: usize = 8;

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

/// What [`parse`] found: the header, the metadata and the validated tensor directory.
pub(super) struct Parsed {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensorInfo>,
}

/// Parses and validates the header, metadata and tensor directory of `buf` (the file at `path`, named
/// in errors): every tensor of a known type lies inside the file.
pub(super) fn parse(buf: &[u8], path: &Path) -> Result<Parsed> {
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
