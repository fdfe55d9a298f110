//! AdamW exactly as PyTorch's (decoupled weight decay, bias-corrected
//! moments, `eps` added after the square root), with its state exposed so
//! that training can be resumed; and cosine annealing with warm restarts.

use candle_core::{backprop::GradStore, Result, Tensor, Var};

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// CLIPER stage 1: descriptors only.
    pub fn stage1() -> Self {
        Self {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-4,
            weight_decay: 0.0,
        }
    }
    /// CLIPER stage 2: the vision tower.
    pub fn stage2() -> Self {
        Self {
            lr: 5e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-4,
            weight_decay: 0.1,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub vars: Vec<Var>,
    /// First and second moments, one pair per var.
    pub moments: Vec<(Tensor, Tensor)>,
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|v| Ok((v.zeros_like()?, v.zeros_like()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            vars,
            moments,
            step: 0,
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    /// One update from the gradients of `grads` (vars without a gradient are left alone).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (var, (m, v)) in self.vars.iter().zip(self.moments.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(var.dtype())?;
            let theta = (var.as_tensor().detach() * (1.0 - c.lr * c.weight_decay))?;
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&*m / denom)? * (c.lr / bc1))?;
            var.set(&(theta - update)?)?;
        }
        Ok(())
    }
}

/// PyTorch's `CosineAnnealingWarmRestarts(T_0, T_mult=1, eta_min)`, stepped
/// once per epoch: the learning rate for epoch `e` (0-based within the stage).
pub fn cosine_warm_restarts(base_lr: f64, eta_min: f64, t0: usize, epoch: usize) -> f64 {
    let t0 = t0.max(1);
    let t_cur = (epoch % t0) as f64;
    eta_min + (base_lr - eta_min) * (1.0 + (std::f64::consts::PI * t_cur / t0 as f64).cos()) / 2.0
}
