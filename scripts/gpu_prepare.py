"""Prepares a directory to carry to a GPU machine (see scripts/gpu_prepare.sh)."""

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

KILN = os.environ["KILN_BIN"]
DATA = Path(os.environ["KILN_ONNX_DATA"])
OUT = Path(sys.argv[1])
BUDGET = int(float(os.environ.get("GPU_PREPARE_BUDGET_MIB", "56")) * 2**20)
JOBS = int(os.environ.get("GPU_PREPARE_JOBS", "2"))
# The plan's element types (MLIR names) that kiln-gpu-run reads and writes as .npy.
NPY_DTYPES = {"f32", "f64", "f16", "i8", "i16", "i32", "i64", "ui8", "ui16", "ui32", "ui64", "i1"}


def size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def prepare(case: Path, dest: Path) -> dict:
    """Compiles one model for cuda into dest with its inputs and ref's outputs as .npy."""
    r = {"name": dest.name}
    c = subprocess.run([KILN, "compile", str(case / "model.onnx"), "--target", "cuda", "-o", str(dest)],
                       capture_output=True, text=True)
    if c.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        r["status"] = "compile_failed"
        r["why"] = (c.stderr.strip().splitlines() or ["?"])[-1][:300]
        return r
    plan = json.loads((dest / "plan.json").read_text())
    if not plan["runnable"]:
        shutil.rmtree(dest, ignore_errors=True)
        r["status"] = "not_runnable"
        r["why"] = (plan.get("why_not") or "")[:300]
        return r
    edges = [p["dtype"] for p in plan["inputs"] + plan["outputs"] if p["dtype"] not in NPY_DTYPES]
    if edges:
        shutil.rmtree(dest, ignore_errors=True)
        r["status"] = "edge_dtype"
        r["why"] = f"inputs or outputs of types .npy cannot hold: {sorted(set(edges))}"
        return r
    if not plan["launches"] and dest.parent.name == "node":
        # Host steps only: kept apart (node-host/), they check the runner, not the GPU.
        host = dest.parent.parent / "node-host" / dest.name
        shutil.rmtree(host, ignore_errors=True)
        dest.rename(host)
        dest = host
    # Kiln's manifest and the plan are enough to run: the per-kernel manifest stays for reading.
    data = case / "test_data_set_0"
    inputs = sorted(data.glob("input_*.pb"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
    if len(inputs) != len(plan["inputs"]):
        shutil.rmtree(dest, ignore_errors=True)
        r["status"] = "inputs_unbound"
        r["why"] = f"{len(inputs)} input files for {len(plan['inputs'])} graph inputs"
        return r
    for i, p in enumerate(inputs):
        t = onnx.TensorProto()
        t.ParseFromString(p.read_bytes())
        a = numpy_helper.to_array(t)
        np.save(dest / f"input_{i}.npy", np.array(a, order="C"))  # keeps 0-d arrays 0-d
    ref = dest / "ref"
    c = subprocess.run([KILN, "run", str(case / "model.onnx"), "--target", "ref", "--output-dir", str(ref), "--npy"]
                       + [x for p in inputs for x in ("--input", str(p))], capture_output=True, text=True)
    outs = sorted(ref.glob("output_*.npy"), key=lambda p: int(re.findall(r"\d+", p.name)[-1])) if ref.exists() else []
    if c.returncode != 0 or len(outs) != len(plan["outputs"]):
        shutil.rmtree(dest, ignore_errors=True)
        r["status"] = "ref_failed"
        r["why"] = (c.stderr.strip().splitlines() or ["?"])[-1][:300]
        return r
    for i, p in enumerate(outs):
        p.rename(dest / f"expect_{i}.npy")
    shutil.rmtree(ref)
    r["status"] = "prepared" if plan["launches"] else "prepared_host_only"
    r["launches"] = len(plan["launches"])
    r["host_steps"] = len(plan.get("host_steps", []))
    r["bytes"] = size(dest)
    return r


def ptxas_check() -> dict:
    """Assembles every distinct prepared PTX file for sm_90 (the H100/H200 the device tool lends)
    with NVIDIA's ptxas where it is installed ($KILN_PTXAS, .venv's, or on the PATH)."""
    ptxas = os.environ.get("KILN_PTXAS") or shutil.which("ptxas")
    if not ptxas:
        venv = Path(sys.executable).parent.parent
        found = sorted(venv.glob("lib/python*/site-packages/nvidia/cuda_nvcc/bin/ptxas"))
        ptxas = str(found[0]) if found else None
    if not ptxas:
        return {"status": "NOT RUN: no ptxas"}
    seen, failed = set(), []
    for f in sorted(OUT.glob("*/*/*.ptx")):
        text = f.read_text()
        key = text.replace(f.stem, "")
        if key in seen:
            continue
        seen.add(key)
        c = subprocess.run([ptxas, "-arch=sm_90", str(f), "-o", os.devnull], capture_output=True, text=True)
        if c.returncode != 0:
            failed.append(f"{f}: {c.stderr.strip()[:300]}")
    return {"ptxas": ptxas, "arch": "sm_90", "distinct_modules": len(seen), "failed": failed}


def params_check() -> dict:
    """Every prepared launch passes as many 64-bit values as its PTX entry declares parameters
    (one memref descriptor per buffer: 3 + 2 * rank)."""
    checked, wrong = 0, []
    for plan_file in sorted(OUT.glob("*/*/plan.json")):
        plan = json.loads(plan_file.read_text())
        for l in plan["launches"]:
            ptx = (plan_file.parent / l["file"]).read_text()
            m = re.search(r"\.entry\s+" + re.escape(l["function"]) + r"\s*\((.*?)\)", ptx, re.S)
            declared = len(re.findall(r"\.param\b", m.group(1))) if m else -1
            passed = sum(3 + 2 * len(a["shape"]) for a in l["args"])
            checked += 1
            if declared != passed:
                wrong.append(f"{plan_file.parent.name} {l['kernel']}: PTX declares {declared}, the plan passes {passed}")
    return {"launches": checked, "wrong": wrong}


def main() -> None:
    for kind in ("node", "node-host", "cnn"):
        shutil.rmtree(OUT / kind, ignore_errors=True)
        (OUT / kind).mkdir(parents=True, exist_ok=True)
    cases = sorted(p for p in (DATA / "node").iterdir() if (p / "model.onnx").is_file())
    with ThreadPoolExecutor(JOBS) as pool:
        node = list(pool.map(lambda c: prepare(c, OUT / "node" / c.name), cases))
    # The light CNNs (random weights), smallest first, while the whole stays in budget.
    cnns = sorted((p for p in (DATA / "light-random").iterdir() if (p / "model.onnx").is_file()),
                  key=lambda p: size(p))
    cnn = []
    for c in cnns:
        need = size(c)
        if size(OUT) + need > BUDGET:
            cnn.append({"name": c.name, "status": "over_budget", "why": f"{need / 2**20:.1f} MiB of weights"})
            continue
        r = prepare(c, OUT / "cnn" / c.name)
        if r["status"] == "prepared" and size(OUT) > BUDGET:
            shutil.rmtree(OUT / "cnn" / c.name)
            r = {"name": c.name, "status": "over_budget", "why": "the compiled directory went over budget"}
        cnn.append(r)
    counts = {}
    for r in node:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    reasons = {}
    for r in node:
        if r["status"] == "not_runnable":
            why = r["why"]
            key = ("string tensors" if "no string tensors" in why else
                   "symbolic shapes" if "needs static shapes" in why else
                   re.sub(r"^host step \S+ \(node '[^']*', ", "host step (", why)[:80])
            reasons[key] = reasons.get(key, 0) + 1
    summary = {
        "ptxas": ptxas_check(),
        "params": params_check(),
        "node_tests": len(node),
        "node_status": counts,
        "node_with_host_steps": sum(1 for r in node if r.get("host_steps")),
        "not_runnable_reasons": reasons,
        "cnn": cnn,
        "bytes": size(OUT),
        "cases": node + cnn,
    }
    (OUT / "prepare.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "cases"}, indent=1))


main()
