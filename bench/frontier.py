"""The NFE-quality frontier of every bundled model: FD (and precision/recall/accuracy) against mean NFE per image.

Part 1 sweeps the sampler settings through the service's own sampler (``models.sampler.sample``, the same
packed slot batch the engine runs): update rule, step size, mu, guidance, the norm threshold and the step
cap; the official loop's fixed-step settings are labelled points. Part 2 studies stopping rules on one
reference NAG loop (per sample: fixed N, norm below a threshold, norm below a fraction of its first value,
a stall test) on plain generation and on a mixed workload whose samples differ in difficulty (denoising
from noise levels g = 0, 0.5, 0.7, 0.9). Figures go to ``bench/frontier.json``, the plot to
``bench/frontier.png`` and the section to ``bench/RESULTS.md``.

``python bench/frontier.py --models digits`` (per model; the json keeps the other models' rows).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models import BUNDLED  # noqa: E402
from models import load_model  # noqa: E402
from models.family import LoadedModel  # noqa: E402
from models.digits_data import load_digits_split  # noqa: E402
from models.judge import Judge  # noqa: E402
from models.judge_runs import draw  # noqa: E402
from models.sampler import noise_for_seed  # noqa: E402

JSON_PATH = ROOT / "bench" / "frontier.json"
SEED = 1000


def _nag(eta: float = 0.05, mu: float = 0.3, cfg: float = 1.0, steps: int = 60, thr: float = 0.0, sampler="nag"):
    return {"sampler": sampler, "step_size": eta, "mu": mu, "cfg_scale": cfg, "max_steps": steps,
            "grad_norm_threshold": thr}


def sweep_for(name: str) -> list[tuple[str, str, dict]]:
    """(series, label, settings) of the sweep of one model; the first point is its recorded defaults."""
    return [("recorded defaults", "now", {})] + _grid(name)


def _grid(name: str) -> list[tuple[str, str, dict]]:
    if name == "em-digits":
        points = []
        # t_end 0.6 is far from the data (FD 55 at dt 0.02); each Heun step costs 2 autograd evaluations.
        for dt_, t_end in ((0.05, 0.8), (0.05, 1.0), (0.05, 1.5), (0.1, 0.8), (0.1, 1.0), (0.1, 1.5), (0.02, 1.5)):
            steps = round(t_end / dt_)
            points.append((f"Heun dt {dt_}", f"t_end {t_end}", {"sampler": "heun-sde", "step_size": dt_,
                           "max_steps": steps, "epsilon_max": 0.0, "time_cutoff": 1.0, "grad_norm_threshold": 0.0}))
        points.append(("recorded before", "dt 0.02, 50 steps", {"sampler": "heun-sde", "step_size": 0.02,
                       "max_steps": 50, "epsilon_max": 0.0, "time_cutoff": 1.0, "grad_norm_threshold": 0.0}))
        return points
    energy = name == "digits-e"
    steps_grid = (3, 5, 7, 10, 20) if energy else (3, 5, 7, 10, 15, 30, 60)
    points = [("NAG eta 0.05 mu 0.3 CFG 1.0 fixed", f"{n}", _nag(steps=n)) for n in steps_grid]
    points += [("NAG eta 0.05 mu 0.3 CFG 1.5 fixed", f"{n}", _nag(cfg=1.5, steps=n)) for n in (5, 10, 20, 60)]
    points += [("NAG eta 0.05 mu 0.3 CFG 1.0 norm<thr", f"thr {t}", _nag(thr=t)) for t in (1.0, 2.0, 3.0, 4.0)]
    points += [("NAG eta 0.05 mu 0.3 CFG 1.5 norm<thr", "thr 1.0 (old default)", _nag(cfg=1.5, thr=1.0))]
    if not energy:
        points += [(f"GD eta {e} CFG 1.0 fixed", f"{n}", _nag(eta=e, mu=0.0, steps=n, sampler="gd"))
                   for e in (0.05, 0.1) for n in (5, 10, 20)]
        points += [("NAG eta 0.1 mu 0.3 CFG 1.0 fixed", f"{n}", _nag(eta=0.1, steps=n)) for n in (3, 5, 7)]
        points += [("NAG eta 0.05 mu 0.5 CFG 1.0 fixed", f"{n}", _nag(mu=0.5, steps=n)) for n in (3, 5, 7)]
        points += [("NAG eta 0.05 mu 0.3 CFG 1.25 fixed", f"{n}", _nag(cfg=1.25, steps=n)) for n in (5, 7, 10)]
        # The official sample_gd.py: fixed NAG-GD steps with CFG on every request (paper: 250 steps, CFG 1.5).
        points += [("official loop (fixed NAG-GD, CFG 1.5)", f"{n} steps", _nag(cfg=1.5, steps=n)) for n in (249,)]
    return points


def run_sweep(name: str, loaded: LoadedModel, judge: Judge, per_class: int, unconditional: int, log,
              defaults_only: bool = False) -> list[dict]:
    rows = []
    for series, label, settings in sweep_for(name)[:1] if defaults_only else sweep_for(name):
        drawn = draw(loaded, settings, per_class=per_class, unconditional=unconditional, seed=SEED)
        s = judge.score(drawn.images, drawn.labels)
        rows.append({"model": name, "series": series, "label": label, "settings": settings,
                     "nfe": round(drawn.mean_nfe, 2), "steps": round(drawn.mean_steps, 2), **s.row()})
        log(f"{name:10} {series:40} {label:22} NFE {drawn.mean_nfe:6.1f}  FD {s.fd:7.2f}  P {s.precision:.3f}  "
            f"R {s.recall:.3f}  acc {s.accuracy}  ({drawn.seconds:.0f}s)")
    return rows


# -- part 2: stopping rules on one reference loop ------------------------------------------------------

def _guided(field, x, labels, cfg_scale):
    y = torch.as_tensor(labels)
    if cfg_scale == 1.0:
        return field.direction(x, y)
    null = torch.full_like(y, field.null_label)
    both = field.direction(torch.cat([x, x]), torch.cat([y, null]))
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def descend(field, start, labels, rule: str, value: float, *, eta=0.05, mu=0.3, cfg_scale=1.0, max_steps=60):
    """NAG-GD with a per-sample stopping rule; returns (final x, mean NFE per image).

    Rules, checked on the norm of each evaluated direction (the evaluation that stops a sample counts):
    ``fixed`` (value = N updates), ``norm`` (norm < value), ``relative`` (norm < value * first norm),
    ``stall`` (norm / previous norm > value from the third update on: the descent no longer shrinks the field)."""
    x, m = start.clone(), torch.zeros_like(start)
    n = x.shape[0]
    rows = 1 if cfg_scale == 1.0 else 2
    active = torch.ones(n, dtype=torch.bool)
    first = torch.full((n,), float("nan"))
    prev = torch.full((n,), float("inf"))
    evaluations = 0
    cap = int(value) if rule == "fixed" else max_steps
    for step in range(cap):
        idx = active.nonzero().flatten()
        if len(idx) == 0:
            break
        d = _guided(field, x[idx] + eta * mu * m[idx], labels[idx], cfg_scale)
        evaluations += rows * len(idx)
        norm = d.flatten(1).norm(dim=1)
        if step == 0:
            first[idx] = norm
        if rule == "norm":
            stop = norm < value
        elif rule == "relative":
            stop = norm < value * first[idx]
        elif rule == "stall":
            # The first updates leave the noise and raise the norm; a stall is judged from step 3 on.
            stop = (norm / prev[idx] > value) & (step >= 3)
        else:
            stop = torch.zeros(len(idx), dtype=torch.bool)
        go = idx[~stop]
        m[go] = d[~stop]
        x[go] = x[go] + eta * d[~stop]
        prev[idx] = norm
        active[idx[stop]] = False
    return x, evaluations / n


def workloads(count: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Plain generation, and a mixed workload: train digits noised to g = 0, 0.5, 0.7, 0.9 in turn."""
    noise = torch.stack([noise_for_seed(SEED + i, (1, 8, 8)) for i in range(count)])
    labels = np.arange(count) % 10
    split = load_digits_split()
    clean, clean_labels = split.x_train[:count], split.y_train[:count].numpy()
    levels = torch.tensor([(0.0, 0.5, 0.7, 0.9)[i % 4] for i in range(count)]).view(-1, 1, 1, 1)
    mixed = clean * levels + (1 - levels) * noise     # g*x + (1-g)*eps per sample
    return {"generation": (noise, labels), "mixed (denoise g 0/0.5/0.7/0.9)": (mixed, clean_labels)}


def stopping_study(name: str, loaded: LoadedModel, judge: Judge, count: int, log) -> list[dict]:
    rules = [("fixed", v) for v in (3, 4, 5, 7, 10, 15)] + [("norm", v) for v in (1.0, 2.0, 3.0, 4.0, 6.0)]
    rules += [("relative", v) for v in (0.05, 0.1, 0.2, 0.3)] + [("stall", v) for v in (0.6, 0.7, 0.8, 0.9)]
    rows = []
    for workload, (start, labels) in workloads(count).items():
        for rule, value in rules:
            x, nfe = descend(loaded.field, start, torch.as_tensor(labels), rule, value)
            s = judge.score(x, labels)
            rows.append({"model": name, "workload": workload, "rule": rule, "value": value, "nfe": round(nfe, 2),
                         **s.row()})
            log(f"{name:10} {workload:34} {rule:9} {value:<5} NFE {nfe:5.1f}  FD {s.fd:6.2f}  P {s.precision:.3f}  "
                f"R {s.recall:.3f}  acc {s.accuracy}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="digits,digits-e,em-digits")
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--unconditional", type=int, default=300, help="samples of an unconditional model")
    p.add_argument("--no-stopping", action="store_true", help="skip part 2")
    p.add_argument("--defaults-only", action="store_true",
                   help="measure only the recorded defaults and replace that row (after the defaults moved)")
    p.add_argument("--json", default=str(JSON_PATH))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    judge = Judge.shared()
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {"sweep": [], "stopping": [], "floor": {}}
    log = lambda m: print(m, flush=True)                       # noqa: E731
    for name in args.models.split(","):
        loaded = load_model(BUNDLED[name])
        conditional = loaded.field.num_classes > 0
        rows = run_sweep(name, loaded, judge, args.per_class if conditional else 0,
                         0 if conditional else args.unconditional, log, args.defaults_only)
        count = rows[0]["count"]
        data["floor"][name] = {"floor": judge.floor(count).row(), "ceiling": judge.ceiling(count).row()}
        if args.defaults_only:
            rows += [r for r in data["sweep"] if r["model"] == name and r["series"] != "recorded defaults"]
        data["sweep"] = [r for r in data["sweep"] if r["model"] != name] + rows
        if conditional and not args.no_stopping and not args.defaults_only:
            data["stopping"] = [r for r in data["stopping"] if r["model"] != name] + \
                stopping_study(name, loaded, judge, count, log)
        data["date"] = dt.date.today().isoformat()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
