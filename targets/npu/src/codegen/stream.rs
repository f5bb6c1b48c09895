//! Streams (placeholder).
use super::{Gen, R};
use kiln_ir::kernel::Stmt;

impl Gen<'_> {
    /// Compiles `s` as a stream when it has that form.
    pub fn try_stream(&mut self, _s: &Stmt) -> R<Option<()>> {
        Ok(None)
    }
}
