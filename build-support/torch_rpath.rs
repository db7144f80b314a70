//! Build script shared by every crate that links libtorch: torch-sys does not pass its library path on to
//! downstream binaries, so each test, example and binary gets an rpath to libtorch and runs without
//! LD_LIBRARY_PATH. The path comes from LIBTORCH (set by `.cargo/config.toml` after `cargo xtask setup`,
//! or by the user).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_LIB");
    let lib = std::env::var_os("LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("LIBTORCH").map(|t| PathBuf::from(t).join("lib")));
    if let Some(lib) = lib {
        // The canonical path stays valid when the checkout's .icl symlink is replaced or the repo moves.
        let lib = lib.canonicalize().unwrap_or(lib);
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
}
