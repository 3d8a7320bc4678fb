#!/usr/bin/env python3
"""dlc against JAX/XLA on the reference workloads, in one run on one machine.

For every workload (mlp, lenet, vgg, lstm, gru, transformer, gemm at 512 and
1024) this runs `dlc bench --json` (compile, forward and, where the model has
a loss, the training step), then `anchors.py` (the same math in JAX/XLA at
the same sizes, see ../shared/bench/workloads/README.md), and prints one
markdown table of the two with the ratio dlc/XLA (above 1: dlc is slower).

Both sides run one after the other, never at the same time, with the same
thread count, and with the same timing method: warm-up steps, then a median
over a window of about 1.5 s (0.1 s with --quick), as anchors.py times XLA.
The machine this was written on is a shared VM whose speed drifts by up to
2x from minute to minute, for both sides alike; so the two sides alternate
per workload (dlc, XLA, dlc, XLA, ... for --rounds rounds), each figure is
the median over the rounds, and the ratio sets medians measured in the same
minutes against each other. The spread of the per-round ratios is printed
too. Columns:
  * compile: source to runnable, as `dlc bench` reports it (parsing,
    elaboration and, for the step it measures, autodiff, passes and code
    generation): for a model with a loss that is the training step, so it
    is set against XLA's compile time of the training step; for gemm,
    against XLA's compile time of the forward function;
  * fwd / train: median latency of one forward pass / one training step
    (sgd, lr=0.01, momentum=0.9) after a warm-up;
  * GFLOP/s: gemm only, 2*M*K*P / forward time; dlc's also as a share of
    the f32x4 FMA peak of its threads' cores, which `dlc bench` measures
    in the same minutes (`fma_peak_gflops_per_core`, src/codegen/peak.rs).

Setup (once): the XLA side needs a Python with jax, numpy and safetensors:

    python3 -m venv .venv && .venv/bin/pip install jax numpy safetensors

then point the script at it with `--python .venv/bin/python` or
`DLC_BENCH_PYTHON=.venv/bin/python`. dlc is not built here: run
`cargo build --release` first (or pass `--dlc PATH`).

Usage:
    python3 benches/compare.py [--python PY] [--dlc PATH] [--backend interp|jit]
                               [--threads 1|2] [--only mlp,gemm] [--quick]
                               [--steps K] [--rounds R] [--max-wait S] [--retries K]
                               [--json OUT]

Only the standard library is used; exit status 1 if any measurement failed.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, file (under --workloads), dims, has a training step. The sizes are
# those of ../shared/bench/workloads/README.md; the names are anchors.py's.
WORKLOADS = [
    ("mlp", "mlp.dl", {"N": 64}, True),
    ("lenet", "lenet.dl", {"N": 32}, True),
    ("vgg", "vgg.dl", {"N": 16}, True),
    ("lstm", "lstm.dl", {"N": 16, "T": 32}, True),
    ("gru", "gru.dl", {"N": 16, "T": 32}, True),
    ("transformer", "transformer.dl", {"N": 8, "T": 64}, True),
    ("gemm512", "gemm.dl", {"M": 512, "K": 512, "P": 512}, False),
    ("gemm1024", "gemm.dl", {"M": 1024, "K": 1024, "P": 1024}, False),
]


def select(only):
    if not only:
        return list(WORKLOADS)
    out = []
    for name in only.split(","):
        name = name.strip()
        # "gemm" selects both sizes, as in anchors.py.
        found = [w for w in WORKLOADS if w[0] == name] or \
                [w for w in WORKLOADS if w[0].startswith(name)]
        if not found:
            sys.exit(f"compare.py: unknown workload `{name}`; expected one of "
                     + ", ".join(w[0] for w in WORKLOADS))
        out.extend(w for w in found if w not in out)
    return out


def machine():
    model, flags = "?", set()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        model = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), "?")
        flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    except OSError:
        model = platform.processor() or "?"
    # The widest float vectors the CPU has: XLA uses them, the JIT's
    # Cranelift 0.135 emits 128-bit ones only.
    vectors = "512-bit (AVX-512)" if "avx512f" in flags else "256-bit (AVX2)" if "avx2" in flags else "?"
    return {"cpu_model": model, "cores": os.cpu_count(), "machine": platform.machine(),
            "system": platform.system(), "vectors": vectors}


def run_dlc(args, workload):
    name, file, dims, trainable = workload
    # Warm-up and window as anchors.py's time_calls (5 runs, 1.5 s; 1 run,
    # 0.1 s with --quick).
    warmup, window = (1, 0.1) if args.quick else (5, 1.5)
    cmd = [args.dlc, "bench", os.path.join(args.workloads, file), "--json",
           "--backend", args.backend, "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(warmup), "--min-time", str(window)]
    for k, v in dims.items():
        cmd += ["--dim", f"{k}={v}"]
    if trainable:
        # The reference training step: sgd(lr=0.01, momentum=0.9), as anchors.py.
        cmd += ["--train", "--lr", "0.01", "--momentum", "0.9"]
    print("# dlc: " + " ".join(cmd), file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    except OSError as e:
        return {"error": f"cannot run {args.dlc}: {e}"}
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": msg}
    for line in reversed(proc.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"error": "no JSON object in the output of dlc bench"}


def run_anchors(args, names):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "anchors.json")
        cmd = [args.python, args.anchors, "--only", ",".join(names), "--threads", str(args.threads),
               "--json", out]
        if args.quick:
            cmd.append("--quick")
        if args.max_wait is not None:
            cmd += ["--max-wait", str(args.max_wait)]
        if args.retries is not None:
            cmd += ["--retries", str(args.retries)]
        print("# XLA: " + " ".join(cmd), file=sys.stderr, flush=True)
        try:
            # anchors.py's own progress goes to our stderr; its table is not needed.
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, timeout=args.timeout * len(names))
        except (OSError, subprocess.TimeoutExpired) as e:
            return {}, {"error": f"anchors.py did not run: {e}"}
        if not os.path.exists(out):
            return {}, {"error": f"anchors.py exited {proc.returncode} without results"}
        with open(out) as f:
            data = json.load(f)
    by_name = {r["workload"]: r for r in data.get("results", [])}
    return by_name, data


def fmt(v, digits=2):
    if v is None:
        return "—"
    return f"{v:.3f}" if v < 0.1 else f"{v:.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b <= 0:
        return "—"
    r = a / b
    return f"{r:.2f}" if r >= 0.1 else f"{r:.2g}"


def ms_of(seconds):
    return None if seconds is None else seconds * 1e3


def median_of(results, key):
    """Median over the rounds of one figure, None if no round has it."""
    vals = [r[key] for r in results if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def merged(results):
    """One side's rounds of a workload as one result: the median of every
    figure, an error only if no round succeeded."""
    good = [r for r in results if "error" not in r]
    if not good:
        return results[-1] if results else {"error": "not run"}
    out = {k: median_of(good, k) for k in good[0] if isinstance(good[0][k], (int, float))}
    out["rounds"] = len(good)
    return out


def round_ratios(dlc_rounds, xla_rounds, dkey, xkey):
    """dlc / XLA of each round in which both sides measured the figure."""
    out = []
    for d, x in zip(dlc_rounds, xla_rounds):
        dv, xv = d.get(dkey), x.get(xkey)
        if isinstance(dv, (int, float)) and isinstance(xv, (int, float)) and xv > 0:
            out.append(dv / (xv * 1e3))
    return out


def spread(ratios):
    if len(ratios) < 2:
        return ""
    return f" ({min(ratios):.2f}–{max(ratios):.2f})"


def table(rows):
    lines = [
        "| workload | dlc compile ms | XLA compile ms | ratio | dlc fwd ms | XLA fwd ms | ratio "
        "| dlc train ms | XLA train ms | ratio | dlc GFLOP/s | XLA GFLOP/s | XLA bg load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        d, x = r["dlc"], r["xla"]
        notes = []
        if "error" in d:
            notes.append(f"dlc: {d['error']}")
        if "error" in x:
            notes.append(f"XLA: {x['error']}")
        # dlc bench --train compiles the training step, otherwise the forward.
        xc_key = "compile_train_s" if r["trainable"] else "compile_fwd_s"
        dc, xc = d.get("compile_ms"), ms_of(x.get(xc_key))
        df, xf = d.get("forward_ms"), ms_of(x.get("fwd_s"))
        dt, xt = d.get("train_step_ms"), ms_of(x.get("train_s"))
        dg = xg = None
        if r["flops"] and df:
            dg = r["flops"] / (df * 1e-3) / 1e9
        share = ""
        if dg and d.get("fma_peak_gflops_per_core") and d.get("threads"):
            share = f" ({100 * dg / (d['fma_peak_gflops_per_core'] * d['threads']):.0f}% of peak)"
        if r["flops"] and xf:
            xg = x.get("gflops") or r["flops"] / (xf * 1e-3) / 1e9
        name = r["name"] + (" (" + "; ".join(notes) + ")" if notes else "")
        fwd_spread = spread(round_ratios(r["dlc_rounds"], r["xla_rounds"], "forward_ms", "fwd_s"))
        train_spread = spread(round_ratios(r["dlc_rounds"], r["xla_rounds"], "train_step_ms", "train_s"))
        lines.append(
            f"| {name} | {fmt(dc, 1)} | {fmt(xc, 1)} | {ratio(dc, xc)} | {fmt(df)} | {fmt(xf)} | "
            f"{ratio(df, xf)}{fwd_spread} | {fmt(dt)} | {fmt(xt)} | {ratio(dt, xt)}{train_spread} | "
            f"{fmt(dg, 1) + share if dg else '—'} | {fmt(xg, 1) if xg else '—'} | {fmt(x.get('background_cores'))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=os.environ.get("DLC_BENCH_PYTHON", "python3"),
                    help="interpreter with jax, numpy, safetensors (default: $DLC_BENCH_PYTHON or python3)")
    ap.add_argument("--dlc", default=os.environ.get("DLC_BIN", os.path.join(REPO, "target", "release", "dlc")),
                    help="the dlc binary (default: $DLC_BIN or target/release/dlc)")
    ap.add_argument("--anchors", default=os.path.join(os.path.dirname(REPO), "shared", "bench", "anchors.py"),
                    help="path of anchors.py (default: ../shared/bench/anchors.py)")
    ap.add_argument("--workloads", default=os.path.join(REPO, "lang", "examples"),
                    help="folder with the workload .dl files (default: lang/examples)")
    ap.add_argument("--backend", default=os.environ.get("DLC_BACKEND", "jit"), choices=["interp", "jit"],
                    help="dlc backend (default: $DLC_BACKEND or jit)")
    ap.add_argument("--threads", type=int, default=2, choices=[1, 2],
                    help="threads on both sides (anchors.py knows 1 and 2)")
    ap.add_argument("--only", help="comma-separated workloads (gemm = both sizes)")
    ap.add_argument("--quick", action="store_true", help="anchors.py --quick (short timing windows)")
    ap.add_argument("--max-wait", type=float, metavar="S",
                    help="anchors.py --max-wait: seconds to wait for a quiet machine before each measurement")
    ap.add_argument("--retries", type=int, metavar="K",
                    help="anchors.py --retries: reruns of a measurement disturbed by other processes")
    ap.add_argument("--steps", type=int, default=10,
                    help="dlc bench --steps: timed steps at least (the window is 1.5 s, as anchors.py's)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternations dlc/XLA per workload; figures are medians over them (default 3)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per dlc run")
    ap.add_argument("--json", metavar="PATH", help="also write everything measured as JSON")
    args = ap.parse_args()

    if not os.path.isfile(args.dlc):
        sys.exit(f"compare.py: no dlc binary at {args.dlc}; run `cargo build --release` or pass --dlc")
    if not os.path.isfile(args.anchors):
        sys.exit(f"compare.py: no anchors.py at {args.anchors}; pass --anchors")

    if args.rounds < 1:
        sys.exit("compare.py: --rounds must be at least 1")
    chosen = select(args.only)
    started = time.time()
    dlc_rounds = {w[0]: [] for w in chosen}
    xla_rounds = {w[0]: [] for w in chosen}
    xla_env = {}
    for rnd in range(args.rounds):
        for w in chosen:
            name = w[0]
            print(f"# round {rnd + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            dlc_rounds[name].append(run_dlc(args, w))
            by_name, raw = run_anchors(args, [name])
            xla_env = xla_env or (raw.get("environment", {}) if isinstance(raw, dict) else {})
            xla_error = raw.get("error") if isinstance(raw, dict) else None
            xla_rounds[name].append(by_name.get(name) or {"error": xla_error or "no result"})

    rows = []
    for name, _, dims, trainable in chosen:
        flops = 2.0 * dims["M"] * dims["K"] * dims["P"] if name.startswith("gemm") else None
        rows.append({"name": name, "dims": dims, "flops": flops, "trainable": trainable,
                     "dlc": merged(dlc_rounds[name]), "xla": merged(xla_rounds[name]),
                     "dlc_rounds": dlc_rounds[name], "xla_rounds": xla_rounds[name]})

    env = machine()
    out = table(rows)
    peaks = [d["fma_peak_gflops_per_core"] for rs in dlc_rounds.values() for d in rs
             if isinstance(d.get("fma_peak_gflops_per_core"), (int, float))]
    peak = (f"; f32x4 FMA peak (dlc bench's probe, median over the run) "
            f"{statistics.median(peaks):.1f} GFLOP/s per core" if peaks else "")
    out += (f"\n\nmachine: {env['cpu_model']}, {env['cores']} cores ({env['machine']}, {env['system']}), "
            f"widest vectors {env['vectors']}{peak}; "
            f"threads={args.threads} on both sides; dlc backend={args.backend}, "
            f"{args.rounds} alternating rounds per workload, medians over them; "
            f"dlc: at least {args.steps} timed steps and {'0.1' if args.quick else '1.5'} s; "
            f"XLA: jax {xla_env.get('jax', '?')}"
            f"{', --quick timing windows' if args.quick else ''}; "
            f"whole run {time.time() - started:.0f} s.\n"
            "ratio = dlc / XLA (above 1: dlc slower) of the medians; in brackets the lowest "
            "and highest ratio of a single round. compile: source to runnable training step "
            "(forward for gemm) on both sides. XLA bg load: CPU "
            "cores other processes used during the XLA measurement (anchors.py); above 0.1 "
            "its figures are likely inflated.")
    print(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": env, "args": vars(args), "rows": rows, "xla_environment": xla_env,
                       "table_markdown": out}, f, indent=2)
    failed = any("error" in m for r in rows for m in r["dlc_rounds"] + r["xla_rounds"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
