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
            println!("cargo:rustc-link-arg=-lc10_cuda");
        }
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
        build_shims(std::path::Path::new(&lib));
    }
}

/// Compiles the C++ shims in csrc/ (per-device autocast dtype; gradients as views into
/// bucket buffers; gradient-ready hooks; c10d's process groups and store; the
/// differentiable group sum of SyncBatchNorm; see each file's
/// header comment) against the libtorch headers next to the library directory torch-sys
/// found, with the flags torch-sys uses for its own C++ (C++17, the wheel's C++11 ABI).
/// The NCCL process group is compiled in only where the libtorch has CUDA and the CUDA and
/// NCCL headers are found ([`cuda_includes`]); without them `--collective nccl` says so.
fn build_shims(lib: &std::path::Path) {
    let files = [
        "csrc/autocast_shim.cpp",
        "csrc/grad_view_shim.cpp",
        "csrc/grad_ready_shim.cpp",
        "csrc/c10d_shim.cpp",
        "csrc/c10d_nccl.cpp",
        "csrc/sync_bn_shim.cpp",
    ];
    for f in files.iter().chain(&["csrc/c10d_shim.h"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-changed=csrc/gloo_decl");
    let include = lib.parent().map(|p| p.join("include")).unwrap_or_default();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .files(files)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include("csrc/gloo_decl")
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag_if_supported("-w");
    if lib.join("libtorch_cuda.so").exists() {
        if let Some(dirs) = cuda_includes(lib) {
            build.define("CVDIST_WITH_NCCL", None);
            for d in dirs {
                build.include(d);
            }
        }
    }
    build.compile("cvdist_torch_shims");
}

/// The include directories of CUDA (`cuda_runtime_api.h`) and NCCL (`nccl.h`): the pip
/// packages next to the torch wheel (`site-packages/nvidia/*/include`), else `CUDA_HOME`
/// and the system's. `None` when either is missing.
fn cuda_includes(lib: &std::path::Path) -> Option<Vec<std::path::PathBuf>> {
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let mut candidates = Vec::new();
    if let Some(site) = lib.parent().and_then(|p| p.parent()) {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut dirs: Vec<_> = entries.flatten().map(|e| e.path().join("include")).collect();
            dirs.sort();
            candidates.extend(dirs);
        }
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        candidates.push(std::path::Path::new(&home).join("include"));
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates.push("/usr/include".into());
    let has = |name: &str| candidates.iter().any(|d| d.join(name).exists());
    (has("cuda_runtime_api.h") && has("nccl.h"))
        .then(|| candidates.into_iter().filter(|d| d.exists() && d != std::path::Path::new("/usr/include")).collect())
}
