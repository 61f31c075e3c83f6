//! Steps whose loss or gradient is not finite, and what `train.nonfinite` does with them.
//! Kept on the device: the step only marks and records (no read), and the loop asks for
//! the verdict where it reads values anyway (a logged row, before a save).

use crate::config::NonFinite;
use crate::host_waits;
use anyhow::bail;
use tch::{Device, Kind, Tensor};

/// The non-finite steps not yet reported, and the policy for them.
pub struct NonFiniteSteps {
    policy: NonFinite,
    /// [count, first step, its loss], f64 on the device.
    record: Tensor,
}

/// The record with nothing in it.
fn empty_record() -> Tensor {
    Tensor::from_slice(&[0f64, -1.0, 0.0])
}

impl NonFiniteSteps {
    pub fn new(policy: NonFinite, device: Device) -> NonFiniteSteps {
        NonFiniteSteps { policy, record: empty_record().to_device(device) }
    }

    /// Before the last backward: a non-finite `local_loss` poisons `grads` (loss · 0 is
    /// NaN), so that the averaged norm, and with it every rank's skip decision, sees it.
    /// `make_one` (the `nan_loss` fault) makes the loss NaN first.
    pub fn poison_gradients(grads: &Tensor, local_loss: &mut Tensor, make_one: bool) {
        if make_one {
            *local_loss = local_loss.full_like(f64::NAN);
            let _ = grads.shallow_clone().fill_(f64::NAN);
        }
        tch::no_grad(|| {
            let _ = grads.narrow(0, 0, 1).g_add_(&(&*local_loss * 0.0));
        });
    }

    /// Adds optimizer step `step` (`skipped`: 1 where it was dropped, on the device) to
    /// the record.
    pub fn record(&mut self, step: u64, skipped: &Tensor, loss: &Tensor) {
        tch::no_grad(|| {
            let skip = skipped.to_kind(Kind::Double);
            let (count, first_step, first_loss) = (self.record.get(0), self.record.get(1), self.record.get(2));
            let is_first = count.eq(0.0).logical_and(&skip.ne(0.0));
            let step = Tensor::full([], step as f64, (Kind::Double, self.record.device()));
            let update = Tensor::stack(
                &[&count + &skip, step.where_self(&is_first, &first_step), loss.to_kind(Kind::Double).where_self(&is_first, &first_loss)],
                0,
            );
            let _ = self.record.copy_(&update);
        });
    }

    /// Reports the non-finite steps since the last call (one read), `step` being the last
    /// completed: with `train.nonfinite: stop` the first one ends the run (the last
    /// checkpoint is untouched: the loop calls this before every save); with `skip` each
    /// is a warning. Every rank reaches the same verdict (the norm it is decided on is
    /// averaged).
    pub fn enforce_policy(&mut self, step: u64) -> anyhow::Result<()> {
        let values = host_waits::read(&self.record);
        let (count, first, loss) = (values[0], values[1] as u64, values[2]);
        if count == 0.0 {
            return Ok(());
        }
        let _ = self.record.copy_(&empty_record());
        let what = if loss.is_finite() { "gradient".to_string() } else { format!("loss ({loss})") };
        match self.policy {
            NonFinite::Stop => bail!(
                "non-finite {what} at step {first}: stopping (the last checkpoint is untouched; set train.nonfinite: skip to drop such steps)"
            ),
            NonFinite::Skip => {
                tracing::warn!("non-finite {what} at step {first}: update skipped (train.nonfinite: skip)");
                if count > 1.0 {
                    tracing::warn!("{} more non-finite steps skipped up to step {step}", count - 1.0);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first non-finite step and its loss are kept, later ones only counted; `stop`
    /// names the first, `skip` goes on; a settled record starts again empty.
    #[test]
    fn the_first_non_finite_step_is_named_and_the_record_empties_when_settled() {
        let loss = |x: f64| Tensor::from(x as f32);
        let mut stop = NonFiniteSteps::new(NonFinite::Stop, Device::Cpu);
        stop.record(1, &Tensor::from(0i64), &loss(2.5));
        assert!(stop.enforce_policy(1).is_ok());
        stop.record(2, &Tensor::from(1i64), &loss(f64::NAN));
        stop.record(3, &Tensor::from(1i64), &loss(1.0));
        let e = stop.enforce_policy(3).unwrap_err().to_string();
        assert!(e.starts_with("non-finite loss (NaN) at step 2: stopping"), "{e}");
        assert!(stop.enforce_policy(3).is_ok(), "settled: the record is empty again");
        let mut skip = NonFiniteSteps::new(NonFinite::Skip, Device::Cpu);
        skip.record(4, &Tensor::from(1i64), &loss(3.0));
        assert!(skip.enforce_policy(4).is_ok());
    }

    #[test]
    fn a_non_finite_loss_poisons_the_gradients_and_a_finite_one_leaves_them() {
        let grads = Tensor::ones([4], (Kind::Float, Device::Cpu));
        let mut finite = Tensor::from(1.5f32);
        NonFiniteSteps::poison_gradients(&grads, &mut finite, false);
        assert_eq!(Vec::<f32>::try_from(&grads).unwrap(), vec![1.0; 4]);
        let mut made = Tensor::from(1.5f32);
        NonFiniteSteps::poison_gradients(&grads, &mut made, true);
        assert!(made.double_value(&[]).is_nan());
        assert!(Vec::<f32>::try_from(&grads).unwrap().iter().all(|g| g.is_nan()));
    }
}
