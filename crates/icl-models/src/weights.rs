//! Safetensors checkpoints (single or sharded) into a `VarStore`: copied and cast to its dtype, or
//! mapped where the file already holds a parameter as the model computes it.

use crate::{Error, Result};
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The safetensors files of a Hugging Face folder: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io { path: index.clone(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: index.clone(), message: format!("invalid JSON: {e}") })?;
        let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
            path: index.clone(),
            message: "field `weight_map`: missing or not an object".into(),
        })?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| Error::Config {
                path: index.clone(),
                message: format!("field `weight_map.{tensor}`: expected a file name"),
            })?;
            files.insert(dir.join(file));
        }
        return Ok(files.into_iter().collect());
    }
    let refused: Vec<_> = PICKLE_CHECKPOINTS.iter().filter(|f| dir.join(f).exists()).collect();
    let hint = if refused.is_empty() {
        String::new()
    } else {
        format!(
            " ({refused:?} found: pickle checkpoints can run code when loaded and are not read; convert them to \
             safetensors, or pass --allow-pickle if you trust the file)"
        )
    };
    Err(Error::Checkpoint {
        dir: dir.to_owned(),
        message: format!("no model.safetensors or model.safetensors.index.json{hint}"),
    })
}

fn kind_of(dtype: StDtype) -> Option<Kind> {
    match dtype {
        StDtype::F32 => Some(Kind::Float),
        StDtype::BF16 => Some(Kind::BFloat16),
        StDtype::F16 => Some(Kind::Half),
        StDtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

/// Refuses a config that describes more parameters than the checkpoint files could hold (at two
/// bytes each, the smallest stored dtype), before anything is allocated for it: a hostile or mistaken
/// config must fail with an error, not exhaust memory.
pub fn check_checkpoint_holds(dir: &Path, parameters: Option<u64>) -> Result<()> {
    let files = checkpoint_files(dir)?;
    let mut bytes = 0u64;
    for path in &files {
        bytes += std::fs::metadata(path).map_err(|source| Error::Io { path: path.clone(), source })?.len();
    }
    match parameters {
        Some(n) if n.saturating_mul(2) <= bytes => Ok(()),
        n => Err(Error::Config {
            path: dir.join("config.json"),
            message: format!(
                "the config describes {} parameters, more than the checkpoint's {bytes} bytes can hold",
                n.map_or("an overflowing number of".to_owned(), |n| n.to_string())
            ),
        }),
    }
}

/// Bytes of a checkpoint tensor read per step. Loading holds one such piece (twice: as read and as a
/// tensor) on top of the model, whatever the size of the largest tensor.
const LOAD_CHUNK_BYTES: usize = 16 << 20;

/// Fills every variable of `vs` from the checkpoint in `dir`, by name, casting each tensor to the
/// variable's kind and device as it is copied, so no second full copy of the model is ever held.
/// Checkpoint tensors that no variable asks for are ignored (tied heads, attention-mask buffers).
///
/// The header is parsed from a memory map, but tensor data is read with `pread` in pieces of
/// [`LOAD_CHUNK_BYTES`]: pages touched through a map count in the process's resident memory until it
/// is unmapped, which would double the peak of loading; the page cache serves reads either way.
pub fn load_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    fill_variables(vs, dir, LOAD_CHUNK_BYTES, Storage::Existing)
}

/// Gives every variable of `vs`, declared with shapes only (no storage of their own, as under
/// `declare_shapes_only`), its checkpoint tensor from `dir`, by name.
///
/// A tensor stored in its variable's kind, for a variable on the CPU, is the checkpoint file's own
/// pages: the file is mapped copy-on-write (as `safetensors` maps it for PyTorch), so nothing is read
/// or copied up front and the pages are those of the page cache. That saves a 500 MB f32 model most
/// of a second of page faults and copies at every start. Writing to such a parameter (training)
/// copies the pages it writes; the file never changes. Any other tensor is read into a new tensor of
/// the variable's kind and device as [`load_weights`] reads it.
///
/// A checkpoint file truncated or rewritten in place while a process maps it can crash that process
/// (SIGBUS) or change its weights; writers that replace files by renaming (as `icl convert` and
/// `save_pretrained` into a fresh folder do) are safe.
pub fn attach_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    fill_variables(vs, dir, LOAD_CHUNK_BYTES, Storage::Attach)
}

/// Whether the variables being filled have storage of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// Written in place.
    Existing,
    /// Given storage: mapped from the file where possible, else new.
    Attach,
}

fn fill_variables(vs: &VarStore, dir: &Path, chunk_bytes: usize, storage: Storage) -> Result<()> {
    let mut reader = CheckpointReader::open(dir)?;
    reader.chunk_bytes = chunk_bytes;
    let _guard = tch::no_grad_guard();
    // In file order: reads go forward through each file, and the first bad tensor is the first one
    // in the file.
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by_key(|(name, _)| (reader.tensors.get(name).map(|t| (t.file, t.start)), name.clone()));
    let mut missing = Vec::new();
    let mut mapped_files: Vec<Option<Tensor>> = reader.files.iter().map(|_| None).collect();
    for (name, var) in &mut variables {
        if reader.shape(name).is_none() {
            missing.push(name.clone());
            continue;
        }
        reader.check_shape(name, &var.size())?;
        if storage == Storage::Existing {
            reader.read_into(name, 0..var.numel(), &var.f_view([-1])?)?;
            continue;
        }
        let data = match reader.mapped(name, var.kind(), var.device(), &mut mapped_files)? {
            Some(data) => data,
            None => {
                let data = Tensor::f_empty(var.size().as_slice(), (var.kind(), var.device()))?;
                reader.read_into(name, 0..var.numel(), &data.f_view([-1])?)?;
                data
            }
        };
        var.f_set_data(&data)?;
    }
    if let Some(first) = missing.first() {
        return Err(Error::Tensor {
            path: dir.to_owned(),
            tensor: first.clone(),
            message: format!(
                "missing from the checkpoint ({} of the model's tensors are missing; files read: {})",
                missing.len(),
                reader.files.iter().map(|(f, _)| f.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    Ok(())
}

/// Where a checkpoint tensor's data lies.
#[derive(Debug, Clone)]
struct StoredTensor {
    /// Index into [`CheckpointReader::files`].
    file: usize,
    /// Byte offset of the data in the file.
    start: u64,
    dtype: StDtype,
    shape: Vec<i64>,
}

/// The tensors of a checkpoint folder (single or sharded safetensors), by name, read in pieces so that
/// a caller can copy any range of a tensor's elements without holding the tensor: what lets a rank
/// of a parameter-sharded model read only its shard.
///
/// The headers are parsed from a memory map that is dropped at once; tensor data is read with
/// `pread` in pieces of at most [`LOAD_CHUNK_BYTES`]: pages touched through a map count in the
/// process's resident memory until it is unmapped; the page cache serves reads either way.
#[derive(Debug)]
pub struct CheckpointReader {
    files: Vec<(PathBuf, std::fs::File)>,
    tensors: std::collections::HashMap<String, StoredTensor>,
    chunk_bytes: usize,
}

impl CheckpointReader {
    /// Opens the checkpoint files of `dir` ([`checkpoint_files`]) and reads their headers. A name
    /// found in several files is taken from the first.
    pub fn open(dir: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = std::collections::HashMap::new();
        for path in checkpoint_files(dir)? {
            let file = std::fs::File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
            // SAFETY: the map is read-only and lives until the end of this iteration; a file changed by
            // another process while we read it could give wrong weights, never memory unsafety in Rust.
            let mmap =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.clone(), source })?;
            let header = SafeTensors::deserialize(&mmap).map_err(|e| Error::Checkpoint {
                dir: path.clone(),
                message: format!("not a valid safetensors file: {e:?}"),
            })?;
            for (name, view) in header.tensors() {
                // Where the view's bytes start in the file (the view is a slice of the map).
                let start = (view.data().as_ptr() as usize - mmap.as_ptr() as usize) as u64;
                let shape = view.shape().iter().map(|&d| d as i64).collect();
                tensors.entry(name).or_insert(StoredTensor { file: files.len(), start, dtype: view.dtype(), shape });
            }
            files.push((path, file));
        }
        Ok(Self { files, tensors, chunk_bytes: LOAD_CHUNK_BYTES })
    }

    /// The shape of tensor `name`, if the checkpoint has it.
    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    /// Checks that tensor `name` exists with shape `expected`; the error names the file and tensor.
    pub fn check_shape(&self, name: &str, expected: &[i64]) -> Result<()> {
        let stored = self.stored(name)?;
        if stored.shape != expected {
            return Err(Error::Tensor {
                path: self.files[stored.file].0.clone(),
                tensor: name.to_owned(),
                message: format!("shape {:?} in the file, the model expects {expected:?}", stored.shape),
            });
        }
        Ok(())
    }

    /// Copies elements `elements` of tensor `name`, flattened in row-major order, into `destination`
    /// (that many elements, any shape), casting to its kind and moving to its device piece by piece.
    pub fn read_into(&self, name: &str, elements: std::ops::Range<usize>, destination: &Tensor) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let stored = self.stored(name)?;
        let (path, file) = &self.files[stored.file];
        let tensor_error = |message: String| Error::Tensor { path: path.clone(), tensor: name.to_owned(), message };
        let kind =
            kind_of(stored.dtype).ok_or_else(|| tensor_error(format!("unsupported dtype {:?}", stored.dtype)))?;
        let total: i64 = stored.shape.iter().product();
        if elements.end > total as usize || destination.numel() != elements.len() {
            return Err(tensor_error(format!(
                "elements {elements:?} of {total} requested into a destination of {}",
                destination.numel()
            )));
        }
        let element = stored.dtype.size();
        let per_chunk = (self.chunk_bytes / element).max(1);
        let flat = destination.f_view([-1])?;
        let mut buffer = Vec::new();
        let mut done = 0usize;
        while done < elements.len() {
            let n = per_chunk.min(elements.len() - done);
            buffer.resize(n * element, 0);
            let at = stored.start + ((elements.start + done) * element) as u64;
            file.read_exact_at(&mut buffer, at).map_err(|source| Error::Io { path: path.clone(), source })?;
            let src = Tensor::f_from_data_size(&buffer, &[n as i64], kind)?;
            // copy_ casts to the destination's kind and moves to its device.
            flat.f_narrow(0, done as i64, n as i64)?.f_copy_(&src)?;
            done += n;
        }
        Ok(())
    }

    /// Tensor `name` as a view of its file mapped copy-on-write (`files[i]`: file `i` mapped whole as
    /// bytes, mapped at the first use), when it is stored in `kind`, `device` is the CPU and its data
    /// is aligned to its element size; `None` otherwise, or where the file cannot be mapped.
    fn mapped(&self, name: &str, kind: Kind, device: Device, files: &mut [Option<Tensor>]) -> Result<Option<Tensor>> {
        let stored = self.stored(name)?;
        let element = stored.dtype.size() as u64;
        if device != Device::Cpu || kind_of(stored.dtype) != Some(kind) || stored.start % element != 0 {
            return Ok(None);
        }
        let (path, file) = &self.files[stored.file];
        if files[stored.file].is_none() {
            let Some(name) = path.to_str() else { return Ok(None) };
            let len = file.metadata().map_err(|source| Error::Io { path: path.clone(), source })?.len();
            // Not shared: the map is private, so writes to parameters never reach the file.
            match Tensor::f_from_file(name, false, len as i64, (Kind::Uint8, Device::Cpu)) {
                Ok(bytes) => files[stored.file] = Some(bytes),
                Err(_) => return Ok(None),
            }
        }
        let Some(bytes) = &files[stored.file] else { return Ok(None) };
        let numel: i64 = stored.shape.iter().product();
        let view = bytes
            .f_narrow(0, stored.start as i64, numel * element as i64)?
            .f_view_dtype(kind)?
            .f_view(stored.shape.as_slice())?;
        Ok(Some(view))
    }

    fn stored(&self, name: &str) -> Result<&StoredTensor> {
        self.tensors.get(name).ok_or_else(|| Error::Tensor {
            path: self.files.first().map(|f| f.0.clone()).unwrap_or_default(),
            tensor: name.to_owned(),
            message: "missing from the checkpoint".into(),
        })
    }
}

/// Writes a safetensors file one tensor at a time: the header (every name, dtype, shape and offset)
/// first, then each tensor's bytes in the declared order, so a converter holds one tensor at a time
/// instead of the whole model.
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    /// (name, bytes) in write order.
    entries: Vec<(String, usize)>,
    next: usize,
    /// Bytes of `entries[next]` written so far.
    written: usize,
}

fn element_size(dtype: StDtype) -> Option<usize> {
    match dtype {
        StDtype::F32 => Some(4),
        StDtype::BF16 | StDtype::F16 => Some(2),
        _ => None,
    }
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors` (name, dtype, row-major shape), which must
    /// then be written in this order with [`SafetensorsWriter::write`].
    pub fn create(path: &Path, tensors: &[(String, StDtype, Vec<usize>)]) -> Result<Self> {
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
        let mut entries = Vec::with_capacity(tensors.len());
        let mut offset = 0usize;
        for (name, dtype, shape) in tensors {
            let error = |message: String| Error::Tensor { path: path.to_owned(), tensor: name.clone(), message };
            let size = element_size(*dtype).ok_or_else(|| error(format!("cannot write dtype {dtype:?}")))?;
            let bytes = shape
                .iter()
                .try_fold(size, |n, &d| n.checked_mul(d))
                .ok_or_else(|| error(format!("shape {shape:?} overflows")))?;
            if name == "__metadata__" || header.contains_key(name) {
                return Err(error("duplicate or reserved tensor name".into()));
            }
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": format!("{dtype:?}"), "shape": shape, "data_offsets": [offset, offset + bytes] }),
            );
            offset += bytes;
            entries.push((name.clone(), bytes));
        }
        let mut json = serde_json::to_vec(&header)
            .map_err(|e| Error::Checkpoint { dir: path.to_owned(), message: format!("safetensors header: {e}") })?;
        // Tensor data starts 8-byte aligned, as the reference writer pads it (with spaces).
        json.resize(json.len().div_ceil(8) * 8, b' ');
        let io = |source| Error::Io { path: path.to_owned(), source };
        let file = std::fs::File::create(path).map_err(io)?;
        let mut file = std::io::BufWriter::with_capacity(1 << 20, file);
        use std::io::Write;
        file.write_all(&(json.len() as u64).to_le_bytes()).map_err(io)?;
        file.write_all(&json).map_err(io)?;
        Ok(Self { path: path.to_owned(), file, entries, next: 0, written: 0 })
    }

    /// Writes the next tensor's data (little-endian bytes of its declared dtype) in one piece.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        if self.written != 0 || self.entries.get(self.next).is_some_and(|(_, bytes)| *bytes != data.len()) {
            let declared = self.entries.get(self.next).map_or(0, |e| e.1);
            return Err(Error::Tensor {
                path: self.path.clone(),
                tensor: name.to_owned(),
                message: format!("{} bytes written, {declared} declared", data.len() + self.written),
            });
        }
        self.write_part(name, data)
    }

    /// Writes the next piece of the current tensor's data; the writer moves to the next declared
    /// tensor once this one's bytes are all written.
    pub fn write_part(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let error = |message: String| Error::Tensor { path: self.path.clone(), tensor: name.to_owned(), message };
        let Some((expected, bytes)) = self.entries.get(self.next) else {
            return Err(error("more tensors written than declared".into()));
        };
        if expected != name {
            return Err(error(format!("written out of order: `{expected}` comes next")));
        }
        if self.written + data.len() > *bytes {
            return Err(error(format!("{} bytes written, {bytes} declared", self.written + data.len())));
        }
        use std::io::Write;
        self.file.write_all(data).map_err(|source| Error::Io { path: self.path.clone(), source })?;
        self.written += data.len();
        if self.written == *bytes {
            self.next += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Checks that every declared tensor was written, then flushes the file to disk.
    pub fn finish(self) -> Result<()> {
        if let Some((name, bytes)) = self.entries.get(self.next) {
            let message = format!("{} of its {bytes} bytes written", self.written);
            return Err(Error::Tensor { path: self.path.clone(), tensor: name.clone(), message });
        }
        let io = |source| Error::Io { path: self.path.clone(), source };
        let file = self.file.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    }
}

/// Pickle checkpoint names, refused unless the user opts in.
const PICKLE_CHECKPOINTS: [&str; 3] = ["pytorch_model.bin", "model.pt", "model.bin"];

/// For a folder whose only checkpoint is a pickle (`pytorch_model.bin`, ...): converts it to
/// safetensors in a new temporary folder (with the folder's `config.json`) and returns that folder.
/// Only called when the user explicitly allows pickles. libtorch's C++ unpickler reconstructs tensors
/// and plain containers only (no Python objects), but it is a large parser fed an untrusted file,
/// which is why this is opt-in.
pub fn convert_pickle_checkpoint(dir: &Path) -> Result<Option<tempfile::TempDir>> {
    if checkpoint_files(dir).is_ok() {
        return Ok(None);
    }
    let Some(pickle) = PICKLE_CHECKPOINTS.iter().map(|f| dir.join(f)).find(|p| p.is_file()) else {
        return Ok(None);
    };
    let tensors = Tensor::loadz_multi(&pickle).map_err(|e| Error::Checkpoint {
        dir: pickle.clone(),
        message: format!("not a readable PyTorch checkpoint: {e}"),
    })?;
    let tmp = tempfile::Builder::new()
        .prefix("icl-pickle-")
        .tempdir()
        .map_err(|source| Error::Io { path: std::env::temp_dir(), source })?;
    let config = dir.join("config.json");
    std::fs::copy(&config, tmp.path().join("config.json")).map_err(|source| Error::Io { path: config, source })?;
    let out = tmp.path().join("model.safetensors");
    Tensor::write_safetensors(&tensors, &out)?;
    Ok(Some(tmp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_safetensors_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let a: Vec<f32> = vec![1.0, -2.5, 3.25, 0.0, 7.0, 8.0];
        let b: Vec<u16> = vec![0x3f80, 0xc000, 0x4040];
        let specs = vec![("a".to_owned(), StDtype::F32, vec![2, 3]), ("b.x".to_owned(), StDtype::BF16, vec![3])];
        let mut w = SafetensorsWriter::create(&path, &specs).expect("create");
        assert!(w.write("b.x", &[0; 6]).is_err(), "out of order must fail");
        w.write("a", &a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).expect("a");
        assert!(w.write("b.x", &[0; 4]).is_err(), "wrong length must fail");
        let b_bytes: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_part("b.x", &b_bytes[..2]).expect("b, first part");
        assert!(w.write_part("b.x", &b_bytes).is_err(), "past the declared size must fail");
        w.write_part("b.x", &b_bytes[2..]).expect("b, rest");
        assert!(w.write_part("b.x", &[0, 0]).is_err(), "nothing left to write");
        w.finish().expect("finish");

        let bytes = std::fs::read(&path).expect("read");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let ta = st.tensor("a").expect("a");
        assert_eq!((ta.dtype(), ta.shape()), (StDtype::F32, &[2usize, 3][..]));
        let back: Vec<f32> = ta.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(back, a);
        let tb = st.tensor("b.x").expect("b");
        assert_eq!((tb.dtype(), tb.shape()), (StDtype::BF16, &[3usize][..]));
        let t = Tensor::f_from_data_size(tb.data(), &[3], Kind::BFloat16).expect("tensor").to_kind(Kind::Float);
        assert_eq!(Vec::<f32>::try_from(&t).expect("vec"), vec![1.0, -2.0, 3.0]);
    }

    /// Pieces smaller than a tensor and not dividing it, into variables of another kind.
    #[test]
    fn chunked_loading_casts_every_piece() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a: Vec<f32> = (0..150).map(|i| (i as f32) * 0.731 - 40.0).collect();
        let b: Vec<u16> = (0..7).map(|i| 0x3c00 + i * 0x155).collect(); // f16 bits
        let specs = vec![("a".to_owned(), StDtype::F32, vec![3, 50]), ("b".to_owned(), StDtype::F16, vec![7])];
        let mut w = SafetensorsWriter::create(&dir.path().join("model.safetensors"), &specs).expect("create");
        w.write("a", &a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).expect("a");
        w.write("b", &b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).expect("b");
        w.finish().expect("finish");

        let mut vs = VarStore::new(tch::Device::Cpu);
        vs.set_kind(Kind::BFloat16);
        let va = vs.root().zeros("a", &[3, 50]);
        let vb = vs.root().zeros("b", &[7]);
        fill_variables(&vs, dir.path(), 36, Storage::Existing).expect("load");
        let want_a = Tensor::from_slice(&a).view([3, 50]).to_kind(Kind::BFloat16);
        assert!(va.equal(&want_a), "a: every piece copied and cast");
        let want_b =
            Tensor::f_from_data_size(&b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(), &[7], Kind::Half)
                .expect("b")
                .to_kind(Kind::BFloat16);
        assert!(vb.equal(&want_b), "b");
    }

    /// A tensor stored in its variable's kind is the file's pages (writes stay private); one of
    /// another kind is read and cast into new storage.
    #[test]
    fn attached_weights_map_matching_kinds_and_read_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let b: Vec<u16> = (0..5).map(|i| 0x3c00 + i * 0x100).collect(); // f16 bits
        let specs = vec![("a".to_owned(), StDtype::F32, vec![3, 4]), ("b".to_owned(), StDtype::F16, vec![5])];
        let path = dir.path().join("model.safetensors");
        let mut w = SafetensorsWriter::create(&path, &specs).expect("create");
        w.write("a", &a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).expect("a");
        w.write("b", &b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).expect("b");
        w.finish().expect("finish");
        let before = std::fs::read(&path).expect("read");

        let vs = VarStore::new(tch::Device::Cpu);
        let (mut va, vb) = crate::layers::declare_shapes_only(|| {
            (
                crate::layers::param(&vs.root(), "a", &[3, 4]).expect("a"),
                crate::layers::param(&vs.root(), "b", &[5]).expect("b"),
            )
        });
        attach_weights(&vs, dir.path()).expect("attach");
        assert!(va.equal(&Tensor::from_slice(&a).view([3, 4])), "a from the map");
        let want_b =
            Tensor::f_from_data_size(&b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(), &[5], Kind::Half)
                .expect("b")
                .to_kind(Kind::Float);
        assert!(vb.equal(&want_b), "b read and cast");
        let _written = tch::no_grad(|| va.f_add_scalar_(1.0)).expect("write");
        assert_eq!(va.double_value(&[0, 0]), -1.0);
        assert_eq!(std::fs::read(&path).expect("read"), before, "the file is unchanged");
    }

    #[test]
    fn unfinished_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.safetensors");
        let w = SafetensorsWriter::create(&path, &[("a".to_owned(), StDtype::F32, vec![1])]).expect("create");
        let err = w.finish().expect_err("a was never written");
        assert!(err.to_string().contains("`a`: 0 of its 4 bytes written"), "{err}");
    }
}
