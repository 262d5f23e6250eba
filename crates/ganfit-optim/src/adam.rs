//! Adam without weight decay over every variable of a stage as one flat vector.
//!
//! The arithmetic is candle-nn's `AdamW` (weight decay 0) element by element, so the steps are
//! the same bit for bit; but where `AdamW` runs about eighteen tensor operations per variable,
//! this runs about a dozen for all of them together. On a GPU each operation is a kernel launch,
//! and a fit's few small variables made Adam a noticeable share of an iteration's launches.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use crate::{OptimError, ParamGroup};

/// Decay of the first moment (candle-nn's and PyTorch's default).
const BETA1: f64 = 0.9;
/// Decay of the second moment.
const BETA2: f64 = 0.999;
/// Added to the second moment's root.
const EPSILON: f64 = 1e-8;

/// Adam's state for the variables of some parameter groups.
pub(crate) struct Adam {
    /// Each variable with its group's base learning rate.
    vars: Vec<(Var, f64)>,
    /// Moments of the variables' elements, concatenated in `vars`' order.
    first_moment: Tensor,
    second_moment: Tensor,
    steps: i32,
}

impl Adam {
    /// Fresh moments for every variable of `groups` (which share one dtype and device).
    pub fn new(groups: &[ParamGroup]) -> Result<Self, OptimError> {
        let vars: Vec<(Var, f64)> = groups
            .iter()
            .flat_map(|g| g.vars.iter().map(|var| (var.clone(), g.learning_rate)))
            .collect();
        let Some((first, _)) = vars.first() else {
            return Err(OptimError::InvalidInput(
                "Adam needs at least one variable".to_string(),
            ));
        };
        // The moments and steps are one vector: every variable must fit into it.
        if let Some((other, _)) = vars.iter().find(|(var, _)| {
            var.dtype() != first.dtype() || !var.device().same_device(first.device())
        }) {
            return Err(OptimError::InvalidInput(format!(
                "a stage's variables must share one dtype and device; found {:?} on {:?} and \
                 {:?} on {:?}: convert them before fitting",
                first.dtype(),
                first.device().location(),
                other.dtype(),
                other.device().location()
            )));
        }
        let elements = vars.iter().map(|(var, _)| var.elem_count()).sum::<usize>();
        let zeros = Tensor::zeros(elements, first.dtype(), first.device())?;
        Ok(Adam {
            vars,
            first_moment: zeros.clone(),
            second_moment: zeros,
            steps: 0,
        })
    }

    /// The variables' gradients in `grads`, concatenated; zeros for a variable without one (the
    /// objective does not depend on it): its moments then stay zero and its steps are zero, as
    /// `AdamW`'s, which skips it.
    pub fn gradient(&self, grads: &GradStore) -> Result<Tensor, OptimError> {
        let parts = self
            .vars
            .iter()
            .map(|(var, _)| match grads.get(var) {
                Some(grad) => grad.flatten_all(),
                None => var.zeros_like()?.flatten_all(),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// One step along `gradient` ([`Adam::gradient`]) with every group's learning rate times
    /// `lr_factor`.
    pub fn step(&mut self, gradient: &Tensor, lr_factor: f64) -> Result<(), OptimError> {
        self.steps += 1;
        let scale_m = 1.0 / (1.0 - BETA1.powi(self.steps));
        let scale_v = 1.0 / (1.0 - BETA2.powi(self.steps));
        let first = ((&self.first_moment * BETA1)? + (gradient * (1.0 - BETA1))?)?;
        let second = ((&self.second_moment * BETA2)? + (gradient.sqr()? * (1.0 - BETA2))?)?;
        let direction = ((&first * scale_m)? / ((&second * scale_v)?.sqrt()? + EPSILON)?)?;
        // Each element's rate, rounded to the dtype as `AdamW`'s scalar rate is.
        let rates: Vec<f64> = self
            .vars
            .iter()
            .flat_map(|(var, rate)| std::iter::repeat_n(rate * lr_factor, var.elem_count()))
            .collect();
        let rates = Tensor::from_vec(rates, gradient.elem_count(), &Device::Cpu)?
            .to_dtype(gradient.dtype())?
            .to_device(gradient.device())?;
        let values = self
            .vars
            .iter()
            .map(|(var, _)| var.as_tensor().flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let next = (Tensor::cat(&values, 0)? - (direction * rates)?)?;
        let mut offset = 0;
        for (var, _) in &self.vars {
            let count = var.elem_count();
            var.set(&next.narrow(0, offset, count)?.reshape(var.shape())?)?;
            offset += count;
        }
        self.first_moment = first;
        self.second_moment = second;
        Ok(())
    }
}

/// Whether every element of a gradient ([`Adam::gradient`]) is finite: its magnitudes' sum (in
/// f64) is, read back once.
pub(crate) fn is_finite(gradient: &Tensor) -> Result<bool, OptimError> {
    let sum = gradient.abs()?.to_dtype(DType::F64)?.sum_all()?;
    Ok(sum.to_scalar::<f64>()?.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::{AdamW, Optimizer, ParamsAdamW};

    /// Two groups with their own rates, steps along changing gradients with a changing rate
    /// factor: the variables take exactly candle-nn's `AdamW` values at every step.
    #[test]
    fn steps_are_adamws_bit_for_bit() -> Result<(), OptimError> {
        let device = Device::Cpu;
        let start = |values: &[f32], shape: &[usize]| -> candle_core::Result<[Var; 2]> {
            let t = Tensor::from_slice(values, shape, &device)?;
            Ok([Var::from_tensor(&t)?, Var::from_tensor(&t)?])
        };
        let [a, a_reference] = start(&[0.5, -1.5, 2.0, 0.25, 3.0, -0.75], &[2, 3])?;
        let [b, b_reference] = start(&[1.0, -2.0], &[2])?;
        let [unused, unused_reference] = start(&[7.0], &[1])?;
        let groups = [
            ParamGroup::new("a", vec![a.clone(), unused.clone()], 0.05),
            ParamGroup::new("b", vec![b.clone()], 0.3),
        ];
        let mut adam = Adam::new(&groups)?;
        let params = |lr| ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        };
        let mut reference = [
            AdamW::new(
                vec![a_reference.clone(), unused_reference.clone()],
                params(0.05),
            )?,
            AdamW::new(vec![b_reference.clone()], params(0.3))?,
        ];
        for step in 0..12 {
            let lr_factor = 1.0 / (1.0 + step as f64);
            // A loss whose gradients change from step to step; `unused` is not in it.
            let loss = |a: &Var, b: &Var| -> candle_core::Result<Tensor> {
                let curved = (a.as_tensor().sqr()?.sum_all()? * (step as f64 + 1.0))?;
                curved + (b.as_tensor().sin()?.sum_all()? * a.as_tensor().sum_all()?)?
            };
            let grads = loss(&a, &b)?.backward()?;
            adam.step(&adam.gradient(&grads)?, lr_factor)?;
            let reference_grads = loss(&a_reference, &b_reference)?.backward()?;
            for (optimiser, rate) in reference.iter_mut().zip([0.05, 0.3]) {
                optimiser.set_learning_rate(rate * lr_factor);
                optimiser.step(&reference_grads)?;
            }
            for (var, want) in [
                (&a, &a_reference),
                (&b, &b_reference),
                (&unused, &unused_reference),
            ] {
                let got: Vec<f32> = var.flatten_all()?.to_vec1()?;
                let want: Vec<f32> = want.flatten_all()?.to_vec1()?;
                assert_eq!(got, want, "step {step}");
            }
        }
        assert_eq!(unused.flatten_all()?.to_vec1::<f32>()?, [7.0]);
        Ok(())
    }

    #[test]
    fn variables_of_two_dtypes_are_a_typed_error() -> Result<(), OptimError> {
        let var = |dtype| Var::zeros(3, dtype, &Device::Cpu);
        let groups = [
            ParamGroup::new("single", vec![var(DType::F32)?], 0.1),
            ParamGroup::new("double", vec![var(DType::F64)?], 0.1),
        ];
        let err = Adam::new(&groups).err().expect("mixed dtypes are refused");
        assert!(matches!(err, OptimError::InvalidInput(_)), "{err}");
        assert!(err.to_string().contains("share one dtype"), "{err}");
        Ok(())
    }

    #[test]
    fn a_nan_or_infinity_anywhere_is_not_finite() -> Result<(), OptimError> {
        let gradient = |v: f32| Tensor::new(&[1.0f32, -2.0, v], &Device::Cpu);
        assert!(is_finite(&gradient(3.0)?)?);
        assert!(!is_finite(&gradient(f32::NAN)?)?);
        assert!(!is_finite(&gradient(f32::NEG_INFINITY)?)?);
        Ok(())
    }
}
