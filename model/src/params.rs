//! Where parameter values come from when a model is built: a `VarBuilder`
//! walks HF names (`vb.pp("model").pp("layers").pp(i)`, as candle does) and asks
//! a `ParamSource` (seeded init, or an HF checkpoint) for each tensor by name.
//! Loading HF weights therefore needs no name mapping at all.

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

use crate::error::ModelError;

/// Supplies the values of a parameter, by HF name, as f32.
pub trait ParamSource {
    fn load(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError>;

    /// Elements `start..start + len` of the flattened parameter (an FSDP
    /// rank's slice); sources that can produce a slice alone override this.
    fn load_range(
        &self,
        name: &str,
        shape: &[usize],
        start: usize,
        len: usize,
    ) -> Result<Vec<f32>, ModelError> {
        Ok(self.load(name, shape)?[start..start + len].to_vec())
    }
}

/// Builds parameters under a name prefix on one device.
pub struct VarBuilder<'a, B: Backend> {
    /// `None`: every parameter is a 1-element placeholder (see `placeholders`).
    source: Option<&'a dyn ParamSource>,
    prefix: String,
    device: B::Device,
}

impl<'a, B: Backend> VarBuilder<'a, B> {
    pub fn new(source: &'a dyn ParamSource, device: &B::Device) -> Self {
        Self {
            source: Some(source),
            prefix: String::new(),
            device: device.clone(),
        }
    }

    /// A builder of 1-element placeholder parameters: the module tree without
    /// its memory, for owners that set the real values later (FSDP gathers).
    pub fn placeholders(device: &B::Device) -> Self {
        Self {
            source: None,
            prefix: String::new(),
            device: device.clone(),
        }
    }

    /// The builder one level down: `vb.pp("mamba")`.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Self {
            source: self.source,
            prefix,
            device: self.device.clone(),
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The parameter `<prefix>.<name>` with `shape`, requiring gradients.
    pub fn get<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Param<Tensor<B, D>>, ModelError> {
        let Some(source) = self.source else {
            return Ok(Param::from_data(
                TensorData::new(vec![0f32], [1; D]),
                &self.device,
            ));
        };
        let full = self.pp(name).prefix;
        let values = source.load(&full, &shape)?;
        if values.len() != shape.iter().product::<usize>() {
            return Err(ModelError::tensor(
                full,
                format!("source gave {} values for shape {shape:?}", values.len()),
            ));
        }
        Ok(Param::from_data(
            TensorData::new(values, shape),
            &self.device,
        ))
    }
}
