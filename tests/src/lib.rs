//! End-to-end tests of the lorakit executables live in `e2e/`; this crate has no library code.
