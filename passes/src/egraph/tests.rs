//! Tests of the rewrite rules (one or more per rule), extraction and conversion.
