//! MLIR generic-syntax parser.
