//! Training and evaluation: CLIPER's two-stage recipe
//! (`docs/model.md` section 5), data sets, the loss, optimiser and
//! schedule, augmentation, cached features and metrics.

pub mod augment;
pub mod dataset;
pub mod features;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod trainer;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error(transparent)]
    Setup(Box<crate::model::setup::SetupError>),
    #[error(transparent)]
    Device(#[from] crate::model::device::DeviceError),
    #[error(transparent)]
    Weights(Box<crate::model::weights::WeightsError>),
    #[error(transparent)]
    Cliper(Box<crate::model::cliper::checkpoint::CliperFileError>),
    #[error(transparent)]
    Bank(#[from] crate::model::cliper::bank::BankError),
    #[error("{0} (pass --skip-unreadable to skip such samples)")]
    Unreadable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<crate::model::setup::SetupError> for TrainError {
    fn from(e: crate::model::setup::SetupError) -> Self {
        Self::Setup(Box::new(e))
    }
}

impl From<crate::model::weights::WeightsError> for TrainError {
    fn from(e: crate::model::weights::WeightsError) -> Self {
        Self::Weights(Box::new(e))
    }
}

impl From<crate::model::cliper::checkpoint::CliperFileError> for TrainError {
    fn from(e: crate::model::cliper::checkpoint::CliperFileError) -> Self {
        Self::Cliper(Box::new(e))
    }
}
