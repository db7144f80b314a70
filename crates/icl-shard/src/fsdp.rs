//! Fully sharded parameters (FSDP): every rank keeps `1/N` of each unit's parameters and gathers a
//! unit only while it computes with it.
//!
//! A *unit* is a group of tensors that a forward pass uses together (a transformer block, the
//! embedding). Its tensors are laid out as one flat vector in declaration order, padded with zeros to a
//! multiple of the world size `N`, and rank `r` keeps elements `r * len..(r + 1) * len` of it
//! ([`FlatLayout`]). Gathering a unit is one [`Collective::all_gather_into`] into a flat buffer whose
//! pieces become the tensors' data in place (`set_data`): the model's own tensor handles share their
//! implementation with the ones held here, so the model computes with the gathered values without
//! knowing about shards. Releasing a unit points the tensors at empty storage, which frees the buffer.
//!
//! The module knows nothing about models or checkpoints: the caller names the units, hands over the
//! tensors, and fills each rank's shard from its checkpoint through a callback, so no rank ever holds
//! a whole unit it is not computing with.

use crate::{Collective, PendingCollective, Result};
use std::cell::{RefCell, RefMut};
use std::ops::Range;
use std::rc::Rc;
use tch::{Device, Kind, Tensor};

/// How a unit's tensors (by element count, in order) are concatenated into one flat vector and split
/// into `world_size` equal shards, the last one padded with zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    numels: Vec<usize>,
    /// Where each tensor starts in the flat vector.
    offsets: Vec<usize>,
    total: usize,
    shard_len: usize,
    world_size: usize,
}

/// The part of one tensor that a shard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPiece {
    /// Index of the tensor in the unit.
    pub tensor: usize,
    /// Elements of the (flattened) tensor.
    pub elements: Range<usize>,
    /// Where those elements start in the shard.
    pub shard_offset: usize,
}

impl FlatLayout {
    /// # Panics
    /// If `world_size` is 0.
    pub fn new(numels: &[usize], world_size: usize) -> Self {
        assert!(world_size > 0, "a layout needs at least one rank");
        let mut offsets = Vec::with_capacity(numels.len());
        let mut total = 0;
        for &n in numels {
            offsets.push(total);
            total += n;
        }
        Self { numels: numels.to_vec(), offsets, total, shard_len: total.div_ceil(world_size), world_size }
    }

    /// Elements of the unit's tensors together.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Elements each rank keeps (the same on every rank).
    pub fn shard_len(&self) -> usize {
        self.shard_len
    }

    /// Length of the gathered flat vector: `shard_len * world_size`, at least [`FlatLayout::total`].
    pub fn padded_len(&self) -> usize {
        self.shard_len * self.world_size
    }

    /// Where tensor `i` starts in the flat vector.
    pub fn offset(&self, i: usize) -> usize {
        self.offsets[i]
    }

    /// The pieces of tensors that `rank`'s shard holds, in shard order; the shard's elements after the
    /// last piece are padding.
    pub fn pieces(&self, rank: usize) -> Vec<ShardPiece> {
        let shard = rank * self.shard_len..((rank + 1) * self.shard_len).min(self.total);
        let mut pieces = Vec::new();
        for (tensor, (&offset, &numel)) in self.offsets.iter().zip(&self.numels).enumerate() {
            let (start, end) = (offset.max(shard.start), (offset + numel).min(shard.end));
            if start < end {
                pieces.push(ShardPiece {
                    tensor,
                    elements: start - offset..end - offset,
                    shard_offset: start - shard.start,
                });
            }
        }
        pieces
    }
}

/// One tensor of a unit, as [`ShardedParameters::new`] receives it: its name (for the fill callback
/// and errors) and a handle sharing its implementation with the model's.
#[derive(Debug)]
pub struct UnitTensor {
    pub name: String,
    pub tensor: Tensor,
}

#[derive(Debug)]
enum Gathered {
    Released,
    /// The gather was started; the tensors get their data when it is waited for.
    Pending {
        buffer: Tensor,
        pending: Box<dyn PendingCollective>,
    },
    /// The tensors are views of `buffer`.
    Ready {
        buffer: Tensor,
    },
}

#[derive(Debug)]
struct Unit {
    name: String,
    tensors: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    layout: FlatLayout,
    /// This rank's shard, `[shard_len]`.
    shard: Tensor,
    /// Empty storage the released tensors share. Made once: releasing a unit must not allocate, or the
    /// small blocks made mid-forward would stay between freed activations and fragment the heap.
    empty: Tensor,
    state: Gathered,
}

/// Counters of the parameter bytes this rank holds: shards always, gathered units while gathered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeldBytes {
    /// Bytes of every unit's shard.
    pub shards: usize,
    /// Bytes of gathered (or being gathered) units now.
    pub gathered: usize,
    /// Bytes of gather buffers kept for reuse (at most as many of each length as were ever in use at
    /// once), so that gathering does not churn the allocator.
    pub spare: usize,
    /// The most `shards + gathered + spare` has been since [`ShardedParameters::new`].
    pub peak: usize,
    /// Bytes of all parameters unsharded (what every rank would hold without sharding).
    pub unsharded: usize,
}

/// The collective a parameter sharder shares with the rest of the program (the evaluator's own
/// collectives go through the same ranks).
pub type SharedCollective = Rc<dyn Collective>;

/// Every unit's shard on this rank, and which units are gathered now. All ranks must gather units
/// in the same order (the collectives are matched by order), which a forward pass over the same
/// model gives.
#[derive(Debug)]
pub struct ShardedParameters {
    collective: SharedCollectiveDebug,
    units: RefCell<Vec<Unit>>,
    bytes: RefCell<HeldBytes>,
    /// Seconds spent starting gathers and waiting for them: the communication that did not overlap.
    blocked: std::cell::Cell<f64>,
    /// Released gather buffers, reused by the next gather of the same length.
    spare: RefCell<Vec<Tensor>>,
}

struct SharedCollectiveDebug(SharedCollective);

impl std::fmt::Debug for SharedCollectiveDebug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.0.rank(), self.0.world_size())
    }
}

impl ShardedParameters {
    /// Shards `units` (name, tensors) over the collective's ranks in `kind` on `device`. The tensors
    /// are released at once (their current storage is dropped, never read), then `fill(name,
    /// elements, destination)` writes elements `elements` of the named tensor (flattened, row-major)
    /// into `destination`, a 1-D tensor of that length in this rank's shard. Padding is zero.
    pub fn new<E: From<crate::Error>>(
        collective: SharedCollective,
        units: Vec<(String, Vec<UnitTensor>)>,
        kind: Kind,
        device: Device,
        mut fill: impl FnMut(&str, Range<usize>, &mut Tensor) -> Result<(), E>,
    ) -> Result<Self, E> {
        let _guard = tch::no_grad_guard();
        let (rank, world_size) = (collective.rank(), collective.world_size());
        let mut built = Vec::with_capacity(units.len());
        let mut bytes = HeldBytes::default();
        let element = kind.elt_size_in_bytes();
        for (name, tensors) in units {
            let shapes: Vec<Vec<i64>> = tensors.iter().map(|t| t.tensor.size()).collect();
            let numels: Vec<usize> = tensors.iter().map(|t| t.tensor.numel()).collect();
            let layout = FlatLayout::new(&numels, world_size);
            let empty = Tensor::f_empty([0], (kind, device)).map_err(crate::Error::from)?;
            let mut handles = Vec::with_capacity(tensors.len());
            for UnitTensor { tensor, .. } in &tensors {
                let mut handle = tensor.shallow_clone();
                release(&mut handle, &empty)?;
                handles.push(handle);
            }
            let shard = Tensor::f_zeros([layout.shard_len() as i64], (kind, device)).map_err(crate::Error::from)?;
            for piece in layout.pieces(rank) {
                let len = piece.elements.len() as i64;
                let mut destination = shard.f_narrow(0, piece.shard_offset as i64, len).map_err(crate::Error::from)?;
                fill(&tensors[piece.tensor].name, piece.elements.clone(), &mut destination)?;
            }
            bytes.shards += layout.shard_len() * element;
            bytes.unsharded += layout.total() * element;
            built.push(Unit { name, tensors: handles, shapes, layout, shard, empty, state: Gathered::Released });
        }
        bytes.peak = bytes.shards;
        Ok(Self {
            collective: SharedCollectiveDebug(collective),
            units: RefCell::new(built),
            bytes: RefCell::new(bytes),
            blocked: Default::default(),
            spare: Default::default(),
        })
    }

    /// The collective the parameters are sharded over.
    pub fn collective(&self) -> &SharedCollective {
        &self.collective.0
    }

    /// Seconds this rank has spent blocked in gathers (starting them, and waiting for them to
    /// finish): the part of the communication that did not overlap computation.
    pub fn blocked_seconds(&self) -> f64 {
        self.blocked.get()
    }

    /// Unit names, in the order given to [`ShardedParameters::new`].
    pub fn unit_names(&self) -> Vec<String> {
        self.units_mut().iter().map(|u| u.name.clone()).collect()
    }

    /// Each unit's name and the bytes it takes while gathered (padding included).
    pub fn unit_bytes(&self) -> Vec<(String, usize)> {
        let units = self.units_mut();
        units.iter().map(|u| (u.name.clone(), u.layout.padded_len() * u.shard.kind().elt_size_in_bytes())).collect()
    }

    /// This rank's parameter bytes: shards, gathered now, and the peak so far.
    pub fn held_bytes(&self) -> HeldBytes {
        *self.bytes.borrow()
    }

    /// Starts gathering `unit` without waiting for it (nothing if it is gathered or on its way), so
    /// that the exchange overlaps whatever the caller computes next.
    pub fn prefetch(&self, unit: usize) -> Result<()> {
        let mut units = self.units_mut();
        let unit = units.get_mut(unit).ok_or_else(|| no_unit(unit))?;
        if matches!(unit.state, Gathered::Released) {
            let element = unit.shard.kind().elt_size_in_bytes();
            let (len, kind, device) = (unit.layout.padded_len(), unit.shard.kind(), unit.shard.device());
            let bytes = len * element;
            let mut spare = self.spare.borrow_mut();
            let fits = |b: &Tensor| b.numel() == len && b.kind() == kind && b.device() == device;
            let mut buffer = match spare.iter().position(fits) {
                Some(i) => {
                    self.count(0, -(bytes as isize));
                    spare.swap_remove(i)
                }
                None => Tensor::f_empty([len as i64], (kind, device))?,
            };
            drop(spare);
            let started = std::time::Instant::now();
            let pending = self.collective.0.start_all_gather_into(&unit.shard, &mut buffer)?;
            self.blocked.set(self.blocked.get() + started.elapsed().as_secs_f64());
            unit.state = Gathered::Pending { buffer, pending };
            self.count(bytes as isize, 0);
        }
        Ok(())
    }

    /// Makes `unit`'s tensors hold their full values: waits for a prefetch, or gathers now.
    pub fn gather(&self, unit: usize) -> Result<()> {
        self.prefetch(unit)?;
        let _guard = tch::no_grad_guard();
        let mut units = self.units_mut();
        let unit = units.get_mut(unit).ok_or_else(|| no_unit(unit))?;
        match std::mem::replace(&mut unit.state, Gathered::Released) {
            Gathered::Pending { buffer, pending } => {
                let started = std::time::Instant::now();
                pending.wait()?;
                self.blocked.set(self.blocked.get() + started.elapsed().as_secs_f64());
                for (i, (tensor, shape)) in unit.tensors.iter_mut().zip(&unit.shapes).enumerate() {
                    let numel: i64 = shape.iter().product();
                    let view = buffer.f_narrow(0, unit.layout.offset(i) as i64, numel)?.f_view(shape.as_slice())?;
                    tensor.f_set_data(&view)?;
                }
                unit.state = Gathered::Ready { buffer };
            }
            other => unit.state = other,
        }
        Ok(())
    }

    /// Drops `unit`'s gathered values (waiting first for a gather in flight, which the other ranks
    /// take part in); its tensors become empty until the next [`ShardedParameters::gather`].
    pub fn release(&self, unit: usize) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let mut units = self.units_mut();
        let unit = units.get_mut(unit).ok_or_else(|| no_unit(unit))?;
        let kind = unit.shard.kind();
        let buffer = match std::mem::replace(&mut unit.state, Gathered::Released) {
            Gathered::Released => return Ok(()),
            Gathered::Pending { pending, buffer } => {
                pending.wait()?;
                buffer
            }
            Gathered::Ready { buffer } => {
                // The tensors drop their views; the models keep no view of a parameter past its stage,
                // so the buffer is free for the next gather of its length.
                for tensor in &mut unit.tensors {
                    release(tensor, &unit.empty)?;
                }
                buffer
            }
        };
        let bytes = (buffer.numel() * kind.elt_size_in_bytes()) as isize;
        self.spare.borrow_mut().push(buffer);
        self.count(-bytes, bytes);
        Ok(())
    }

    /// Allocates the gather buffers ahead: for each gather length, one per unit of that length, at
    /// most two (a stage and the next one, prefetched). Called once after loading, before any
    /// activation exists, it puts them below the activations in the heap instead of between them, where
    /// they would split the space that large activations need.
    pub fn reserve_buffers(&self) -> Result<()> {
        let mut wanted: Vec<(usize, Kind, Device, usize)> = Vec::new();
        for unit in self.units_mut().iter() {
            let key = (unit.layout.padded_len(), unit.shard.kind(), unit.shard.device());
            match wanted.iter_mut().find(|w| (w.0, w.1, w.2) == key) {
                Some(w) => w.3 = (w.3 + 1).min(2),
                None => wanted.push((key.0, key.1, key.2, 1)),
            }
        }
        for (len, kind, device, count) in wanted {
            for _ in 0..count {
                let buffer = Tensor::f_empty([len as i64], (kind, device))?;
                self.spare.borrow_mut().push(buffer);
                self.count(0, (len * kind.elt_size_in_bytes()) as isize);
            }
        }
        Ok(())
    }

    /// Whether `unit` is gathered or being gathered.
    pub fn is_gathered(&self, unit: usize) -> bool {
        self.units_mut().get(unit).is_some_and(|u| !matches!(u.state, Gathered::Released))
    }

    fn count(&self, gathered: isize, spare: isize) {
        let mut held = self.bytes.borrow_mut();
        held.gathered = held.gathered.saturating_add_signed(gathered);
        held.spare = held.spare.saturating_add_signed(spare);
        held.peak = held.peak.max(held.shards + held.gathered + held.spare);
    }

    fn units_mut(&self) -> RefMut<'_, Vec<Unit>> {
        self.units.borrow_mut()
    }
}

fn no_unit(unit: usize) -> crate::Error {
    crate::Error::Collective { op: "gather", message: format!("no parameter unit {unit}") }
}

/// Points `tensor` at `empty`'s storage, dropping its reference to the old one.
fn release(tensor: &mut Tensor, empty: &Tensor) -> Result<()> {
    tensor.f_set_data(empty)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::SingleProcess;

    #[test]
    fn layout_pads_the_last_shard_and_covers_every_element_once() {
        // 3 + 7 + 2 = 12 elements over 5 ranks: shards of 3, the last one 3 padding elements.
        let layout = FlatLayout::new(&[3, 7, 2], 5);
        assert_eq!((layout.total(), layout.shard_len(), layout.padded_len()), (12, 3, 15));
        assert_eq!(layout.pieces(0), vec![ShardPiece { tensor: 0, elements: 0..3, shard_offset: 0 }]);
        assert_eq!(layout.pieces(1), vec![ShardPiece { tensor: 1, elements: 0..3, shard_offset: 0 }]);
        assert_eq!(
            layout.pieces(3),
            vec![
                ShardPiece { tensor: 1, elements: 6..7, shard_offset: 0 },
                ShardPiece { tensor: 2, elements: 0..2, shard_offset: 1 }
            ]
        );
        assert!(layout.pieces(4).is_empty(), "rank 4 holds only padding");
        for world in 1..=7 {
            let layout = FlatLayout::new(&[5, 1, 0, 9], world);
            let mut seen = vec![0; 15];
            for rank in 0..world {
                for p in layout.pieces(rank) {
                    assert!(p.shard_offset + p.elements.len() <= layout.shard_len());
                    for e in p.elements {
                        seen[layout.offset(p.tensor) + e] += 1;
                    }
                }
            }
            assert_eq!(seen, vec![1; 15], "world {world}");
            assert!(layout.padded_len() >= 15 && layout.padded_len() < 15 + world);
        }
    }

    #[test]
    fn gathered_tensors_share_the_model_handles_and_release_frees_them() {
        let opts = (Kind::Float, Device::Cpu);
        let a = Tensor::f_empty([2, 3], opts).unwrap();
        let b = Tensor::f_empty([4], opts).unwrap();
        let model_view = a.shallow_clone();
        let values = |name: &str| -> Vec<f32> {
            let n = if name == "a" { 6 } else { 4 };
            (0..n).map(|i| i as f32 + if name == "a" { 0.5 } else { 100.0 }).collect()
        };
        let units = vec![(
            "u".to_owned(),
            vec![
                UnitTensor { name: "a".into(), tensor: a },
                UnitTensor { name: "b".into(), tensor: b.shallow_clone() },
            ],
        )];
        let params = ShardedParameters::new::<crate::Error>(
            Rc::new(SingleProcess),
            units,
            Kind::Float,
            Device::Cpu,
            |name, elements, dst| {
                dst.f_copy_(&Tensor::from_slice(&values(name)[elements]))?;
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(model_view.numel(), 0, "released as soon as sharded");
        params.gather(0).unwrap();
        assert_eq!(model_view.size(), vec![2, 3]);
        assert_eq!(Vec::<f32>::try_from(&model_view.view([-1])).unwrap(), values("a"));
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), values("b"));
        let held = params.held_bytes();
        assert_eq!((held.shards, held.gathered, held.unsharded), (40, 40, 40));
        params.release(0).unwrap();
        assert_eq!((model_view.numel(), b.numel()), (0, 0));
        assert_eq!((params.held_bytes().gathered, params.held_bytes().spare), (0, 40));
        assert_eq!(params.held_bytes().peak, 80);
        // The kept buffer serves the next gather: no growth.
        params.gather(0).unwrap();
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), values("b"));
        assert_eq!((params.held_bytes().gathered, params.held_bytes().spare, params.held_bytes().peak), (40, 0, 80));
        assert!(params.gather(1).is_err());
    }
}
