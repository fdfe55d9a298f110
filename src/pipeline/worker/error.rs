//! What the pipeline's events say went wrong: each a type, so that a
//! consumer can tell a source from a model failure without reading text.

use crate::model::cliper::bank::BankError;
use crate::model::cliper::checkpoint::CliperFileError;
use crate::model::setup::SetupError;
use crate::model::weights::WeightsError;
use crate::vision::faces::FaceError;
use crate::vision::source::SourceError;

/// Why a source stopped for good (or never opened).
#[derive(Debug, thiserror::Error)]
pub enum SourceFailure {
    #[error(transparent)]
    Source(#[from] SourceError),
    /// No face detector could be built.
    #[error(transparent)]
    Detector(#[from] FaceError),
}

/// Something the run goes on after.
#[derive(Debug, thiserror::Error)]
pub enum SourceWarning {
    /// A frame that could not be read (an unreadable image in a folder).
    #[error("skipped a frame: {0}")]
    SkippedFrame(SourceError),
    /// The source's own report (damaged packets, a truncated file).
    #[error("{0}")]
    Source(String),
    /// The CenterFace file could not be used; SeetaFace detects instead.
    #[error("{0}; detecting with SeetaFace's frontal cascade instead")]
    DetectorFallback(FaceError),
    /// The detector asked for could not be built; the current one stays.
    #[error(transparent)]
    Detector(FaceError),
}

/// Why the model, a bank, the probe or an explanation failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Setup(Box<SetupError>),
    /// A saved bank failed to load; the built-in descriptions stand in.
    #[error("{0}; using the built-in zero-shot descriptions instead")]
    BankFellBack(Box<SetupError>),
    #[error("inference failed on frame {frame}: {error}")]
    Inference {
        frame: u64,
        #[source]
        error: candle_core::Error,
    },
    #[error("cannot change the {0}: no model is loaded")]
    NotLoaded(&'static str),
    /// An explanation asked for while no model is loaded.
    #[error("no model is loaded")]
    NoModel,
    #[error("cannot encode the text: {0}")]
    Probe(#[source] candle_core::Error),
    #[error("cannot start the explanation thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<SetupError> for ModelError {
    fn from(e: SetupError) -> Self {
        Self::Setup(Box::new(e))
    }
}

impl From<WeightsError> for ModelError {
    fn from(e: WeightsError) -> Self {
        Self::Setup(Box::new(e.into()))
    }
}

impl From<CliperFileError> for ModelError {
    fn from(e: CliperFileError) -> Self {
        Self::Setup(Box::new(e.into()))
    }
}

impl From<BankError> for ModelError {
    fn from(e: BankError) -> Self {
        Self::Setup(Box::new(e.into()))
    }
}
