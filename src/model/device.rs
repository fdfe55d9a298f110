//! Choosing the compute device (`--device auto|cpu|cuda|metal`) and the
//! precision the image encoder runs in (`--precision`).

use candle_core::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use auto, cpu, cuda or metal")]
    Unknown(String),
    #[error("this build of cliper has no {0} support: rebuild with `cargo build --release --features {0}`")]
    NotBuilt(&'static str),
    #[error("cannot open the {0} device: {1}")]
    Open(&'static str, String),
    #[error("--precision {precision} does not run on the {device}: {hint}")]
    Precision {
        precision: &'static str,
        device: &'static str,
        hint: &'static str,
    },
}

/// Precision of the model weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// The fastest path whose agreement with f32 holds: on the CPU bf16
    /// through oneDNN where the CPU has AMX, else q8 where every layer fits
    /// one of the int8 kernels (x86-64 with AVX2), else f32 (see
    /// `VisionTower::pack_fastest`); f16 on GPUs.
    #[default]
    Auto,
    F32,
    F16,
    /// On GPUs the model in bf16; on the CPU the image encoder's linear
    /// layers as oneDNN bf16 products (AMX or AVX512-BF16), f32 elsewhere.
    Bf16,
    /// 8-bit weights (Q8_0) and activations in the image encoder's linear
    /// layers, f32 elsewhere; CPU only.
    Q8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Q8 => "q8",
        }
    }

    /// The dtype the model is built in on `device`.
    pub fn dtype(self, device: &Device) -> Result<DType, DeviceError> {
        let refuse = |hint| DeviceError::Precision {
            precision: self.as_str(),
            device: describe(device),
            hint,
        };
        match (self, device.is_cpu()) {
            (Precision::Auto, _) => Ok(default_dtype(device)),
            (Precision::F32, _) => Ok(DType::F32),
            (Precision::F16, _) => Ok(DType::F16),
            (Precision::Bf16, false) => Ok(DType::BF16),
            // The weights load in f32 and are packed for oneDNN's bf16
            // products (`VisionTower::pack_onednn`).
            (Precision::Bf16, true) => Ok(DType::F32),
            (Precision::Q8, true) => Ok(DType::F32),
            (Precision::Q8, false) => Err(refuse(
                "the 8-bit path is CPU-only; GPUs run f16 (--precision f16 or auto)",
            )),
        }
    }

    /// Whether the image encoder's linear layers are quantized to 8 bits.
    pub fn quantized(self) -> bool {
        self == Precision::Q8
    }

    /// Applies this precision's CPU packing to `vision` (built in
    /// [`dtype`](Self::dtype)): q8 -> this crate's 8-bit kernels (`isa`
    /// forced or the best), bf16 -> oneDNN's bf16 products, auto -> the
    /// fastest path whose agreement holds
    /// ([`VisionTower::pack_fastest`](crate::model::vision::VisionTower::pack_fastest)).
    /// Nothing on other devices, where the dtype is the precision.
    pub fn pack(
        self,
        vision: &mut crate::model::vision::VisionTower,
        device: &Device,
        isa: Option<crate::model::gemm_i8::Isa>,
    ) -> candle_core::Result<()> {
        if !device.is_cpu() {
            return Ok(());
        }
        match (self, isa) {
            (Precision::Q8, isa) | (Precision::Auto, isa @ Some(_)) => vision.quantize(isa),
            (Precision::Bf16, _) => vision.pack_onednn(crate::model::onednn::DataType::Bf16),
            (Precision::Auto, None) => vision.pack_fastest().map(|_| ()),
            (Precision::F32, None) => vision.pack_f32_fastest().map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// `--device`: which device to run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// A CUDA GPU, else Metal, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
    Metal,
}

impl DeviceChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
            DeviceChoice::Metal => "metal",
        }
    }
}

/// Opens the device named by `choice`; `auto` takes the best one available.
pub fn select(choice: &str) -> Result<Device, DeviceError> {
    match choice {
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if !candle_core::utils::cuda_is_available() {
                return Err(DeviceError::NotBuilt("cuda"));
            }
            Device::new_cuda(0).map_err(|e| DeviceError::Open("cuda", e.to_string()))
        }
        "metal" => {
            if !candle_core::utils::metal_is_available() {
                return Err(DeviceError::NotBuilt("metal"));
            }
            Device::new_metal(0).map_err(|e| DeviceError::Open("metal", e.to_string()))
        }
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok(d);
                }
            }
            if candle_core::utils::metal_is_available() {
                if let Ok(d) = Device::new_metal(0) {
                    return Ok(d);
                }
            }
            Ok(Device::Cpu)
        }
        other => Err(DeviceError::Unknown(other.to_string())),
    }
}

/// The working precision on a device: f32 on CPU, f16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// A short name for status bars and metadata.
pub fn describe(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "CPU",
        Device::Cuda(_) => "CUDA",
        Device::Metal(_) => "Metal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_precisions() {
        let cpu = Device::Cpu;
        assert_eq!(Precision::Auto.dtype(&cpu).unwrap(), DType::F32);
        assert_eq!(Precision::Q8.dtype(&cpu).unwrap(), DType::F32);
        assert!(Precision::Q8.quantized() && !Precision::F32.quantized());
        // bf16 loads f32 weights and packs them for oneDNN.
        assert_eq!(Precision::Bf16.dtype(&cpu).unwrap(), DType::F32);
    }
}
