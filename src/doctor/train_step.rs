//! One real training step of a tiny model on each rank's device: the model, autograd, the
//! gradient exchange the config would pick (NCCL on GPUs, MPI on CPUs), clipping, AdamW,
//! and the cross-rank agreement check the trainer runs.

use super::Report;
use crate::data::cache::{SplitData, SplitStats};
use crate::data::token_file::{token_width, TokenFile, TokenWriter};
use crate::parallel::{DataParallel, World};
use crate::rng::SplitMix64;
use crate::trainer::Trainer;
use anyhow::{ensure, Context};
use tch::Device;

const TINY: &str = "
run_name: doctor
data: { format: synthetic }
tokenizer: { vocab_size: 320 }
model: { vocab_size: 320, n_positions: 32, n_embd: 64, embedding_size: 16, n_layer: 2, n_head: 2, share_layers: true, dropout: 0.1 }
train: { seq_len: 32, micro_batch_size: 4, grad_accum_steps: 2, max_steps: 2, seed: 7 }
optim: { lr: 1.0e-3, warmup_steps: 0 }
wandb: { mode: disabled }
";

pub fn run(r: &mut Report, world: &World, device: Device) {
    let result = step(world, device);
    r.outcome(format!("training step ({})", crate::device::describe(device)), result);
}

fn step(world: &World, device: Device) -> anyhow::Result<String> {
    let cfg = crate::config::parse(TINY, "doctor's tiny model", &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let dir = tempfile_dir()?;
    let path = dir.join("train.bin");
    let mut writer = TokenWriter::create(&path, token_width(cfg.model.vocab_size), &[0u8; 32])?;
    let mut rng = SplitMix64::new(world.rank() as u64 ^ 0xD0C7);
    let tokens: Vec<u32> = (0..16_384).map(|_| (rng.next_u64() % cfg.model.vocab_size as u64) as u32).collect();
    writer.push(&tokens)?;
    writer.finish()?;
    let train = SplitData { tokens: TokenFile::open(&path)?, stats: SplitStats::default() };
    let mut trainer = Trainer::new(&cfg, device, train.windows(cfg.train.seq_len));
    let replicas = DataParallel::new(&cfg.dist, world, device)?;
    trainer.broadcast_weights(&replicas)?;
    let first = trainer.train_step(&train, &replicas, cfg.optim.lr)?.read(world);
    let second = trainer.train_step(&train, &replicas, cfg.optim.lr)?.read(world);
    let _ = std::fs::remove_dir_all(&dir);
    ensure!(
        !first.skipped && !second.skipped && first.loss.is_finite() && second.loss.is_finite(),
        "non-finite loss: {} then {}",
        first.loss,
        second.loss
    );
    ensure!(first.grad_norm.is_finite() && first.grad_norm > 0.0, "gradient norm {}", first.grad_norm);
    trainer.check_ranks_agree(world).context("after two steps")?;
    Ok(format!(
        "2 steps, loss {:.4} then {:.4}, grad norm {:.3}, exchange {}, weights equal on all {} rank(s)",
        first.loss,
        second.loss,
        first.grad_norm,
        replicas.exchange_name(),
        world.size()
    ))
}

/// A private scratch directory (the token file of the tiny run).
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "algpt2-doctor-{}-{}",
        std::process::id(),
        SplitMix64::new(std::process::id() as u64).next_u64()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
