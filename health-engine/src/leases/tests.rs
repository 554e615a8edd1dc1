//! Unit and property tests of the lease core.
