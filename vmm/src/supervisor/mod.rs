//! Backend processes cloister starts itself ("managed" devices): where their sockets live,
//! how they are started, watched, stopped and reaped.

pub mod process;
pub mod runtime_dir;
pub mod spawner;

pub use process::{describe, find_program, ManagedProcess, ProcessError};
pub use runtime_dir::RuntimeDir;
pub use spawner::{SpawnedProcess, Spawner};
