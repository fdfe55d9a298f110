//! Choosing the compute device (`--device auto|cpu|cuda|metal`).

use candle_core::{DType, Device};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: use auto, cpu, cuda or metal")]
    Unknown(String),
    #[error("this build of cliper has no {0} support: rebuild with `cargo build --release --features {0}`")]
    NotBuilt(&'static str),
    #[error("cannot open the {0} device: {1}")]
    Open(&'static str, String),
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
