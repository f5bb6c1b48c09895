//! MLIR generic-syntax printer.

use std::fmt;

/// Writes `s` as an MLIR string literal (quotes, escapes as `\XX` hex).
pub fn write_string_literal(f: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    f.write_char('"')?;
    for b in s.bytes() {
        match b {
            b'"' => f.write_str("\\\"")?,
            b'\\' => f.write_str("\\\\")?,
            0x20..=0x7e => f.write_char(b as char)?,
            _ => write!(f, "\\{b:02X}")?,
        }
    }
    f.write_char('"')
}
