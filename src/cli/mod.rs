//! Commands beside the daemon: `status` reads the database, `demo` runs the simulator and the
//! daemon together on example input.

pub mod demo;
pub mod status;

pub use status::Status;
