//! `coefficients · basis` as a candle custom op whose backward gives only the coefficients'
//! gradient. candle's own matmul backward also forms the (here useless) gradient of the
//! 153 × 28k basis, which costs more than the whole forward pass.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Storage, Tensor};

/// `out = Σ_i coeffs[:, cols_i] · blocks[i]` for coefficients `[B, J]`, giving `[B, C]`: each
/// block is a contiguous run of basis rows (the first k identity modes, the first k expression
/// modes), so no basis data is copied.
pub(crate) struct LinearBlend {
    /// Non-empty `[k_i, C]` views of the basis, in coefficient-column order.
    pub blocks: Vec<Tensor>,
}

impl LinearBlend {
    /// Applies `f` to each block and the coefficient columns it multiplies.
    fn per_block(
        &self,
        coeffs: &Tensor,
        mut f: impl FnMut(&Tensor, &Tensor) -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        let mut start = 0;
        for block in &self.blocks {
            let k = block.dim(0)?;
            f(&coeffs.narrow(1, start, k)?, block)?;
            start += k;
        }
        Ok(())
    }
}

impl CustomOp1 for LinearBlend {
    fn name(&self) -> &'static str {
        "linear-blend"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("linear blend: the coefficients must be f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("linear blend: the coefficients must be contiguous");
        };
        // A detached tensor: the product below runs on candle's (SIMD, blocked) matmul and is
        // not recorded for autograd; this op's own `bwd` provides the gradient.
        let coeffs = Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)?;
        let mut sum: Option<Tensor> = None;
        self.per_block(&coeffs, |c, block| {
            let part = c.matmul(block)?;
            sum = Some(match sum.take() {
                Some(s) => (s + part)?,
                None => part,
            });
            Ok(())
        })?;
        let Some(sum) = sum else {
            candle_core::bail!("linear blend: no basis blocks");
        };
        let shape = sum.shape().clone();
        let (out, out_layout) = sum.storage_and_layout();
        match (&*out, out_layout.contiguous_offsets()) {
            (Storage::Cpu(cpu), Some((0, _))) => Ok((cpu.clone(), shape)),
            _ => candle_core::bail!("linear blend: unexpected product layout"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad_res = grad_res.detach();
        let mut parts = Vec::with_capacity(self.blocks.len());
        self.per_block(arg, |_, block| {
            parts.push(grad_res.matmul(&block.t()?)?);
            Ok(())
        })?;
        Tensor::cat(&parts, 1).map(Some)
    }
}
