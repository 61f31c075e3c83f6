//! Everything distributed: the process world (MPI), the gradient exchange (MPI or
//! NCCL), the hang watchdog and stop signals.
//! The model never imports this module; the trainer is where they meet.

mod blame;
pub mod buckets;
pub mod comm_cost;
mod data_parallel;
pub mod exchange;
mod heartbeat;
pub mod nccl;
mod nccl_overlap;
pub mod overlap;
pub mod overlap_session;
pub mod phase;
mod ring;
pub mod same_job;
pub mod signals;
pub mod token_table;
mod waiting;
pub mod watchdog;
mod world;

pub use data_parallel::{DataParallel, LastBackward};
pub use exchange::GradientExchange;
pub use world::{RawComm, World};
