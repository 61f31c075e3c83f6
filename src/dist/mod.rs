//! Everything distributed: the process world (MPI), the gradient exchange (MPI or
//! NCCL), the hang watchdog and stop signals.
//! The model never imports this module; the trainer is where they meet.

pub mod exchange;
pub mod nccl;
mod replicas;
pub mod signals;
pub mod watchdog;
mod world;

pub use exchange::GradientExchange;
pub use replicas::Replicas;
pub use world::World;
