//! What one step's gradient exchange cost: its own time and the part of it the step
//! waited for after backward. Measured on the host for MPI; for NCCL, whose work runs on
//! the GPU after the host has moved on, as CUDA events that are read only when a row is
//! logged (reading them waits for the GPU, which a step must not do).

use anyhow::Context;
use cudarc::driver::{sys::CUevent_flags, CudaEvent, CudaStream, DriverError};

/// The exchange's times of one step, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommTimes {
    /// The exchange's own time (every bucket's all-reduce).
    pub comm_ms: f64,
    /// How long the step waited for it after its backward had ended.
    pub exposed_ms: f64,
}

/// A step's exchange cost: known now, or still on the GPU.
pub enum CommCost {
    Measured(CommTimes),
    OnDevice(DeviceClock),
}

impl Default for CommCost {
    fn default() -> CommCost {
        CommCost::Measured(CommTimes::default())
    }
}

impl CommCost {
    /// The times; for NCCL this waits until the GPU has run the exchange.
    pub fn times(&self) -> anyhow::Result<CommTimes> {
        match self {
            CommCost::Measured(t) => Ok(*t),
            CommCost::OnDevice(clock) => clock.read().context("reading the gradient exchange's CUDA events"),
        }
    }
}

/// Four timing events: the exchange's first and last work on its stream, and the compute
/// stream at the end of backward and once it has waited for the exchange.
pub struct DeviceClock {
    pub started: CudaEvent,
    pub done: CudaEvent,
    pub backward_ended: CudaEvent,
    pub waited: CudaEvent,
}

impl DeviceClock {
    fn read(&self) -> Result<CommTimes, DriverError> {
        let comm_ms = f64::from(self.started.elapsed_ms(&self.done)?);
        // Negative when the exchange was over before backward: nothing was waited for.
        let exposed_ms = f64::from(self.backward_ended.elapsed_ms(&self.waited)?).max(0.0);
        Ok(CommTimes { comm_ms, exposed_ms })
    }
}

/// A timing event recorded on `stream` now.
pub fn timing_event(stream: &CudaStream) -> Result<CudaEvent, DriverError> {
    stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
}
