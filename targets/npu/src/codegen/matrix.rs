//! Matrix tiles (placeholder).
use super::{Gen, R};
use kiln_ir::kernel::Mma;

impl Gen<'_> {
    /// An Mma tile.
    pub fn matrix_tile(&mut self, m: &Mma) -> R<()> {
        self.generic_mma(m)
    }
}
