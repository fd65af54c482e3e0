//! Infrastructure every other tier builds on: errors, atomic file I/O, content hashing,
//! Python-style JSON, run reports and progress.

pub mod error;
pub mod fsio;
pub mod hashing;
pub mod pyjson;
pub mod report;
#[cfg(test)]
pub(crate) mod test_support;
