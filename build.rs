//! Makes the binary find libtorch and the CUDA wheels' libraries without LD_LIBRARY_PATH.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    build_mpi_shim();
    build_fused_adamw_shim();
    link_libtorch();
    record_git_revision();
}

/// The commit the binary was built from, for run configs (W&B) and `--version` readers.
fn record_git_revision() {
    let rev = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ALGPT2_GIT_REVISION={rev}");
    // HEAD moves on checkout; logs/HEAD on every commit.
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/logs/HEAD");
}

/// The one value rsmpi does not give us: MPI_IN_PLACE, from the mpi.h found by mpicc.
fn build_mpi_shim() {
    println!("cargo:rerun-if-changed=src/parallel/mpi_in_place.c");
    let mpi = build_probe_mpi::probe()
        .unwrap_or_else(|errors| panic!("MPI not found (install libopenmpi-dev openmpi-bin, or run launch/setup.sh): {errors:?}"));
    let mut build = cc::Build::new();
    build.file("src/parallel/mpi_in_place.c");
    for dir in &mpi.include_paths {
        build.include(dir);
    }
    build.compile("algpt2_mpi_shim");
}

/// libtorch's fused AdamW, which tch does not bind (src/optim/fused_adamw.cpp), compiled
/// against the headers of the libtorch torch-sys links.
fn build_fused_adamw_shim() {
    println!("cargo:rerun-if-changed=src/optim/fused_adamw.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let lib = env::var("DEP_TCH_LIBTORCH_LIB")
        .unwrap_or_else(|_| panic!("torch-sys did not report its libtorch directory: cannot build src/optim/fused_adamw.cpp"));
    let include = PathBuf::from(lib).join("../include");
    // The ABI torch-sys builds its own C++ with; PyPI wheels of torch 2.x use the new one.
    let cxx11_abi = env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        // libtorch's headers warn about themselves.
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/optim/fused_adamw.cpp")
        .compile("algpt2_fused_adamw");
}

fn link_libtorch() {
    let Ok(lib) = env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch directory: the binary will need LD_LIBRARY_PATH");
        return;
    };
    let lib = PathBuf::from(lib);
    let mut dirs = vec![lib.clone()];
    // PyPI wheels keep NVRTC and NCCL beside torch: site-packages/nvidia/{cu13,nccl}/lib.
    if let Some(site_packages) = lib.parent().and_then(|torch| torch.parent()) {
        // NVRTC needs the wheel's CUDA headers (cuda_bf16.h) for kernels/.
        println!("cargo:rustc-env=ALGPT2_SITE_PACKAGES={}", site_packages.display());
        for sub in ["nvidia/cu13/lib", "nvidia/nccl/lib"] {
            let dir = site_packages.join(sub);
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
    }
    for dir in &dirs {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    }
    // RPATH, not RUNPATH: RUNPATH is not searched for the dependencies of libraries we
    // load (libnvrtc must find libnvrtc-builtins next to it).
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags");
    if lib.join("libtorch_cuda.so").exists() {
        // rustc links --as-needed, which drops libtorch_cuda (nothing references it by
        // symbol) and then libtorch never registers its CUDA backend.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        println!("cargo:rustc-env=ALGPT2_LIBTORCH_CUDA=1");
    }
}
