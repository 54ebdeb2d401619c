"""Benchmarks for kernels/: the fused NAG-GD step against the eager torch
sequence of the same math (kernels.nag_step.nag_step_reference).

Setup: EqM-XL/2 latents (4x32x32), 2 rows per sample (classifier-free
guidance: conditional rows first, null rows after), bf16 model output and bf16
model input, fp32 state, every sample stepping (threshold 0, no step cap).

Columns:
  fused us / torch us   device time per step, from CUDA-graph replays of
                        GRAPH_STEPS consecutive steps (median over replays), so
                        host launch overhead is excluded
  fused GB/s, % peak    bytes the fused kernel must move (see fused_bytes) over
                        its device time, and that as a share of --peak-gbs
  launch us             wall time per step when called eagerly back to back
                        (what a Python loop without graphs pays, host included)

Usage:
  python bench/bench_kernels.py [--rows 64 256 1024] [--peak-gbs 3350] [--write]
"""

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/bench_kernels.py` from anywhere

RESULTS = ROOT / "bench" / "RESULTS.md"
C, H, W = 4, 32, 32
CFG_SCALE = 4.0
GRAPH_STEPS = 20  # steps per captured graph: amortises the graph launch gap


def peak_gbs_for(name):
    """Datasheet HBM bandwidth for the devices we know, else None."""
    upper = name.upper()
    if "H200" in upper:
        return 4800.0
    if "H100" in upper and "PCIE" not in upper and "NVL" not in upper:
        return 3350.0  # H100 SXM
    return None


def make_state(num_rows, device):
    """CFG batch: sample a uses rows a (conditional) and a + A (null)."""
    A = num_rows // 2
    S = A
    g = torch.Generator(device="cpu").manual_seed(0)
    st = dict(
        out=torch.randn(num_rows, C, H, W, generator=g).to(torch.bfloat16),
        x=torch.randn(S, C, H, W, generator=g),
        m=torch.zeros(S, C, H, W),
        model_in=torch.empty(num_rows, C, H, W, dtype=torch.bfloat16),
        slot_ids=torch.arange(A, dtype=torch.int64),
        rows=torch.stack([torch.arange(A), torch.arange(A) + A], dim=1),
        weights=torch.tensor([[CFG_SCALE, 1.0 - CFG_SCALE]]).repeat(A, 1),
        eta=torch.full((S,), 0.003),
        mu=torch.full((S,), 0.35),
        threshold=torch.zeros(S),
        max_steps=torch.full((S,), 2**30, dtype=torch.int32),
        steps=torch.zeros(S, dtype=torch.int32),
        norm=torch.zeros(S),
        finished=torch.zeros(S, dtype=torch.int8),
    )
    return {k: v.to(device) for k, v in st.items()}


def fused_bytes(st, guided_channels):
    """Bytes the fused kernel must move for one step in which every listed
    sample steps: rows read once (only the guided prefix of non-primary rows),
    x read, x and m written (m's old value is dead, so not read), look-ahead
    rows written, plus the per-sample indices and scalars."""
    R = st["out"].shape[0]
    A, K = st["rows"].shape
    N = C * H * W
    GN = guided_channels * H * W
    out_b = st["out"].element_size()
    mi_b = st["model_in"].element_size()
    rows_read = A * N * out_b + (R - A) * GN * out_b
    state = A * N * 4 * 3
    look = R * N * mi_b
    idx = st["slot_ids"].element_size()
    scalars = A * (idx + K * (st["rows"].element_size() + 4)  # slot id, rows, weights
                   + 4 * 4                                  # eta, mu, threshold, max_steps
                   + 4 * 2 + 4 + 1)                         # steps r/w, norm, finished
    return rows_read + state + look + scalars


def graph_time_us(step, reps):
    """Median device time of one step: replays of a graph of GRAPH_STEPS steps."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up (and autotune) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_STEPS):
            step()
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    torch.cuda.synchronize()
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3 / GRAPH_STEPS


def launch_time_us(step, reps, warmup):
    """Median wall time per step over back-to-back eager calls (host included)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(GRAPH_STEPS):
            step()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e6 / GRAPH_STEPS)
    return statistics.median(samples)


def check_agree(ns, st, guided_channels):
    """One step with each implementation on copies; they must agree."""
    a = {k: v.clone() for k, v in st.items()}
    b = {k: v.clone() for k, v in st.items()}
    ns.nag_step_reference(**a, guided_channels=guided_channels)
    ns.nag_step_triton(**b, guided_channels=guided_channels)
    for name in ("x", "m", "norm"):
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-5)
    eps = torch.finfo(a["model_in"].dtype).eps
    torch.testing.assert_close(b["model_in"].float(), a["model_in"].float(), rtol=eps, atol=1e-5)
    assert torch.equal(a["steps"], b["steps"]) and torch.equal(a["finished"], b["finished"])


def bench_nag_step(args, peak):
    import kernels.nag_step as ns

    G = C
    rows_out = []
    for num_rows in args.rows:
        st = make_state(num_rows, "cuda")
        check_agree(ns, st, G)

        def fused():
            ns.nag_step_triton(**st, guided_channels=G)

        def eager():
            ns.nag_step_reference(**st, guided_channels=G)

        t_fused = graph_time_us(fused, args.reps)
        t_torch = graph_time_us(eager, args.reps)
        l_fused = launch_time_us(fused, args.launch_reps, args.warmup)
        l_torch = launch_time_us(eager, args.launch_reps, args.warmup)
        nbytes = fused_bytes(st, G)
        gbs = nbytes / (t_fused * 1e-6) / 1e9
        rows_out.append(dict(rows=num_rows, samples=num_rows // 2, mib=nbytes / 2**20,
                             fused=t_fused, torch=t_torch, gbs=gbs,
                             pct=(100.0 * gbs / peak) if peak else None,
                             l_fused=l_fused, l_torch=l_torch))
    return rows_out


def markdown_table(results):
    lines = [
        "| rows | samples | MiB/step | fused us | fused GB/s | % peak | torch us | speedup "
        "| fused launch us | torch launch us |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        pct = f"{r['pct']:.0f}%" if r["pct"] is not None else "n/a"
        lines.append(
            f"| {r['rows']} | {r['samples']} | {r['mib']:.1f} | {r['fused']:.1f} | {r['gbs']:.0f} | {pct} "
            f"| {r['torch']:.1f} | {r['torch'] / r['fused']:.1f}x | {r['l_fused']:.1f} | {r['l_torch']:.1f} |")
    return "\n".join(lines)


def append_results(table, device_name, peak):
    import triton

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    peak_txt = f"{peak:.0f} GB/s" if peak else "unknown"
    section = (
        f"\n## nag_step: {stamp}, {device_name}\n\n"
        f"Fused NAG-GD step vs eager torch reference. {C}x{H}x{W} latents, 2 rows/sample (CFG), "
        f"bf16 rows and model_in, fp32 state. Device times from CUDA-graph replays of {GRAPH_STEPS} steps; "
        f"peak {peak_txt}; torch {torch.__version__}, triton {triton.__version__}.\n\n"
        f"{table}\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text("# Kernel benchmark results\n\nSections are appended by "
                           "`python bench/bench_kernels.py --write`.\n")
    with RESULTS.open("a") as f:
        f.write(section)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 256, 1024],
                        help="model rows per step (2 per sample)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="device peak memory bandwidth in GB/s (default: from the device name)")
    parser.add_argument("--reps", type=int, default=100, help="timed graph replays per case")
    parser.add_argument("--launch-reps", type=int, default=30, help="timed eager batches per case")
    parser.add_argument("--warmup", type=int, default=10, help="eager warmup calls per case")
    parser.add_argument("--write", action="store_true", help=f"append the results to {RESULTS}")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels.py: a CUDA device is needed to benchmark the kernels; none found, nothing measured.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_kernels.py: triton is needed to benchmark the kernels; it is not installed.")
        return 0
    if any(r < 2 or r % 2 for r in args.rows):
        parser.error("--rows must be even numbers >= 2 (2 rows per sample)")

    device_name = torch.cuda.get_device_name()
    peak = args.peak_gbs if args.peak_gbs is not None else peak_gbs_for(device_name)
    if peak is None:
        print(f"Peak bandwidth of '{device_name}' is not known: pass --peak-gbs to get % of peak.")

    results = bench_nag_step(args, peak)
    table = markdown_table(results)
    print(f"nag_step on {device_name} (peak {peak or 'unknown'} GB/s)\n")
    print(table)
    if args.write:
        append_results(table, device_name, peak)
        print(f"\nappended to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
