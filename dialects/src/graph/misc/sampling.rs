//! stub

use crate::graph::Registry;

pub fn register(_r: &mut Registry) {}
