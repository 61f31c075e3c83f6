//! All parameters in one contiguous fp32 buffer, and all gradients in another, each
//! variable's data and gradient being views into them. The optimizer then updates the
//! whole model in a few vectorized operations, and a data-parallel all-reduce moves the
//! gradients as one (or a few) large buffers instead of one call per tensor.
//!
//! Order: parameters that get weight decay (matrices and embeddings, dim ≥ 2) first, then
//! the rest (biases, LayerNorm gains); by name within each group. The order is a function
//! of the model config alone, so a checkpoint's flat buffers line up on every rank.
//!
//! One matrix (the token table, which is also the head) may be padded with zero rows:
//! its region then holds more rows than its variable, the variable views the first
//! ones, and the padded matrix is a view of the whole region (`padded`).

use tch::nn::VarStore;
use tch::{Kind, Tensor};

/// Where one variable lives in the flat buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<i64>,
    pub offset: i64,
    pub numel: i64,
    /// Elements the slot occupies: `numel` plus any zero padding rows after it.
    pub reserved: i64,
    pub decay: bool,
}

/// A matrix of the model padded to `rows` rows inside the flat buffers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Padding<'a> {
    pub name: &'a str,
    pub rows: i64,
}

pub struct FlatParams {
    pub slots: Vec<Slot>,
    /// Parameter values [N]; `values[..decay_len]` are the ones weight decay applies to.
    pub values: Tensor,
    /// Gradients [N], accumulated in place by autograd.
    pub grads: Tensor,
    pub decay_len: i64,
    vars: Vec<Tensor>,
}

/// Makes every later backward accumulate the gradients of `vars` straight into `grads`
/// (flat, `slots`' layout). Autograd creates a variable's gradient on its first backward
/// and from then on adds into it in place; creating them all now (as zeros) and
/// re-pointing them at the flat buffer does it. Shared with the bf16 copies.
pub(crate) fn point_grads_into(vars: &[Tensor], slots: &[Slot], grads: &Tensor) {
    let device = grads.device();
    let touch = vars.iter().map(|v| v.sum(Kind::Float) * 0.0).fold(Tensor::zeros([], (Kind::Float, device)), |a, b| a + b);
    touch.backward();
    tch::no_grad(|| {
        for (slot, var) in slots.iter().zip(vars) {
            let mut grad = var.grad();
            grad.set_data(&grads.narrow(0, slot.offset, slot.numel).view(slot.shape.as_slice()));
        }
    });
}

impl FlatParams {
    /// Moves every trainable variable of `vs` into the flat buffers (keeping its values).
    pub fn new(vs: &VarStore) -> FlatParams {
        FlatParams::new_padded(vs, None)
    }

    /// `new`, with the matrix `padding.name` given zero rows up to `padding.rows`.
    pub fn new_padded(vs: &VarStore, padding: Option<Padding>) -> FlatParams {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|(a, ta), (b, tb)| (ta.dim() < 2, a).cmp(&(tb.dim() < 2, b)));
        let mut slots = Vec::with_capacity(named.len());
        let mut offset = 0i64;
        for (name, t) in &named {
            let numel = t.numel() as i64;
            let reserved = match padding {
                Some(p) if p.name == name && t.dim() == 2 && p.rows > t.size()[0] => p.rows * t.size()[1],
                _ => numel,
            };
            slots.push(Slot { name: name.clone(), shape: t.size(), offset, numel, reserved, decay: t.dim() >= 2 });
            offset += reserved;
        }
        let decay_len = slots.iter().filter(|s| s.decay).map(|s| s.reserved).sum();
        let device = named.first().map_or(tch::Device::Cpu, |(_, t)| t.device());
        let values = Tensor::zeros([offset], (Kind::Float, device));
        let mut grads = Tensor::zeros([offset], (Kind::Float, device));
        let mut vars: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        tch::no_grad(|| {
            for (slot, var) in slots.iter().zip(vars.iter_mut()) {
                let mut view = values.narrow(0, slot.offset, slot.numel).view(slot.shape.as_slice());
                view.copy_(var);
                var.set_data(&view);
            }
        });
        point_grads_into(&vars, &slots, &grads);
        let _ = grads.zero_();
        FlatParams { slots, values, grads, decay_len, vars }
    }

    /// Elements of the flat buffers, padding included.
    pub fn len(&self) -> i64 {
        self.values.numel() as i64
    }

    /// Matrix `name` with its padding rows, as a view [rows, cols] of `buffer` (the values,
    /// the gradients, or a buffer of the same layout such as their bf16 copies).
    pub fn padded(&self, buffer: &Tensor, name: &str) -> Option<Tensor> {
        let slot = self.slot(name)?;
        let cols = *slot.shape.last()?;
        Some(buffer.narrow(0, slot.offset, slot.reserved).view([slot.reserved / cols, cols]))
    }

    pub fn zero_grads(&mut self) {
        let _ = self.grads.zero_();
    }

    /// The slot of `name`, e.g. `h.0.attn.c_attn.weight`.
    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Copies named tensors (as checkpoints hold them) into the parameters; `origin` names
    /// where they came from in the error for a missing or misshapen one.
    pub fn load_named(&self, tensors: &std::collections::BTreeMap<String, Tensor>, origin: &str) -> anyhow::Result<()> {
        tch::no_grad(|| {
            for slot in &self.slots {
                let t = tensors.get(&slot.name).ok_or_else(|| anyhow::anyhow!("{origin} lacks tensor {}", slot.name))?;
                if t.size() != slot.shape {
                    anyhow::bail!("{origin}: tensor {} has shape {:?}, the model needs {:?}", slot.name, t.size(), slot.shape);
                }
                self.values.narrow(0, slot.offset, slot.numel).copy_(&t.reshape([-1]).to_device(self.values.device()));
            }
            Ok(())
        })
    }

    /// True while every variable's data and gradient still alias the flat buffers (a
    /// cheap guard: libtorch could in principle replace a gradient tensor).
    pub fn is_aliased(&self) -> bool {
        let base_v = self.values.data_ptr() as usize;
        let base_g = self.grads.data_ptr() as usize;
        self.slots.iter().zip(&self.vars).all(|(s, v)| {
            let at = (s.offset as usize) * 4;
            v.data_ptr() as usize == base_v + at && v.grad().defined() && v.grad().data_ptr() as usize == base_g + at
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::model::Algpt2;
    use tch::Device;

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 50,
            n_positions: 8,
            n_embd: 16,
            embedding_size: Some(4),
            n_layer: 2,
            n_head: 2,
            share_layers: true,
            dropout: 0.0,
            ..ModelConfig::default()
        }
    }

    #[test]
    fn layout_puts_decayed_matrices_first_and_keeps_values() {
        tch::manual_seed(3);
        let vs = VarStore::new(Device::Cpu);
        let model = Algpt2::new(&vs.root(), &cfg());
        let idx = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let before = model.forward(&idx);
        let flat = FlatParams::new(&vs);
        let after = model.forward(&idx);
        assert_eq!((before - after).abs().max().double_value(&[]), 0.0);
        assert_eq!(flat.len() as u64, crate::model::size::param_count(&cfg()).total);
        let first_no_decay = flat.slots.iter().position(|s| !s.decay).unwrap();
        assert!(flat.slots[..first_no_decay].iter().all(|s| s.shape.len() >= 2));
        assert!(flat.slots[first_no_decay..].iter().all(|s| !s.decay && s.shape.len() == 1));
        assert_eq!(flat.decay_len, flat.slots[first_no_decay].offset);
        assert!(flat.slot("wte").unwrap().decay);
        assert!(!flat.slot("h.0.ln_1.weight").unwrap().decay);
        assert!(!flat.slot("proj_in.bias").unwrap().decay);
    }

    #[test]
    fn backward_accumulates_into_the_flat_gradient_buffer() {
        tch::manual_seed(4);
        let vs = VarStore::new(Device::Cpu);
        let model = Algpt2::new(&vs.root(), &cfg());
        let mut flat = FlatParams::new(&vs);
        assert!(flat.is_aliased());
        let idx = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([2, 4]);
        let targets = Tensor::from_slice(&[2i64, 3, 4, 5, 6, 7, 8, 9]).view([2, 4]);
        let loss = Algpt2::loss(&model.forward(&idx), &targets);
        loss.backward();
        let once = flat.grads.copy();
        assert!(once.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        // A second backward adds in place; zeroing clears through the same memory.
        Algpt2::loss(&model.forward(&idx), &targets).backward();
        let twice = flat.grads.copy();
        assert!((twice - &once * 2.0).abs().max().double_value(&[]) < 1e-6);
        assert!(flat.is_aliased());
        flat.zero_grads();
        let wte = flat.slot("wte").unwrap().clone();
        let var_grad = vs.variables()["wte"].grad();
        assert_eq!(var_grad.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(var_grad.numel() as i64, wte.numel);
    }
}
