//! Helpers shared by the integration tests and their peer binaries.
