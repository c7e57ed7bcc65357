//! Local Together API simulator.
