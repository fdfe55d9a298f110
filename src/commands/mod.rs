//! The work of the commands that are not the live window, each called by
//! its file under the binary's `src/cli/`: `cliper run` (the live pipeline
//! without a window), `classify-clip`, `explain` and `bench`. `cliper
//! batch`, `train` and `eval` have modules of their own (`batch`, `train`).

pub mod bench;
pub mod clip;
pub mod explain;
pub mod run;
