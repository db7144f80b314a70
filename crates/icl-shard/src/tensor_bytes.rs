//! Tensors as plain host memory, for engines that take buffers (MPI) or device pointers (NCCL).
#![cfg_attr(not(feature = "mpi"), allow(dead_code))]

use crate::{Error, Result};
use tch::{Device, Kind, Tensor};

/// A contiguous copy or view of `t` in host memory (a view when `t` already is one).
pub(crate) fn host_contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(t.f_to_device(Device::Cpu)?.f_contiguous()?)
}

/// Checks that an engine with `i32` counts (MPI) can take `n` elements.
pub(crate) fn count_i32(op: &'static str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Collective { op, message: format!("{n} elements exceed MPI's 32-bit count") })
}

/// The bytes of a contiguous host tensor.
pub(crate) fn bytes(t: &Tensor) -> &[u8] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor owns `numel * element size` initialized bytes at data_ptr, alive as
    // long as the borrowed tensor.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
}

/// The bytes of a contiguous host tensor, for writing. The tensor must not share storage with one
/// that is read at the same time.
pub(crate) fn bytes_mut(t: &mut Tensor) -> &mut [u8] {
    debug_assert!(t.device() == Device::Cpu && t.is_contiguous());
    let len = t.numel() * t.kind().elt_size_in_bytes();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as in `bytes`; the exclusive borrow of the tensor stands for exclusive use of its storage.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, len) }
}

/// The elements of a contiguous host tensor of the Rust type matching its kind.
pub(crate) fn typed<T: tch::kind::Element>(t: &Tensor) -> Result<&[T]> {
    check_kind::<T>(t)?;
    let b = bytes(t);
    if b.is_empty() {
        return Ok(&[]);
    }
    // SAFETY: the kind matches T (checked above), and libtorch aligns storage for its element type.
    Ok(unsafe { std::slice::from_raw_parts(b.as_ptr() as *const T, t.numel()) })
}

pub(crate) fn typed_mut<T: tch::kind::Element>(t: &mut Tensor) -> Result<&mut [T]> {
    check_kind::<T>(t)?;
    let n = t.numel();
    let b = bytes_mut(t);
    if b.is_empty() {
        return Ok(&mut []);
    }
    // SAFETY: as in `typed`.
    Ok(unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut T, n) })
}

fn check_kind<T: tch::kind::Element>(t: &Tensor) -> Result<()> {
    if t.kind() != T::KIND {
        return Err(Error::Collective {
            op: "buffer",
            message: format!("tensor of {:?} read as {:?}", t.kind(), T::KIND),
        });
    }
    Ok(())
}

/// The kind that sums of `kind` are computed in when the engine has no type for it (MPI has no
/// bfloat16/half sum): the sum runs in f32 and is cast back.
pub(crate) fn sum_kind(kind: Kind) -> Kind {
    match kind {
        Kind::BFloat16 | Kind::Half => Kind::Float,
        Kind::Bool => Kind::Uint8,
        other => other,
    }
}

/// A copy of `t` with storage of its own.
pub(crate) fn owned_copy(t: &Tensor) -> Result<Tensor> {
    let mut copy = t.f_empty_like()?.f_contiguous()?;
    copy.f_copy_(t)?;
    Ok(copy)
}
