//! Learning-rate schedules: the factor applied to each group's base learning rate per iteration.

/// How the learning rate changes over a stage's iterations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// The base learning rate throughout.
    Constant,
    /// Half a cosine from the base rate down to `final_factor` × base at the last iteration.
    Cosine {
        /// Fraction of the base rate reached at the end.
        final_factor: f64,
    },
    /// Multiply by `gamma` every `every` iterations.
    Step {
        /// Iterations between decays (at least 1).
        every: usize,
        /// Decay factor per step.
        gamma: f64,
    },
}

impl Schedule {
    /// The factor for `iteration` (0-based) of a stage of `total` iterations.
    pub fn factor(&self, iteration: usize, total: usize) -> f64 {
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Cosine { final_factor } => {
                let progress = if total <= 1 {
                    0.0
                } else {
                    iteration.min(total - 1) as f64 / (total - 1) as f64
                };
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                final_factor + (1.0 - final_factor) * cosine
            }
            Schedule::Step { every, gamma } => {
                gamma.powi(i32::try_from(iteration / every.max(1)).unwrap_or(i32::MAX))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn cosine_runs_from_one_to_the_final_factor_monotonically() {
        let s = Schedule::Cosine { final_factor: 0.1 };
        assert_relative_eq!(s.factor(0, 11), 1.0);
        assert_relative_eq!(s.factor(5, 11), 0.55);
        assert_relative_eq!(s.factor(10, 11), 0.1);
        assert_relative_eq!(s.factor(50, 11), 0.1);
        assert!((1..11).all(|i| s.factor(i, 11) < s.factor(i - 1, 11)));
        assert_relative_eq!(s.factor(0, 1), 1.0);
    }

    #[test]
    fn step_decays_every_n_iterations() {
        let s = Schedule::Step {
            every: 10,
            gamma: 0.5,
        };
        assert_relative_eq!(s.factor(9, 100), 1.0);
        assert_relative_eq!(s.factor(10, 100), 0.5);
        assert_relative_eq!(s.factor(35, 100), 0.125);
        let degenerate = Schedule::Step {
            every: 0,
            gamma: 0.5,
        };
        assert_relative_eq!(degenerate.factor(2, 10), 0.25);
    }
}
