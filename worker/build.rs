// Bakes libtorch's location into the binaries so they run without LD_LIBRARY_PATH, and
// links libtorch_cuda unconditionally (--no-as-needed) so CUDA is visible on GPU hosts
// even though no symbol of it is referenced directly.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-link-search=native={lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch");
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-ltorch_cuda");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        build_shims(std::path::Path::new(&lib));
    }
}

/// Compiles the C++ shims in csrc/ (per-device autocast dtype; gradients as views into
/// bucket buffers; gradient-ready hooks; see each file's header comment) against the
/// libtorch headers next to the library directory torch-sys found, with the flags
/// torch-sys uses for its own C++ (C++17, the wheel's C++11 ABI).
fn build_shims(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/autocast_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/grad_view_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/grad_ready_shim.cpp");
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast_shim.cpp")
        .file("csrc/grad_view_shim.cpp")
        .file("csrc/grad_ready_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-w")
        .compile("cvdist_torch_shims");
}
