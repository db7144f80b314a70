//! `icl peak`: this machine's matmul throughput through libtorch, the yardstick for achieved FLOP/s.

use anyhow::Result;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// GFLOP/s of `size x size` matmuls in `kind`, repeated for at least `seconds` (and at least twice)
/// after one warm-up product.
pub fn matmul_gflops(kind: Kind, size: i64, seconds: f64, device: Device) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let a = Tensor::f_randn([size, size], (kind, device))?;
    let b = Tensor::f_randn([size, size], (kind, device))?;
    let _ = a.f_matmul(&b)?;
    let start = Instant::now();
    let mut products = 0u32;
    while products < 2 || start.elapsed().as_secs_f64() < seconds {
        let c = a.f_matmul(&b)?;
        // Reading one element waits for the product on asynchronous devices.
        let _ = c.f_double_value(&[0, 0])?;
        products += 1;
    }
    let flops = 2.0 * (size as f64).powi(3) * f64::from(products);
    Ok(flops / start.elapsed().as_secs_f64() / 1e9)
}
