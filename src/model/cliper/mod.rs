//! The CLIPER head (`docs/model.md` sections 2-4): classes and prompt
//! template, the descriptor bank, scoring, and the checkpoint file.

pub mod bank;
pub mod checkpoint;
pub mod expressions;
pub mod scoring;

pub use bank::{BankKind, DescriptorBank};
pub use checkpoint::CliperCheckpoint;
pub use expressions::CLASSES;
pub use scoring::ExpressionScores;
