//! Library of the end-to-end test crate: the bad-input corpus generator shared by the tests in
//! `e2e/` (the tests themselves drive the built lorakit executables).

pub mod corpus;
