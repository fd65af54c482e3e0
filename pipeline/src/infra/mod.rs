//! Infrastructure every other tier builds on: errors, atomic file I/O, content hashing, clock,
//! Python-style JSON, interrupts, available memory, run reports and progress, and the ranks of a data-parallel run.

pub mod clock;
pub mod collective;
pub mod error;
pub mod fsio;
pub mod hashing;
pub mod interrupt;
pub mod memory;
pub mod pyjson;
pub mod report;
#[cfg(test)]
pub(crate) mod test_support;
