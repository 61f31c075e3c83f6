//! Everything distributed: the process world now; gradient exchange joins it later.
//! The model never imports this module; the trainer is where they meet.

mod world;

pub use world::World;
