//! Batch size from memory (`--batch-tokens auto`): how many tokens a forward pass may hold, from the
//! memory the device has free and what a token costs the model, so that no user has to tune it. The
//! out-of-memory backoff of the run loop stays the net when the estimate is wrong.

/// The share of free memory that batches may take: activations are estimated, other allocations
/// (the head's chunks, the allocator's slack, other processes) come on top, and on Linux a CPU
/// allocation that overshoots is not an error the backoff could catch but the out-of-memory killer.
const USABLE_SHARE: f64 = 0.25;

/// Fewest and most tokens per batch `auto` chooses: below the first matmuls run inefficiently; above
/// the second nothing is gained and a batch takes long to retry.
const AUTO_RANGE: (usize, usize) = (1024, 1 << 20);

/// Most tokens `auto` gives a scoring batch on the CPU: 4096, or 2048 in a 16-bit dtype. A scoring
/// pass's matmuls already run at full speed with that many rows; larger batches only push the
/// activations out of the caches between one operation and the next. On the 2-core AMX Xeon of the
/// README, GPT-Neo-125M over 500 LAMBADA rows ran at 316 GFLOP/s in f32 with 8192 tokens, 312 with
/// 4096 and 261 with the 79102 free memory allowed; in bf16 at 1033 GFLOP/s with 2048, 939 with 4096
/// and 855 with 153919 (PIQA: 787 against 633). Generation batches keep the memory-sized budget:
/// a decoding step reads the weights once for all its rows.
pub fn cpu_scoring_tokens(dtype_bytes: usize) -> usize {
    if dtype_bytes <= 2 {
        2048
    } else {
        4096
    }
}

/// Where the free-memory figure came from, and the figure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeMemory {
    pub bytes: u64,
    /// `MemAvailable in /proc/meminfo`, `nvidia-smi (GPU 0)`, ...
    pub source: String,
}

/// Memory the device has free: `MemAvailable` of `/proc/meminfo` on the CPU, the GPU's free memory as
/// `nvidia-smi` reports it on CUDA (physical index through `CUDA_VISIBLE_DEVICES`); `None` when that
/// cannot be read.
pub fn free_memory(device: tch::Device) -> Option<FreeMemory> {
    match device {
        tch::Device::Cuda(ordinal) => cuda_free_memory(ordinal),
        _ => {
            let text = std::fs::read_to_string("/proc/meminfo").ok()?;
            let bytes = mem_available(&text)?;
            Some(FreeMemory { bytes, source: "MemAvailable in /proc/meminfo".into() })
        }
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn cuda_free_memory(ordinal: usize) -> Option<FreeMemory> {
    // CUDA numbers the visible devices; nvidia-smi the physical ones.
    let physical = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').nth(ordinal)?.trim().to_owned(),
        _ => ordinal.to_string(),
    };
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", &physical])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(FreeMemory { bytes: mib << 20, source: format!("nvidia-smi memory.free of GPU {physical}") })
}

/// Bytes one token of a batch needs at the peak of a forward pass, roughly: hidden-sized activations
/// (residual stream, norms, queries, keys, values, attention output; the MLP's inner width is up to
/// about 8x hidden) in the compute dtype, and per key it attends to its row's boolean mask and f32
/// scores.
pub fn bytes_per_token(hidden_size: i64, dtype_bytes: usize, row_len: usize) -> u64 {
    let activations = 24 * hidden_size.max(1) as u64 * dtype_bytes as u64;
    let attention = 5 * row_len.max(1) as u64;
    activations + attention
}

/// Tokens per batch for `free` bytes of free memory, of which the model's parameters (`model_bytes`,
/// not yet loaded) take their share first.
pub fn auto_batch_tokens(free: u64, model_bytes: u64, per_token: u64) -> usize {
    let usable = (free.saturating_sub(model_bytes) as f64 * USABLE_SHARE) as u64;
    let tokens = usable / per_token.max(1);
    (tokens as usize).clamp(AUTO_RANGE.0, AUTO_RANGE.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let meminfo = "MemTotal:       131072000 kB\nMemFree:         1000 kB\nMemAvailable:   8388608 kB\n";
        assert_eq!(mem_available(meminfo), Some(8 << 30));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert!(free_memory(tch::Device::Cpu).is_some_and(|m| m.bytes > 0), "this machine has /proc/meminfo");
    }

    #[test]
    fn auto_batch_tokens_follow_free_memory_within_bounds() {
        let per_token = bytes_per_token(576, 4, 512);
        assert_eq!(per_token, 24 * 576 * 4 + 5 * 512);
        // 8 GiB free, a 0.5 GiB model: a quarter of 7.5 GiB.
        let tokens = auto_batch_tokens(8 << 30, 1 << 29, per_token);
        assert_eq!(tokens, ((15u64 << 29) as f64 * USABLE_SHARE) as usize / per_token as usize);
        assert!(auto_batch_tokens(16 << 30, 1 << 29, per_token) > tokens);
        assert_eq!(auto_batch_tokens(1 << 20, 1 << 29, per_token), AUTO_RANGE.0, "never below the floor");
        assert_eq!(auto_batch_tokens(u64::MAX, 0, 1), AUTO_RANGE.1, "never above the ceiling");
    }

    #[test]
    fn cpu_scoring_batches_are_smaller_in_16_bit_dtypes() {
        assert_eq!(cpu_scoring_tokens(4), 4096);
        assert_eq!(cpu_scoring_tokens(2), 2048);
        assert!(cpu_scoring_tokens(2) >= AUTO_RANGE.0);
    }
}
