//! CUDA kernels from `kernels/`, compiled at run time with NVRTC (through cudarc, loaded
//! dynamically, so this builds and its compile path is tested without a GPU).

pub mod kernels;
pub mod nvrtc;
pub mod peak;
