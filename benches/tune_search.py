#!/usr/bin/env python3
"""Autotuning figures: `kiln tune` with the learned and the random strategy, side by side.

For each (model, target) below, and each seed, both strategies tune from an empty database
(`kiln tune --json --strategy S --seed N --trials T`). Written to --out (benches/TUNING.md):

1. Tuned vs default, per kernel and for the whole model (the learned run of seed 0): cpu time
   (ms; a kernel alone, warm median; one thread: the thread's CPU time), npu simulated cycles,
   rvv estimated cycles (static, not measured).
2. Search efficiency, over the workloads where tuning found something (random's final best
   below the default): how many trials the learned search needs to reach the best that random
   search has after all T trials, against T; and the mean best-so-far (relative to the
   default) after 1, 2, 4, ... trials for each strategy.
   - raw: best-so-far as the runs saw it: the cost of the kernel each would choose then (cpu:
     its median over its measurements; a candidate close to the best so far is measured again
     with it, interleaved, `kiln tune --confirm-rounds`).
   - re-measured (cpu): the value at trial t is the cost of the kernel the strategy would
     choose at t (its argmin so far), measured again for all strategies and seeds together
     (`kiln tune --remeasure`: per workload, all those kernels in interleaved rounds, the
     median over rounds), so that the min of noisy measurements (the winner's curse) favours
     neither strategy.
3. Static estimate vs measured cost: Spearman's rho per (workload, run) over the candidates
   measured, for the estimate with cache traffic and for its instructions alone.

Usage: tune_search.py [--kiln target/release/kiln] [--data target/onnx-data] [--trials 16]
                      [--seeds 3] [--cpu-seeds 3] [--out benches/TUNING.md] [--quick]
                      [--targets npu,cpu,rvv] [--cases gpt2-davinci,gpt2-cpu,...]
                      [--cpu-threads 1] [--rounds 5]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [
    # (id, label, model path under DATA, target, extra flags)
    ("gpt2-davinci", "GPT-2 block", "transformers/gpt2_block/model.onnx", "npu", ["--npu-preset", "davinci"]),
    ("gpt2-mlu", "GPT-2 block", "transformers/gpt2_block/model.onnx", "npu", ["--npu-preset", "mlu"]),
    ("gpt2-sunway", "GPT-2 block", "transformers/gpt2_block/model.onnx", "npu", ["--npu-preset", "sunway"]),
    ("squeezenet-davinci", "SqueezeNet", "light-random/light_squeezenet/model.onnx", "npu", ["--npu-preset", "davinci"]),
    ("gpt2-cpu", "GPT-2 block", "transformers/gpt2_block/model.onnx", "cpu", ["--threads", "2"]),
    ("resnet50-cpu", "ResNet-50", "light-random/light_resnet50/model.onnx", "cpu", ["--threads", "2"]),
    ("gpt2-rvv", "GPT-2 block", "transformers/gpt2_block/model.onnx", "rvv", []),
]


def run(kiln, path, target, flags, strategy, seed, trials, bench_model):
    with tempfile.TemporaryDirectory() as d:
        db = os.path.join(d, "db.jsonl")
        cmd = [kiln, "tune", path, "--target", target, *flags, "--tuning-db", db, "--trials", str(trials),
               "--strategy", strategy, "--seed", str(seed), "--json"]
        if not bench_model:
            cmd.append("--no-model-bench")
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}\n{out.stderr}")
        r = json.loads(out.stdout)
        r["wall_s"] = time.time() - t0
        return r


def chosen(k, t):
    """Index of the trial whose kernel a run would choose after its first t trials: what the
    run reports (`chosen`: the cheapest by the median of its measurements, confirmations
    included), else (older reports) the min of the single measurements so far."""
    if "chosen" in k:
        c = k["chosen"][:t]
        return c[-1] if c else None
    best = None
    for i, c in enumerate(k.get("costs", [])[:t]):
        if c is not None and (best is None or c < k["costs"][best]):
            best = i
    return best


def repeats(r):
    """`, N of them repeats`: measurements repeated to confirm a candidate (cpu)."""
    n = sum(k.get("repeats", 0) for k in r["kernels"])
    return f", {n} of them repeats to confirm candidates" if n else ""


def remeasure(kiln, path, target, flags, runs, trials, rounds):
    """Re-measures, together, every kernel any run would choose at any trial (and each
    workload's default); returns {(workload, knobs json): cost}."""
    want = {}
    for rs in runs.values():
        for r in rs:
            for k in r["kernels"]:
                if k["skipped"] or not k.get("trial_knobs"):
                    continue
                idx = {chosen(k, t) for t in range(1, trials + 1)} | {0}
                for i in idx:
                    if i is not None:
                        kn = k["trial_knobs"][i]
                        want[(k["workload"], json.dumps(kn, sort_keys=True))] = kn
    keys = list(want)
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "want.json")
        with open(f, "w") as fh:
            json.dump([{"workload": w, "knobs": want[(w, kj)]} for w, kj in keys], fh)
        cmd = [kiln, "tune", path, "--target", target, *flags, "--tuning-db", os.path.join(d, "db.jsonl"),
               "--remeasure", f, "--rounds", str(rounds)]
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}\n{out.stderr}")
        res = json.loads(out.stdout)
    print(f"  re-measured {len(keys)} kernels x {rounds} rounds in {time.time() - t0:.0f} s", file=sys.stderr)
    return {k: c for k, c in zip(keys, res["costs"])}, res.get("clock")


def honest(k, rem, trials):
    """The re-measured cost of the kernel the run would choose at each trial 1..T (padded)."""
    out = []
    for t in range(1, trials + 1):
        i = chosen(k, t)
        if i is None:
            out.append(None)
            continue
        out.append(rem.get((k["workload"], json.dumps(k["trial_knobs"][i], sort_keys=True))))
    last = next((x for x in reversed(out) if x is not None), None)
    return [x if x is not None else last for x in out]


def curve(k, trials):
    """Best-so-far relative to the default, padded to `trials` (a small space ends early)."""
    b = [x / k["default"] for x in k["best_so_far"]]
    if not b:
        return [1.0] * trials
    return (b + [b[-1]] * trials)[:trials]


def spearman(xs, ys):
    """Spearman's rank correlation (average ranks for ties); None when a side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return None if sx == 0 or sy == 0 else sxy / (sx * sy)


def estimate_quality(runs, field="estimates", kernel_filter=None):
    """Per workload and run, Spearman's rho between the static estimate (`field`: with cache
    traffic, or `estimates_compute`: instructions alone) and the measured cost of the
    candidates measured (at least 4 with both)."""
    rhos = []
    for r in runs:
        for k in r["kernels"]:
            if kernel_filter and not kernel_filter(k):
                continue
            pairs = [(e, c) for c, e in zip(k.get("costs", []), k.get(field, [])) if c is not None and e is not None]
            if len(pairs) >= 4:
                rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
                if rho is not None:
                    rhos.append(rho)
    return rhos


def rho_text(rhos):
    if not rhos:
        return "-"
    return f"{statistics.median(rhos):.2f} (min {min(rhos):.2f}, n {len(rhos)})"


def reach_table(target, T, runs, seeds, rem=None):
    """Per (workload, seed) where random search found a gain (raw), the trial at which the
    learned search reached random's final best. `rem`: judge on re-measured costs of the
    kernels each would choose (absolute; within 3%); else on the runs' own best-so-far
    (relative to each run's default; cpu within 3%, npu/rvv exact)."""
    tol = 1.0001 if target != "cpu" else 1.03
    reach, curves = [], {"learned": [], "random": []}
    for seed in range(seeds):
        L = {k["workload"]: k for k in runs["learned"][seed]["kernels"] if k["default"]}
        R = {k["workload"]: k for k in runs["random"][seed]["kernels"] if k["default"]}
        for w, rk in R.items():
            lk = L.get(w)
            if not lk or not rk["best_so_far"] or rk["best_so_far"][-1] >= rk["default"] * 0.999:
                continue  # tuning found nothing here: no search to compare
            if rem is None:
                target_best = rk["best_so_far"][-1] / rk["default"]
                lc = [b / lk["default"] for b in lk["best_so_far"]]
                rc = [b / rk["default"] for b in rk["best_so_far"]]
            else:
                hl, hr = honest(lk, rem, T), honest(rk, rem, T)
                d = rem.get((w, json.dumps(lk["trial_knobs"][0], sort_keys=True)))
                if None in hl or None in hr or not d:
                    continue
                target_best = hr[T - 1] / d
                lc, rc = [x / d for x in hl], [x / d for x in hr]
            n = next((i + 1 for i, b in enumerate(lc) if b <= target_best * tol), None)
            reach.append((n, T, rk["kernel"], seed, target_best, lc[-1] if lc else 1.0))
            curves["learned"].append((lc + [lc[-1]] * T)[:T] if lc else [1.0] * T)
            curves["random"].append((rc + [rc[-1]] * T)[:T] if rc else [1.0] * T)
    return reach, curves


def reach_lines(reach, curves, T, what):
    within = sum(1 for n, t, *_ in reach if n is not None and n <= t / 2)
    ns = [n if n is not None else float("inf") for n, *_ in reach]
    lines = [f"**{what}**: the learned search reached random search's final best within T/2 = {T // 2} trials in "
             f"**{within} of {len(reach)}** (workload, seed) pairs; median trials to reach it: "
             f"{statistics.median(ns) if ns else '-'}.", "",
             "| kernel | random's best / default | learned's best / default | learned reaches it at trial | met |",
             "| --- | --- | --- | --- | ---: |"]
    by_kernel = {}
    for n, t, kname, seed, rb, lb in reach:
        by_kernel.setdefault(kname, []).append((n, t, seed, rb, lb))
    for kname, rows in by_kernel.items():
        met = sum(1 for n, t, *_ in rows if n is not None and n <= t / 2)
        cell = lambda f: ", ".join(f"{seed}: {f(n, rb, lb)}" for n, t, seed, rb, lb in rows)
        lines.append(f"| {kname} | {cell(lambda n, rb, lb: f'{rb:.3f}')} | {cell(lambda n, rb, lb: f'{lb:.3f}')} | "
                     f"{cell(lambda n, rb, lb: n if n else 'never')} | "
                     f"{met} / {len(rows)}{'' if met == len(rows) else ' **not met**'} |")
    ts = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= T]
    lines += ["", f"Mean best-so-far relative to the default ({what}):", "",
              "| trials | " + " | ".join(str(t) for t in ts) + " |", "| --- | " + " | ".join("---:" for t in ts) + " |"]
    for s in ("learned", "random"):
        if curves[s]:
            row = [statistics.mean(c[t - 1] for c in curves[s]) for t in ts]
            lines.append(f"| {s} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return lines, within, ns


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--data", default=os.environ.get("KILN_ONNX_DATA", "target/onnx-data"))
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--cpu-seeds", type=int, default=3)
    ap.add_argument("--out", default="benches/TUNING.md")
    ap.add_argument("--quick", action="store_true", help="npu cases only")
    ap.add_argument("--targets", default="npu,cpu,rvv", help="comma-separated targets to run")
    ap.add_argument("--cases", default="", help="comma-separated case ids (" + ", ".join(c[0] for c in CASES) + ")")
    ap.add_argument("--append", action="store_true", help="append to --out instead of rewriting it")
    ap.add_argument("--raw", default="", help="also write every run's report here (JSON)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="threads of the cpu kernels (--threads)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the cpu re-measurement")
    args = ap.parse_args()
    T = args.trials
    lines = [] if args.append else [
        "# Autotuning: tuned vs default, learned vs random search",
        "",
        f"`benches/tune_search.py --trials {T} --seeds {args.seeds} --cpu-seeds {args.cpu_seeds}`, "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores.",
        "",
    ]
    summary = []
    raw = {}
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in [x[0] for x in CASES]]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {[x[0] for x in CASES]}")
    for case, label, rel, target, flags in CASES:
        if (args.quick and target != "npu") or target not in args.targets.split(","):
            continue
        if cases and case not in cases:
            continue
        if target == "cpu":
            flags = ["--threads", str(args.cpu_threads)]
        path = os.path.join(args.data, rel)
        preset = flags[1] if target == "npu" else "host" if target == "cpu" else "VLEN 256"
        name = f"{label} on {target} ({preset})"
        load0 = os.getloadavg()
        print(name, file=sys.stderr)
        seeds = args.seeds if target != "cpu" else args.cpu_seeds
        runs = {s: [run(args.kiln, path, target, flags, s, seed, T, s == "learned" and seed == 0 and target != "rvv")
                    for seed in range(seeds)] for s in ("learned", "random")}
        rem, clock = (None, None)
        if target == "cpu":
            rem, clock = remeasure(args.kiln, path, target, flags, runs, T, args.rounds)
        load1 = os.getloadavg()
        raw[case] = {"runs": runs, "remeasured": {f"{w} {k}": c for (w, k), c in (rem or {}).items()}}
        main_run = runs["learned"][0]
        unit = {"cpu": "ms", "npu": "cycles", "rvv": "estimated cycles"}[target]
        lines += [f"## {name}", "",
                  f"Load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end. "
                  f"Tuning took {main_run['wall_s']:.0f} s for {main_run['measured']} measurements (learned, seed 0"
                  f"{repeats(main_run)}); random search, seed 0: {runs['random'][0]['wall_s']:.0f} s for "
                  f"{runs['random'][0]['measured']}{repeats(runs['random'][0])}."
                  + (f" cpu clock: {main_run.get('clock')}; re-measurement: {args.rounds} interleaved rounds." if target == "cpu" else "")
                  + (" Costs are static estimates of the generated code (not measurements); each workload's best "
                     "was checked under qemu against the reference." if target == "rvv" else ""), ""]
        fmt = (lambda v: f"{v:.4f}") if target == "cpu" else (lambda v: f"{v:,.0f}")
        if target == "cpu":
            lines += [f"Per kernel ({unit}), learned seed 0: raw = as the run saw it (the default's and the chosen "
                      "kernel's median of their measurements); re-measured = the same two kernels measured again "
                      "together.", "",
                      "| kernel | × | trials | raw default | raw tuned | raw speedup | re-measured default | re-measured tuned | re-measured speedup |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        else:
            lines += [f"| kernel | × | trials | default ({unit}) | tuned | speedup |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        wsum = [0.0, 0.0]
        for k in main_run["kernels"]:
            if k["skipped"] or k["default"] is None or k["best"] is None:
                lines.append(f"| {k['kernel']} | {k['instances']} | - | not tuned: {k['skipped']} | | |")
                continue
            row = f"| {k['kernel']} | {k['instances']} | {k['trials']} | {fmt(k['default'])} | {fmt(k['best'])} | {k['default'] / k['best']:.2f}× |"
            if rem is not None:
                h = honest(k, rem, T)
                d = rem.get((k["workload"], json.dumps(k["trial_knobs"][0], sort_keys=True)))
                if d and h[-1]:
                    row += f" {fmt(d)} | {fmt(h[-1])} | {d / h[-1]:.2f}× |"
                    wsum[0] += d * k["instances"]
                    wsum[1] += h[-1] * k["instances"]
                else:
                    row += " - | - | - |"
            lines.append(row)
        m = main_run.get("model")
        if m and target != "rvv":
            lines += ["", f"Whole model (run, median of 20+ runs, best of two rounds): default {fmt(m['default'])}, "
                          f"tuned {fmt(m['tuned'])} {m['unit']}: **{m['default'] / m['tuned']:.2f}×**."]
        if wsum[1] > 0:
            lines += [f"Sum of the kernels × instances, re-measured: default {wsum[0]:.4f}, tuned {wsum[1]:.4f} ms: "
                      f"**{wsum[0] / wsum[1]:.2f}×**."]
        if target == "rvv":
            d = sum(k["default"] * k["instances"] for k in main_run["kernels"] if k["default"])
            b = sum((k["best"] or k["default"]) * k["instances"] for k in main_run["kernels"] if k["default"])
            if b:
                lines += ["", f"Whole model (the kernels' estimated cycles × instances): default {d:,.0f}, tuned {b:,.0f}: "
                              f"**{d / b:.2f}×** (an estimate)."]
        lines += [""]
        reach, curves = reach_table(target, T, runs, seeds)
        if not reach:
            lines += ["Search: no workload where random search found a gain over the default.", ""]
            continue
        what = ("raw (as the runs saw it: each run's chosen kernel, the median of its measurements)"
                if target == "cpu" else "exact (deterministic costs)")
        l1, within, ns = reach_lines(reach, curves, T, what)
        lines += [f"Search: {len(reach)} (workload, seed) pairs where random search found a gain.", ""] + l1 + [""]
        row = {"name": name, "raw": (within, len(reach), statistics.median(ns))}
        if rem is not None:
            reach2, curves2 = reach_table(target, T, runs, seeds, rem)
            l2, within2, ns2 = reach_lines(reach2, curves2, T, "re-measured (the chosen kernels measured again together, within 3%)")
            lines += l2 + [""]
            row["rem"] = (within2, len(reach2), statistics.median(ns2) if ns2 else None)
        allruns = runs["learned"] + runs["random"]
        rho_after = estimate_quality(allruns)
        rho_before = estimate_quality(allruns, "estimates_compute")
        mm = lambda k: "matmul" in k["kernel"] or (k["kernel"] in ("k5_fused", "k8_fused", "k9_fused") and "GPT" in label)
        lines += ["Static estimate vs measured cost, Spearman's ρ per (workload, run) over the candidates measured "
                  "(both strategies): median (min, count).", "",
                  "| estimate | all workloads | MatMul-like workloads |", "| --- | --- | --- |",
                  f"| instructions only (before) | {rho_text(rho_before)} | {rho_text(estimate_quality(allruns, 'estimates_compute', mm))} |",
                  f"| with cache traffic (now) | {rho_text(rho_after)} | {rho_text(estimate_quality(allruns, 'estimates', mm))} |", ""]
        row["rho"] = (statistics.median(rho_before) if rho_before else None, statistics.median(rho_after) if rho_after else None)
        summary.append(row)
    if summary:
        lines += [f"## Summary ({', '.join(c for c in cases) or 'all cases'})", "",
                  "| case | raw: reach ≤ T/2 | raw median trials | re-measured: reach ≤ T/2 | re-measured median trials | ρ before → after |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        f2 = lambda x: "-" if x is None else f"{x:.2f}"
        for r in summary:
            rr = r.get("rem")
            lines.append(f"| {r['name']} | {r['raw'][0]} / {r['raw'][1]} | {r['raw'][2]} | "
                         f"{f'{rr[0]} / {rr[1]}' if rr else '-'} | {rr[2] if rr else '-'} | "
                         f"{f2(r['rho'][0])} → {f2(r['rho'][1])} |")
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump(raw, f)
    with open(args.out, "a" if args.append else "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
