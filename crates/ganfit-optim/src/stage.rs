//! One optimisation stage: Adam per parameter group, a learning-rate schedule, early stopping on a
//! plateau and a guard that recovers from divergence.

use candle_core::{Tensor, Var};

use crate::adam::{self, Adam};
use crate::{OptimError, Schedule};

/// Parameters optimised together with one base learning rate, e.g. "shape" or "camera".
#[derive(Debug, Clone)]
pub struct ParamGroup {
    /// Name used in progress reports and errors.
    pub name: String,
    /// The variables of the group.
    pub vars: Vec<Var>,
    /// Base learning rate (before the schedule).
    pub learning_rate: f64,
    /// The least value any element may take: after every step the variables are clamped to it
    /// (projected gradient descent), e.g. 0 for blendshape weights.
    pub lower_bound: Option<f64>,
}

impl ParamGroup {
    /// A group of `vars` named `name` with base rate `learning_rate`, unbounded.
    pub fn new(name: impl Into<String>, vars: Vec<Var>, learning_rate: f64) -> Self {
        ParamGroup {
            name: name.into(),
            vars,
            learning_rate,
            lower_bound: None,
        }
    }

    /// The group with its variables kept at `bound` or above (none where `None`).
    pub fn bounded_below(self, bound: Option<f64>) -> Self {
        ParamGroup {
            lower_bound: bound,
            ..self
        }
    }

    /// Clamps the variables to the lower bound, if any.
    fn project(&self) -> Result<(), OptimError> {
        if let Some(bound) = self.lower_bound {
            for var in &self.vars {
                var.set(&var.as_tensor().maximum(bound)?)?;
            }
        }
        Ok(())
    }
}

/// Stop a stage when its best loss has not improved by `min_relative_improvement` for
/// `patience` iterations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EarlyStop {
    /// Iterations without improvement before stopping.
    pub patience: usize,
    /// Relative improvement of the best loss that counts as progress.
    pub min_relative_improvement: f64,
}

/// What counts as divergence and how often to recover from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DivergenceGuard {
    /// A loss above `jump_factor` × the best loss so far counts as divergence, as does a NaN or
    /// infinite loss or gradient. The best loss is floored at 1 % of the stage's first loss, so
    /// that the ordinary jitter of Adam near a zero minimum is not taken for divergence.
    pub jump_factor: f64,
    /// Recoveries (restore the best state, halve every learning rate) before giving up.
    pub max_recoveries: usize,
}

impl Default for DivergenceGuard {
    fn default() -> Self {
        DivergenceGuard {
            jump_factor: 10.0,
            max_recoveries: 5,
        }
    }
}

/// Configuration of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageConfig {
    /// Name used in reports, e.g. "alignment".
    pub name: String,
    /// Maximum number of iterations.
    pub iterations: usize,
    /// Learning-rate schedule over the iterations.
    pub schedule: Schedule,
    /// Optional plateau stop.
    pub early_stop: Option<EarlyStop>,
    /// Divergence handling.
    pub guard: DivergenceGuard,
}

impl StageConfig {
    /// A stage of `iterations` with a cosine schedule to 10 %, no early stop and the default
    /// guard.
    pub fn new(name: impl Into<String>, iterations: usize) -> Self {
        StageConfig {
            name: name.into(),
            iterations,
            schedule: Schedule::Cosine { final_factor: 0.1 },
            early_stop: None,
            guard: DivergenceGuard::default(),
        }
    }
}

/// What an objective returns for one iteration: the scalar to minimise and, for the history,
/// its named parts (already weighted).
#[derive(Debug)]
pub struct Loss {
    /// Scalar tensor to minimise.
    pub total: Tensor,
    /// Named weighted terms, for reporting only.
    pub terms: Vec<(String, f64)>,
}

impl Loss {
    /// A loss with no separately reported terms.
    pub fn total(total: Tensor) -> Self {
        Loss {
            total,
            terms: Vec::new(),
        }
    }
}

/// One recorded iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct IterationRecord {
    /// Iteration index within the stage.
    pub iteration: usize,
    /// Total loss.
    pub total: f64,
    /// Named terms.
    pub terms: Vec<(String, f64)>,
    /// Learning-rate factor applied (schedule × recoveries).
    pub lr_factor: f64,
}

/// Why a stage ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// All iterations ran.
    Completed,
    /// The plateau rule fired.
    Plateau,
}

/// The outcome of a stage. The variables hold the best state seen when it returns.
#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    /// Stage name.
    pub name: String,
    /// Best total loss seen.
    pub best_loss: f64,
    /// Every iteration, in order (recovered iterations included).
    pub history: Vec<IterationRecord>,
    /// How many times the guard restored the best state.
    pub recoveries: usize,
    /// Why it stopped.
    pub stop: StopReason,
}

/// Runs one stage: calls `objective` once per iteration, back-propagates its total and steps
/// Adam (no weight decay) for every group, with the schedule's learning rate.
///
/// A NaN/infinite loss or gradient, or a loss jump beyond the guard's factor, restores the best
/// state seen, halves every learning rate and continues; more recoveries than the guard allows
/// is an error. When the stage ends, the variables are set to the best state seen.
/// `observer` sees every iteration as it is recorded.
pub fn run_stage(
    config: &StageConfig,
    groups: &[ParamGroup],
    mut objective: impl FnMut(usize) -> Result<Loss, OptimError>,
    mut observer: impl FnMut(&IterationRecord),
) -> Result<StageReport, OptimError> {
    if groups.iter().all(|g| g.vars.is_empty()) {
        return Err(OptimError::InvalidInput(format!(
            "stage `{}` has no parameters to optimise",
            config.name
        )));
    }
    let mut adam = Adam::new(groups)?;
    let mut best = Snapshot::of(groups)?;
    let mut best_loss = f64::INFINITY;
    let mut since_improvement = 0usize;
    let mut recovery_factor = 1.0f64;
    let mut jump_floor = 0.0f64;
    let mut report = StageReport {
        name: config.name.clone(),
        best_loss,
        history: Vec::with_capacity(config.iterations),
        recoveries: 0,
        stop: StopReason::Completed,
    };

    for iteration in 0..config.iterations {
        let lr_factor = config.schedule.factor(iteration, config.iterations) * recovery_factor;
        let loss = objective(iteration)?;
        let total = loss
            .total
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let record = IterationRecord {
            iteration,
            total,
            terms: loss.terms,
            lr_factor,
        };
        observer(&record);
        report.history.push(record);

        if jump_floor == 0.0 && total.is_finite() {
            jump_floor = 0.01 * total.abs();
        }
        let diverged = !total.is_finite()
            || (best_loss.is_finite()
                && total > config.guard.jump_factor * best_loss.abs().max(jump_floor));
        let gradient = if diverged {
            None
        } else {
            let gradient = adam.gradient(&loss.total.backward()?)?;
            adam::is_finite(&gradient)?.then_some(gradient)
        };
        let Some(gradient) = gradient else {
            report.recoveries += 1;
            if report.recoveries > config.guard.max_recoveries {
                best.restore(groups)?;
                return Err(OptimError::Diverged {
                    stage: config.name.clone(),
                    iteration,
                    recoveries: config.guard.max_recoveries,
                });
            }
            best.restore(groups)?;
            recovery_factor *= 0.5;
            // Adam's moments carry the divergent gradients: start them afresh.
            adam = Adam::new(groups)?;
            continue;
        };

        if total < best_loss {
            let significant = match config.early_stop {
                Some(rule) => {
                    !best_loss.is_finite()
                        || best_loss - total > rule.min_relative_improvement * best_loss.abs()
                }
                None => true,
            };
            if significant {
                since_improvement = 0;
            }
            best_loss = total;
            best = Snapshot::of(groups)?;
        }
        if let Some(rule) = config.early_stop {
            since_improvement += 1;
            if since_improvement > rule.patience {
                report.stop = StopReason::Plateau;
                break;
            }
        }
        adam.step(&gradient, lr_factor)?;
        for group in groups {
            group.project()?;
        }
    }
    best.restore(groups)?;
    report.best_loss = best_loss;
    Ok(report)
}

/// Copies of every variable's value, to return to.
struct Snapshot(Vec<Tensor>);

impl Snapshot {
    fn of(groups: &[ParamGroup]) -> Result<Self, OptimError> {
        Ok(Snapshot(
            groups
                .iter()
                .flat_map(|g| &g.vars)
                .map(|v| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        ))
    }

    fn restore(&self, groups: &[ParamGroup]) -> Result<(), OptimError> {
        for (var, value) in groups.iter().flat_map(|g| &g.vars).zip(&self.0) {
            var.set(value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn quadratic_target() -> Tensor {
        Tensor::new(&[3.0f32, -2.0, 0.5], &Device::Cpu).unwrap()
    }

    fn distance_loss(x: &Var) -> Result<Loss, OptimError> {
        let d = (x.as_tensor() - quadratic_target())?;
        Ok(Loss {
            total: d.sqr()?.sum_all()?,
            terms: vec![("distance".into(), 1.0)],
        })
    }

    fn value(x: &Var) -> Vec<f32> {
        x.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn converges_on_a_quadratic_and_records_history() {
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let groups = [ParamGroup::new("x", vec![x.clone()], 0.1)];
        let mut seen = 0;
        let report = run_stage(
            &StageConfig::new("quadratic", 300),
            &groups,
            |_| distance_loss(&x),
            |_| seen += 1,
        )
        .unwrap();
        assert_eq!(seen, 300);
        assert_eq!(report.history.len(), 300);
        assert!(report.best_loss < 1e-4, "{}", report.best_loss);
        for (got, want) in value(&x).iter().zip([3.0, -2.0, 0.5]) {
            assert!((got - want).abs() < 0.01, "{got} vs {want}");
        }
    }

    /// The quadratic's minimum is (3, −2, 0.5); held at 0 or above, the fit stops at its
    /// nearest point there, (3, 0, 0.5), and never steps below.
    #[test]
    fn a_group_bounded_below_stays_above_its_bound() {
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let groups = [ParamGroup::new("x", vec![x.clone()], 0.1).bounded_below(Some(0.0))];
        run_stage(
            &StageConfig::new("bounded quadratic", 300),
            &groups,
            |_| distance_loss(&x),
            |_| assert!(value(&x).iter().all(|&v| v >= 0.0), "{:?}", value(&x)),
        )
        .unwrap();
        for (got, want) in value(&x).iter().zip([3.0, 0.0, 0.5]) {
            assert!((got - want).abs() < 0.01, "{got} vs {want}");
        }
    }

    #[test]
    fn groups_keep_their_own_learning_rates() {
        let fast = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let frozen = Var::zeros(1, DType::F32, &Device::Cpu).unwrap();
        let groups = [
            ParamGroup::new("fast", vec![fast.clone()], 0.1),
            ParamGroup::new("frozen", vec![frozen.clone()], 0.0),
        ];
        let mut config = StageConfig::new("two groups", 50);
        config.schedule = Schedule::Constant;
        run_stage(
            &config,
            &groups,
            |_| {
                let sum = (fast.as_tensor() + frozen.as_tensor())?;
                Ok(Loss::total((sum - 1.0)?.sqr()?.sum_all()?))
            },
            |_| {},
        )
        .unwrap();
        assert!(value(&fast)[0] > 0.5);
        assert_eq!(value(&frozen)[0], 0.0);
    }

    #[test]
    fn nan_restores_the_best_state_and_halves_the_learning_rate() {
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let groups = [ParamGroup::new("x", vec![x.clone()], 0.1)];
        let mut config = StageConfig::new("nan once", 40);
        config.schedule = Schedule::Constant;
        let report = run_stage(
            &config,
            &groups,
            |i| {
                if i == 20 {
                    // A poisoned iteration, as a NaN in a renderer or network would produce.
                    let nan = Tensor::new(f32::NAN, &Device::Cpu)?;
                    return Ok(Loss::total((distance_loss(&x)?.total + nan)?));
                }
                distance_loss(&x)
            },
            |_| {},
        )
        .unwrap();
        assert_eq!(report.recoveries, 1);
        assert!(report.history[20].total.is_nan());
        assert_eq!(report.history[21].lr_factor, 0.5);
        assert!(value(&x).iter().all(|v| v.is_finite()));
        assert!(report.best_loss < report.history[0].total);
    }

    #[test]
    fn persistent_divergence_is_an_error_and_leaves_the_best_state() {
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let groups = [ParamGroup::new("x", vec![x.clone()], 0.1)];
        let err = run_stage(
            &StageConfig::new("diverging", 100),
            &groups,
            |i| {
                let loss = distance_loss(&x)?;
                if i >= 10 {
                    return Ok(Loss::total((loss.total * 1e6)?));
                }
                Ok(loss)
            },
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, OptimError::Diverged { .. }), "{err}");
        assert!(err.to_string().contains("diverging"));
        assert!(value(&x).iter().all(|v| v.is_finite()));
        assert!(
            value(&x)[0] > 0.0,
            "the best state (after some descent) is kept"
        );
    }

    #[test]
    fn plateau_stops_early() {
        let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let groups = [ParamGroup::new("x", vec![x.clone()], 0.1)];
        let mut config = StageConfig::new("plateau", 5000);
        config.early_stop = Some(EarlyStop {
            patience: 20,
            min_relative_improvement: 1e-3,
        });
        let report = run_stage(&config, &groups, |_| distance_loss(&x), |_| {}).unwrap();
        assert_eq!(report.stop, StopReason::Plateau);
        assert!(report.history.len() < 5000);
        assert!(report.best_loss < 1e-2);
    }

    #[test]
    fn identical_runs_are_bit_identical() {
        let run = || {
            let x = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
            let groups = [ParamGroup::new("x", vec![x.clone()], 0.05)];
            run_stage(
                &StageConfig::new("determinism", 60),
                &groups,
                |_| distance_loss(&x),
                |_| {},
            )
            .unwrap();
            value(&x)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn a_stage_without_parameters_is_rejected() {
        let err = run_stage(
            &StageConfig::new("empty", 3),
            &[ParamGroup::new("none", vec![], 0.1)],
            |_| unreachable!("no objective call without parameters"),
            |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, OptimError::InvalidInput(_)));
    }
}
