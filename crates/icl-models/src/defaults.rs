//! Serde defaults that several `config.json` schemas share, named by their value, so that a config
//! struct says `#[serde(default = "defaults::eps_1e5")]` instead of defining its own function.

pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn eps_1e5() -> f64 {
    1e-5
}
pub(crate) fn eps_1e6() -> f64 {
    1e-6
}
pub(crate) fn positions_1024() -> i64 {
    1024
}
pub(crate) fn positions_2048() -> i64 {
    2048
}
pub(crate) fn theta_10000() -> f64 {
    10000.0
}
pub(crate) fn gelu_new() -> String {
    "gelu_new".into()
}
pub(crate) fn gelu() -> String {
    "gelu".into()
}
pub(crate) fn silu() -> String {
    "silu".into()
}
