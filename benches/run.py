#!/usr/bin/env python3
"""kiln side by side with onnxruntime: one markdown table (CLI.md, "Benchmark shapes").

Models: the synthetic ones of benches/models.py (in --models-dir), the 9 randomized `light`
CNNs (DATA/light-random/*/model.onnx) and the transformer blocks (DATA/transformers/*/model.onnx;
symbolic dims bound with --dim, default B=1, S=128).

For each model, in this one script run:
- seeded random inputs (numpy default_rng(0), N(0,1) for floats) of the model's input shapes are
  written as .npy files and given to both runtimes: `kiln bench --input` and onnxruntime get the
  same data and shapes (checked against `kiln inspect --json` and onnxruntime's input metadata);
- `kiln inspect MODEL --target T --json` gives the kernel count;
- `kiln bench MODEL --target T --json --threads N --iters I` gives compile and median time; a
  non-zero exit becomes a row with the first line of kiln's error;
- onnxruntime (CPU provider, intra-op threads N, inter-op 1, sequential, all graph
  optimizations) is warmed up, then run at least I times and for at least kiln's measured wall
  time (I x kiln's median); its median is reported;
- both sides run in alternating rounds (--rounds, default 3; one round for models kiln takes
  over 5 s to compile) and each keeps its best median, so that a transient load on the machine
  does not land on one side only.

Memory-bound models (elementwise and normalization kernels) also get kiln's achieved bandwidth:
(bytes of inputs + outputs + weights) / median, and its share of the machine's copy bandwidth
(numpy copy of a 256 MiB array, best of several, read + write bytes counted).

Usage: run.py [--kiln PATH] [--target T] [--threads N] [--filter SUBSTR] [--rounds R] [--quick] [--out FILE]
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime as ort

import models as synthetic  # benches/models.py: the synthetic models' order and which are memory-bound

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_KEYS = {"target", "compile_ms", "median_ms", "min_ms", "iters", "threads", "peak_memory_bytes"}
ERROR_CHARS = 120


@dataclass
class Model:
    name: str
    path: str
    group: str  # "kernel", "cnn" or "transformer"
    bound: str  # "mem" or "compute"


@dataclass
class Result:
    model: Model
    kernels: Optional[int] = None
    kiln: Optional[dict] = None
    kiln_error: Optional[str] = None
    ort_ms: Optional[float] = None
    ort_runs: int = 0
    ort_error: Optional[str] = None
    bytes_moved: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    @property
    def ratio(self) -> Optional[float]:
        if self.kiln and self.ort_ms:
            return self.kiln["median_ms"] / self.ort_ms
        return None

    @property
    def gbps(self) -> Optional[float]:
        if self.kiln and self.bytes_moved and self.model.bound == "mem":
            return self.bytes_moved / (self.kiln["median_ms"] * 1e-3) / 1e9
        return None


# ---------------------------------------------------------------------------------------------
# Models and inputs


def discover(models_dir: str, data_dir: str, substr: str) -> List[Model]:
    """Synthetic models, then the light-random CNNs, then the transformer blocks, each sorted."""
    found: List[Model] = []
    if os.path.isdir(models_dir):
        names = [f[: -len(".onnx")] for f in os.listdir(models_dir) if f.endswith(".onnx")]
        order = list(synthetic.MODELS)
        names.sort(key=lambda n: (order.index(n) if n in order else len(order), n))
        for name in names:
            bound = "mem" if name in synthetic.MEMORY_BOUND else "compute"
            found.append(Model(name, os.path.join(models_dir, name + ".onnx"), "kernel", bound))
    for group, sub in (("cnn", "light-random"), ("transformer", "transformers")):
        root = os.path.join(data_dir, sub)
        if not os.path.isdir(root):
            continue
        for d in sorted(os.listdir(root)):
            path = os.path.join(root, d, "model.onnx")
            if os.path.isfile(path):
                found.append(Model(d, path, group, "compute"))
    return [m for m in found if substr in m.name]


def graph_inputs(model: onnx.ModelProto) -> List[onnx.ValueInfoProto]:
    """The inputs that are not initializers (IR-v3 models list weights among the inputs)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def resolve_shape(vi: onnx.ValueInfoProto, dims: Dict[str, int]) -> List[int]:
    shape = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            shape.append(d.dim_value)
        elif d.dim_param in dims:
            shape.append(dims[d.dim_param])
        else:
            raise ValueError(f"input '{vi.name}': symbolic dim '{d.dim_param or '?'}' has no --dim")
    return shape


def make_inputs(model: onnx.ModelProto, dims: Dict[str, int]) -> List[Tuple[str, np.ndarray]]:
    """Seeded random data (default_rng(0)) for each graph input, in graph order."""
    rng = np.random.default_rng(0)
    feeds = []
    for vi in graph_inputs(model):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = resolve_shape(vi, dims)
        if np.issubdtype(dtype, np.floating):
            arr = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            arr = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            arr = rng.integers(0, 4, shape).astype(dtype)
        feeds.append((vi.name, arr))
    return feeds


def used_dims(model: onnx.ModelProto, dims: Dict[str, int]) -> Dict[str, int]:
    names = {d.dim_param for vi in graph_inputs(model) for d in vi.type.tensor_type.shape.dim if d.dim_param}
    return {k: v for k, v in dims.items() if k in names}


def initializer_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        n = math.prod(t.dims)
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def shapes_match(declared: Sequence, actual: Sequence[int]) -> bool:
    """A declared shape (ints, '?' or symbolic names) against a concrete one."""
    if len(declared) != len(actual):
        return False
    return all(not isinstance(d, int) or d == a for d, a in zip(declared, actual))


def kiln_type_shape(ty: str) -> List:
    """`tensor<1x?x256xf32, ["S"]>` -> [1, '?', 256]."""
    body = ty[ty.index("<") + 1 :].split(",")[0].rstrip(">")
    parts = body.split("x")[:-1]  # the last part is the element type
    return [int(p) if p.isdigit() else p for p in parts]


# ---------------------------------------------------------------------------------------------
# kiln


def first_line(text: str) -> str:
    """The first non-empty line, without a leading `error: `."""
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line[len("error: "):] if line.startswith("error: ") else line
    return "(no message)"


def kiln_inspect(kiln: str, path: str, target: str) -> dict:
    p = subprocess.run([kiln, "inspect", path, "--target", target, "--json"], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(first_line(p.stderr))
    return json.loads(p.stdout)


def kiln_bench(kiln: str, path: str, target: str, threads: int, iters: int, input_files: List[str],
               dims: Dict[str, int], timeout: float) -> dict:
    """Runs `kiln bench --json`; returns its parsed, checked object or raises with kiln's error."""
    cmd = [kiln, "bench", path, "--target", target, "--json", "--threads", str(threads), "--iters", str(iters)]
    for f in input_files:
        cmd += ["--input", f]
    for k, v in dims.items():
        cmd += ["--dim", f"{k}={v}"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout:.0f} s") from None
    if p.returncode != 0:
        code = "" if p.returncode == 1 else f"exit {p.returncode}: "  # 1: unsupported model (CLI.md)
        raise RuntimeError(code + first_line(p.stderr))
    try:
        obj = json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise RuntimeError(f"bench --json stdout is not one JSON object ({e}): {p.stdout[:80]!r}") from None
    missing = BENCH_KEYS - set(obj)
    if missing:
        raise RuntimeError(f"bench --json lacks {sorted(missing)}")
    for k in ("compile_ms", "median_ms", "min_ms", "peak_memory_bytes"):
        if not isinstance(obj[k], (int, float)) or obj[k] < 0:
            raise RuntimeError(f"bench --json: bad {k} {obj[k]!r}")
    if obj["target"] != target:
        raise RuntimeError(f"bench --json: target {obj['target']!r}, asked {target!r}")
    if obj["min_ms"] > obj["median_ms"]:
        raise RuntimeError(f"bench --json: min_ms {obj['min_ms']} > median_ms {obj['median_ms']}")
    return obj


# ---------------------------------------------------------------------------------------------
# onnxruntime


def ort_session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_bench(sess: ort.InferenceSession, feeds: Dict[str, np.ndarray], min_runs: int, budget_s: float,
              warmup: int) -> Tuple[float, int, List[np.ndarray]]:
    """Median ms over at least min_runs runs and budget_s seconds (at most 10,000 runs)."""
    outs = None
    for _ in range(max(warmup, 1)):
        outs = sess.run(None, feeds)
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 10_000):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times), outs


# ---------------------------------------------------------------------------------------------
# Machine


def copy_bandwidth_gbps(mib: int = 256, repeats: int = 7) -> float:
    """Best-of-`repeats` numpy copy of a `mib` MiB array, read + write bytes per second."""
    src = np.ones(mib * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# One model


def bench_model(m: Model, args, dims: Dict[str, int], tmp: str) -> Result:
    r = Result(m)
    proto = onnx.load(m.path, load_external_data=False)
    try:
        feeds = make_inputs(proto, dims)
    except ValueError as e:
        r.kiln_error = r.ort_error = str(e)
        return r
    bind = used_dims(proto, dims)
    files = []
    for i, (_, arr) in enumerate(feeds):
        f = os.path.join(tmp, f"{m.name}_input_{i}.npy")
        np.save(f, arr)
        files.append(f)

    try:
        info = kiln_inspect(args.kiln, m.path, args.target)
        r.kernels = info.get("kernels")
        declared = [(p["name"], kiln_type_shape(p["type"])) for p in info.get("inputs", [])]
        actual = [(n, list(a.shape)) for n, a in feeds]
        if len(declared) != len(actual) or not all(
                dn == an and shapes_match(ds, ashape) for (dn, ds), (an, ashape) in zip(declared, actual)):
            r.notes.append(f"input mismatch: kiln {declared} vs fed {actual}")
    except (RuntimeError, json.JSONDecodeError, subprocess.TimeoutExpired) as e:
        r.notes.append(f"inspect: {e}")

    # Rounds alternate kiln and ORT; each side keeps its best median, so that a transient load
    # on the machine (2 shared cores) hits neither side alone. Models that take kiln long to
    # compile get one round.
    sess = None
    for round_ in range(args.rounds):
        if round_ > 0 and (r.kiln_error or r.ort_error or (r.kiln and r.kiln["compile_ms"] > 5000)):
            break
        try:
            k = kiln_bench(args.kiln, m.path, args.target, args.threads, args.iters, files, bind, args.timeout)
            if k["threads"] != args.threads:
                r.notes.append(f"kiln reports {k['threads']} threads")
            if r.kiln is None or k["median_ms"] < r.kiln["median_ms"]:
                r.kiln = k
        except RuntimeError as e:
            r.kiln_error = str(e)
        try:
            if sess is None:
                sess = ort_session(m.path, args.threads)
                for meta, (name, arr) in zip(sess.get_inputs(), feeds):
                    if meta.name != name or not shapes_match(meta.shape, arr.shape):
                        raise RuntimeError(f"ORT input {meta.name} {meta.shape} vs fed {name} {list(arr.shape)}")
            budget = r.kiln["median_ms"] * r.kiln["iters"] * 1e-3 if r.kiln else 0.0
            ms, runs, outs = ort_bench(sess, dict(feeds), args.iters, budget, args.warmup)
            if r.ort_ms is None or ms < r.ort_ms:
                r.ort_ms, r.ort_runs = ms, runs
            r.bytes_moved = sum(a.nbytes for _, a in feeds) + sum(o.nbytes for o in outs) + initializer_bytes(proto)
        except Exception as e:  # onnxruntime raises its own exception types
            r.ort_error = first_line(str(e))
    r.notes = sorted(set(r.notes))
    return r


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v: Optional[float], spec: str = ".3f") -> str:
    return "—" if v is None else format(v, spec)


def cell(text: str) -> str:
    text = text.replace("|", "\\|")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


def geomean(xs: List[float]) -> Optional[float]:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def render(results: List[Result], args, copy_bw: float, started: str) -> str:
    lines = [
        "# kiln vs onnxruntime",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}",
        f"- date: {started}; kiln git rev {git_rev()} (`{os.path.relpath(args.kiln, REPO)}`)",
        f"- target `{args.target}`, {args.threads} threads, kiln `--iters {args.iters}`, best of {args.rounds} alternating rounds per side; onnxruntime "
        f"{ort.__version__} (CPU provider, ORT_ENABLE_ALL, intra-op {args.threads}, inter-op 1), numpy {np.__version__}",
        f"- copy bandwidth (numpy, 256 MiB, read + write): {copy_bw:.1f} GB/s",
        "",
        "| model | bound | kiln compile ms | kiln median ms | ORT median ms | kiln/ORT | GB/s | % copy bw | kiln kernels | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        k = r.kiln or {}
        gbps = r.gbps
        notes = []
        if r.kiln_error:
            notes.append(f"kiln: {r.kiln_error}")
        if r.ort_error:
            notes.append(f"ORT: {r.ort_error}")
        notes += r.notes
        lines.append("| " + " | ".join([
            r.model.name,
            r.model.bound,
            fmt(k.get("compile_ms"), ".1f"),
            fmt(k.get("median_ms")),
            fmt(r.ort_ms),
            fmt(r.ratio, ".2f"),
            fmt(gbps, ".1f"),
            fmt(None if gbps is None else 100 * gbps / copy_bw, ".0f"),
            "—" if r.kernels is None else str(r.kernels),
            cell("; ".join(notes)),
        ]) + " |")
    cnn = [r for r in results if r.model.group == "cnn"]
    ratios = [r.ratio for r in cnn if r.ratio]
    gm = geomean(ratios)
    lines += [
        "",
        f"**Geometric mean kiln/ORT over the light CNNs: {fmt(gm, '.2f')}** "
        f"({len(ratios)} of {len(cnn)} CNNs ran on both).",
        "",
        "kiln/ORT below 1 means kiln is faster. GB/s = (inputs + outputs + weights bytes) / kiln median, for "
        "memory-bound (`mem`) models only; % copy bw compares it with the copy bandwidth above. Inputs fit in "
        "the caches, so more than 100% is possible. Notes hold the first line of kiln's error, truncated.",
        "",
    ]
    return "\n".join(lines)


def parse_dims(items: List[str]) -> Dict[str, int]:
    dims = {"B": 1, "S": 128}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--dim wants NAME=N, got {item!r}")
        dims[name] = int(value)
    return dims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=os.path.join(REPO, "target/release/kiln"), help="kiln binary")
    ap.add_argument("--target", default="cpu", help="kiln target (default cpu)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both (default: all cores)")
    ap.add_argument("--iters", type=int, help="timed runs (default 30, 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="few iterations, for a smoke test")
    ap.add_argument("--rounds", type=int, help="alternating kiln/ORT rounds, best median each (default 3, 1 with --quick)")
    ap.add_argument("--filter", default="", metavar="SUBSTR", help="only models whose name contains SUBSTR")
    ap.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="symbolic dims (default B=1, S=128)")
    ap.add_argument("--models-dir", default=os.path.join(REPO, "target/bench-models"), help="benches/models.py output")
    ap.add_argument("--data-dir", default=os.path.join(REPO, "target/onnx-data"), help="scripts/setup.sh output")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per kiln bench call")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args()
    args.iters = args.iters or (3 if args.quick else 30)
    args.warmup = 1 if args.quick else 3
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.kiln = os.path.abspath(args.kiln)
    if not os.access(args.kiln, os.X_OK):
        raise SystemExit(f"no kiln binary at {args.kiln} (cargo build --release -p kiln, or --kiln PATH)")
    dims = parse_dims(args.dim)

    models = discover(args.models_dir, args.data_dir, args.filter)
    if not models:
        raise SystemExit(f"no models in {args.models_dir} or {args.data_dir} (filter {args.filter!r})")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    copy_bw = copy_bandwidth_gbps(repeats=3 if args.quick else 7)
    print(f"copy bandwidth {copy_bw:.1f} GB/s; {len(models)} models", file=sys.stderr)

    results = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for m in models:
            r = bench_model(m, args, dims, tmp)
            status = r.kiln_error or f"kiln {r.kiln['median_ms']:.3f} ms"
            print(f"{m.name}: {cell(status)} | ORT {fmt(r.ort_ms)} ms", file=sys.stderr)
            results.append(r)

    table = render(results, args, copy_bw, started)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
