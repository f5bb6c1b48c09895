//! Tests of the fusion rules.
