//! algpt2-ddp as a library: everything the binary does, reachable from the tests.

// A library only for its own binary and tests: its `len`s are counts (tokens,
// parameters), never asked whether they are empty.
#![allow(clippy::len_without_is_empty)]

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod cuda;
pub mod data;
pub mod device;
pub mod doctor;
pub mod eval;
pub mod exit_code;
pub mod export;
pub mod faults;
pub mod generate;
pub mod host_cpu;
pub mod host_to_device;
pub mod host_waits;
pub mod info;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod perplexity;
pub mod report;
pub mod resume_settings;
pub mod rng;
pub mod run_dir;
pub mod runtime;
pub mod train;
pub mod trainer;
pub mod versions;
