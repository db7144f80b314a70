use icl_models::{load_model, Dtype};
use tch::{Device, Kind, Tensor};
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap());
    let m = load_model(&dir, Dtype::F32, Device::Cpu).unwrap();
    for (b, t) in [(4i64, 64i64), (16, 64), (64, 64), (256, 64), (16, 256)] {
        let ids = Tensor::randint(50000, [b, t], (Kind::Int64, Device::Cpu));
        let scored = Tensor::arange(b, (Kind::Int64, Device::Cpu)) * t + (t - 1);
        let _ = m.log_probs_at(&ids, &scored).unwrap();
        let s = std::time::Instant::now();
        for _ in 0..2 { let _ = m.log_probs_at(&ids, &scored).unwrap(); }
        let dt = s.elapsed().as_secs_f64() / 2.0;
        println!("b={b} t={t}: {:.3}s {:.0} tok/s {:.0} GF/s", dt, (b * t) as f64 / dt, m.forward_flops((b*t) as usize, b as usize, t as f64/2.0) / dt / 1e9);
    }
}
