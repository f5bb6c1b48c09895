//! Machine descriptions of one NPU core: memory levels, DMA paths, units, flags.
//!
//! A description is plain data (JSON through serde). Three presets ship with the crate
//! (`presets/*.json`, embedded): `davinci` (an Ascend 910B-like AI core: GM → L1 → L0A/L0B →
//! cube → L0C, and UB for the vector unit), `sunway` (an SW26010-Pro-like CPE: main memory and
//! a 256 KB LDM, SIMD, no matrix unit) and `mlu` (a Cambricon MLU370-like core: NRAM for
//! activations and vector work, WRAM for weights). Each preset lists in its `notes` which of
//! its numbers are public facts and which are guesses.
//!
//! Invariant: the simulator runs ONE core. `cores` only scales the peaks that
//! [`NpuConfig::machine`] hands to cost models.
//!
//! The first level is global memory (where a kernel's buffers live); the others are
//! scratchpads. Addresses and sizes in the ISA are in f32 elements; capacities and alignments
//! here are in bytes, as vendors give them.

use crate::isa::Pipe;
use crate::NpuError;
use kiln_ir::machine::{MachineDescription, MemoryLevel};
use serde::{Deserialize, Serialize};

/// The machine description of one NPU core (see the module docs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NpuConfig {
    /// Preset or chip name (`davinci`, `sunway`, `mlu`, ...).
    pub name: String,
    /// Where the numbers come from and which are guesses (free text, one note per line).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Core clock in GHz (converts cycles to time).
    pub clock_ghz: f64,
    /// Cores on the chip (the simulator runs one; cost models scale by this).
    pub cores: u32,
    /// Memory levels; the first is global memory, the rest are scratchpads.
    pub levels: Vec<LevelConfig>,
    /// DMA paths between levels (a path is one-way).
    pub dma: Vec<DmaPath>,
    /// The vector unit.
    pub vector: VectorUnit,
    /// The matrix unit, if the core has one.
    #[serde(default)]
    pub matrix: Option<MatrixUnit>,
    /// The scalar unit (control flow, address arithmetic, instruction issue).
    pub scalar: ScalarUnit,
    /// Flag (event) ids per ordered pair of pipes.
    pub flags_per_pipe_pair: u32,
    /// Entries in each pipe's instruction queue (the scalar unit stalls when one is full).
    pub queue_depth: u32,
    /// Fixed cost of launching one kernel, in microseconds (for cost models).
    #[serde(default)]
    pub launch_us: f64,
}

/// One memory level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LevelConfig {
    /// Name instructions use (`GM`, `UB`, `L0A`, ...).
    pub name: String,
    /// Capacity in bytes (per core for scratchpads).
    pub capacity_bytes: u64,
    /// Alignment of buffers the code generator places here, in bytes (a power of two ≥ 4).
    pub align_bytes: u32,
}

/// A one-way DMA path between two levels, run by one pipe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaPath {
    /// Source level.
    pub from: String,
    /// Destination level.
    pub to: String,
    /// The pipe (engine) that runs copies on this path: `MTE1`, `MTE2`, `MTE3` or `V`.
    pub pipe: Pipe,
    /// Sustained bandwidth in bytes per cycle.
    pub bytes_per_cycle: f64,
    /// Fixed cost of one copy instruction, in cycles.
    pub latency_cycles: u32,
}

/// The vector (SIMD) unit: memory-to-memory ops on one scratchpad level.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VectorUnit {
    /// The level its operands live in.
    pub level: String,
    /// Bytes processed per repeat (cycle): `width_bytes / 4` f32 lanes.
    pub width_bytes: u32,
    /// Fixed cost of one instruction, in cycles.
    pub startup_cycles: u32,
    /// Cycles per repeat of divide, square root and reciprocal.
    pub divide_cycles: u32,
    /// Cycles per repeat of exp, log, tanh, erf, sigmoid and pow.
    pub transcendental_cycles: u32,
}

/// The matrix unit: `C[m×n] (+)= A[m×k]·B[k×n]` on tiles in its operand levels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatrixUnit {
    /// Native tile shape `m × n × k`: a matrix op costs whole tiles (padding is waste).
    pub m: u32,
    /// See `m`.
    pub n: u32,
    /// See `m`.
    pub k: u32,
    /// Multiply-accumulates per cycle at the unit's native (narrow, e.g. fp16) input type.
    pub macs_per_cycle: u32,
    /// Multiply-accumulates per cycle on f32 operands (what kiln computes: one native tile
    /// takes `m·n·k / f32_macs_per_cycle` cycles). Matrix units shaped for fp16 run f32 at a
    /// fraction of their fp16 rate (DaVinci's cube: a quarter). Absent: `macs_per_cycle`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub f32_macs_per_cycle: Option<u32>,
    /// Level of the left operand (`A[m×k]`).
    pub a_level: String,
    /// Level of the right operand (`B[k×n]`).
    pub b_level: String,
    /// Level of the accumulator (`C[m×n]`).
    pub c_level: String,
    /// Fixed cost of one instruction, in cycles.
    pub startup_cycles: u32,
}

impl MatrixUnit {
    /// Multiply-accumulates per cycle on f32 operands (the rate the simulator charges).
    pub fn f32_rate(&self) -> u64 {
        self.f32_macs_per_cycle.unwrap_or(self.macs_per_cycle).max(1) as u64
    }

    /// Cycles of one native `m × n × k` tile on f32 operands.
    pub fn tile_cycles(&self) -> u64 {
        (self.m as u64 * self.n as u64 * self.k as u64).div_ceil(self.f32_rate())
    }
}

/// The scalar unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalarUnit {
    /// Cycles per scalar instruction and per instruction issued to another pipe.
    pub cycles_per_instr: u32,
}

/// The presets' JSON text, by name.
const PRESETS: [(&str, &str); 3] = [
    ("davinci", include_str!("../presets/davinci.json")),
    ("sunway", include_str!("../presets/sunway.json")),
    ("mlu", include_str!("../presets/mlu.json")),
];

/// The most levels an instruction can name (4 bits each in the binary encoding).
pub const MAX_LEVELS: usize = 16;

impl NpuConfig {
    /// The names of the presets.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|(n, _)| *n).collect()
    }

    /// A preset: `davinci`, `sunway` or `mlu`.
    pub fn preset(name: &str) -> Result<NpuConfig, NpuError> {
        match PRESETS.iter().find(|(n, _)| *n == name) {
            Some((n, text)) => NpuConfig::from_json(text, &format!("{n}.json")),
            None => Err(NpuError::BadConfig {
                origin: name.to_string(),
                msg: format!("no preset named '{name}' (presets: {})", NpuConfig::preset_names().join(", ")),
            }),
        }
    }

    /// Parses and validates a description; `origin` names it in errors (a file name).
    pub fn from_json(text: &str, origin: &str) -> Result<NpuConfig, NpuError> {
        let cfg: NpuConfig = serde_json::from_str(text)
            .map_err(|e| NpuError::BadConfig { origin: origin.to_string(), msg: e.to_string() })?;
        cfg.validate_as(origin)?;
        Ok(cfg)
    }

    /// The description as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the description; errors name the configuration by its `name`.
    pub fn validate(&self) -> Result<(), NpuError> {
        self.validate_as(&self.name)
    }

    fn validate_as(&self, origin: &str) -> Result<(), NpuError> {
        let bad = |msg: String| Err(NpuError::BadConfig { origin: origin.to_string(), msg });
        if !(self.clock_ghz.is_finite() && self.clock_ghz > 0.0) {
            return bad(format!("clock_ghz is {}, expected a positive number", self.clock_ghz));
        }
        if self.cores == 0 {
            return bad("cores is 0, expected at least 1".into());
        }
        if self.levels.len() < 2 {
            return bad(format!(
                "{} memory level(s), expected global memory and at least one scratchpad",
                self.levels.len()
            ));
        }
        if self.levels.len() > MAX_LEVELS {
            return bad(format!("{} memory levels, at most {MAX_LEVELS} are supported", self.levels.len()));
        }
        for (i, l) in self.levels.iter().enumerate() {
            if l.name.is_empty() || !l.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return bad(format!("level {i} is named '{}', expected letters, digits or '_'", l.name));
            }
            if self.levels[..i].iter().any(|o| o.name == l.name) {
                return bad(format!("level '{}' is listed twice", l.name));
            }
            if l.capacity_bytes == 0 {
                return bad(format!("level '{}' has capacity 0", l.name));
            }
            if !l.capacity_bytes.is_multiple_of(4) {
                return bad(format!(
                    "level '{}' has capacity {} bytes, not a whole number of f32",
                    l.name, l.capacity_bytes
                ));
            }
            if l.align_bytes < 4 || !l.align_bytes.is_power_of_two() {
                return bad(format!("level '{}' has alignment {}, expected a power of two ≥ 4", l.name, l.align_bytes));
            }
        }
        let level = |what: &str, name: &str| -> Result<usize, NpuError> {
            self.level_index(name).ok_or_else(|| NpuError::BadConfig {
                origin: origin.to_string(),
                msg: format!("{what} names level '{name}', which is not among the levels ({})", self.level_names()),
            })
        };
        for p in &self.dma {
            let what = format!("DMA path {} -> {}", p.from, p.to);
            let (f, t) = (level(&what, &p.from)?, level(&what, &p.to)?);
            if f == t {
                return bad(format!("{what} copies a level onto itself"));
            }
            if !(p.bytes_per_cycle.is_finite() && p.bytes_per_cycle > 0.0) {
                return bad(format!(
                    "{what} has bandwidth {} bytes/cycle, expected a positive number",
                    p.bytes_per_cycle
                ));
            }
            if !matches!(p.pipe, Pipe::Mte1 | Pipe::Mte2 | Pipe::Mte3 | Pipe::V) {
                return bad(format!("{what} runs on pipe {}, expected MTE1, MTE2, MTE3 or V", p.pipe));
            }
            if self.dma.iter().filter(|q| q.from == p.from && q.to == p.to).count() > 1 {
                return bad(format!("{what} is listed twice"));
            }
        }
        let v = level("the vector unit", &self.vector.level)?;
        if v == 0 {
            return bad(format!(
                "the vector unit works in '{}', global memory; expected a scratchpad",
                self.vector.level
            ));
        }
        if self.vector.width_bytes < 4 || !self.vector.width_bytes.is_multiple_of(4) {
            return bad(format!(
                "vector width is {} bytes, expected a positive multiple of 4",
                self.vector.width_bytes
            ));
        }
        if self.vector.divide_cycles == 0 || self.vector.transcendental_cycles == 0 {
            return bad("vector divide_cycles and transcendental_cycles must be at least 1".into());
        }
        if self.scalar.cycles_per_instr == 0 {
            return bad("scalar cycles_per_instr is 0, expected at least 1".into());
        }
        if self.flags_per_pipe_pair < 2 || self.flags_per_pipe_pair > 256 {
            return bad(format!("flags_per_pipe_pair is {}, expected 2 to 256", self.flags_per_pipe_pair));
        }
        if self.queue_depth == 0 {
            return bad("queue_depth is 0, expected at least 1".into());
        }
        // Every kernel needs global memory → vector level → global memory.
        for (from, to) in [(0, v), (v, 0)] {
            if self.path(from, to).is_none() {
                return bad(format!(
                    "no DMA path from '{}' to '{}' (the vector unit's operands come from and go to global memory)",
                    self.levels[from].name, self.levels[to].name
                ));
            }
        }
        if let Some(m) = &self.matrix {
            if m.m == 0 || m.n == 0 || m.k == 0 {
                return bad(format!("matrix tile is {}x{}x{}, expected positive sizes", m.m, m.n, m.k));
            }
            if m.macs_per_cycle == 0 {
                return bad("matrix macs_per_cycle is 0, expected at least 1".into());
            }
            if m.f32_macs_per_cycle == Some(0) {
                return bad("matrix f32_macs_per_cycle is 0, expected at least 1 (or leave it out)".into());
            }
            let (a, b, c) = (
                level("the matrix unit's A operand", &m.a_level)?,
                level("the matrix unit's B operand", &m.b_level)?,
                level("the matrix unit's accumulator", &m.c_level)?,
            );
            for (what, l) in [("A operand", a), ("B operand", b), ("accumulator", c)] {
                if l == 0 {
                    return bad(format!("the matrix unit's {what} is in global memory; expected a scratchpad"));
                }
            }
            if a == b {
                return bad(format!("the matrix unit reads A and B from the same level '{}'", m.a_level));
            }
            for (what, from, to) in [("A", v, a), ("B", v, b), ("accumulator", c, v)] {
                if from != to && self.route(from, to).is_none() {
                    return bad(format!(
                        "no DMA route from '{}' to '{}' (the matrix unit's {what})",
                        self.levels[from].name, self.levels[to].name
                    ));
                }
            }
        }
        Ok(())
    }

    /// Index of the level named `name`.
    pub fn level_index(&self, name: &str) -> Option<usize> {
        self.levels.iter().position(|l| l.name == name)
    }

    fn level_names(&self) -> String {
        self.levels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// The vector unit's level.
    pub fn vector_level(&self) -> usize {
        self.level_index(&self.vector.level).unwrap_or(1)
    }

    /// f32 lanes per vector repeat.
    pub fn lanes(&self) -> u64 {
        (self.vector.width_bytes / 4).max(1) as u64
    }

    /// Capacity of level `l` in f32 elements.
    pub fn capacity_elems(&self, l: usize) -> u64 {
        self.levels.get(l).map_or(0, |l| l.capacity_bytes / 4)
    }

    /// Alignment of level `l` in f32 elements.
    pub fn align_elems(&self, l: usize) -> u64 {
        self.levels.get(l).map_or(1, |l| (l.align_bytes as u64 / 4).max(1))
    }

    /// The DMA path from level `from` to level `to`.
    pub fn path(&self, from: usize, to: usize) -> Option<&DmaPath> {
        let (f, t) = (&self.levels.get(from)?.name, &self.levels.get(to)?.name);
        self.dma.iter().find(|p| &p.from == f && &p.to == t)
    }

    /// The levels a copy from `from` to `to` passes through (both ends included), fewest hops
    /// first; `None` when no chain of DMA paths connects them.
    pub fn route(&self, from: usize, to: usize) -> Option<Vec<usize>> {
        let n = self.levels.len();
        let mut prev = vec![usize::MAX; n];
        let mut queue = std::collections::VecDeque::from([from]);
        prev[from] = from;
        while let Some(l) = queue.pop_front() {
            if l == to {
                let mut path = vec![to];
                let mut at = to;
                while at != from {
                    at = prev[at];
                    path.push(at);
                }
                path.reverse();
                return Some(path);
            }
            for p in &self.dma {
                let (Some(f), Some(t)) = (self.level_index(&p.from), self.level_index(&p.to)) else { continue };
                if f == l && prev[t] == usize::MAX {
                    prev[t] = l;
                    queue.push_back(t);
                }
            }
        }
        None
    }

    /// The plain-data description that cost models read: levels from global memory to the
    /// vector unit's level along the DMA route (slowest first, so the last is where a fused
    /// kernel's intermediates stay), peaks and global-memory bandwidth over all cores.
    pub fn machine(&self) -> MachineDescription {
        let v = self.vector_level();
        let route = self.route(0, v).unwrap_or_else(|| vec![0, v]);
        let levels = route
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let next = route.get(i + 1).and_then(|&n| self.path(l, n));
                // Global memory feeds every core; a scratchpad, its own.
                let share = if l == 0 { self.cores as f64 } else { 1.0 };
                MemoryLevel {
                    name: self.levels[l].name.clone(),
                    capacity_bytes: self.levels[l].capacity_bytes,
                    bandwidth_gbps: next.map_or(0.0, |p| p.bytes_per_cycle * self.clock_ghz * share),
                    latency_cycles: next.map_or(0, |p| p.latency_cycles),
                    software_managed: l != 0,
                }
            })
            .collect();
        let cores = self.cores as f64;
        MachineDescription {
            name: format!("npu-{}", self.name),
            clock_ghz: self.clock_ghz,
            cores: self.cores,
            levels,
            vector_gflops: cores * self.lanes() as f64 * 2.0 * self.clock_ghz,
            vector_bits: self.vector.width_bytes * 8,
            vector_registers: 32,
            matrix_shape: self.matrix.as_ref().map_or(vec![], |m| vec![m.m, m.n, m.k]),
            matrix_gflops: self.matrix.as_ref().map_or(0.0, |m| cores * m.f32_rate() as f64 * 2.0 * self.clock_ghz),
            launch_us: self.launch_us,
            gpu: None,
        }
    }
}
