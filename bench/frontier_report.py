"""Render ``bench/frontier.json`` (written by ``bench/frontier.py``): the plot ``bench/frontier.png`` and the
``## NFE-quality frontier`` section of ``bench/RESULTS.md``. Pillow only (no plotting library needed)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import results  # noqa: E402

JSON_PATH = ROOT / "bench" / "frontier.json"
PNG_PATH = ROOT / "bench" / "frontier.png"
TITLE = "## NFE-quality frontier (FD by the project's judge)"
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (90, 90, 200)]
PANEL_W, PANEL_H, MARGIN = 560, 420, 60


def _models(data: dict) -> list[str]:
    """The bundled models first, in their usual order, then any other."""
    found = list(dict.fromkeys(r["model"] for r in data["sweep"]))
    known = [m for m in ("digits", "digits-e", "em-digits") if m in found]
    return known + [m for m in found if m not in known]


def _axis(value: float, lo: float, hi: float, size: int) -> float:
    return (math.log10(max(value, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * size


def _panel(draw: ImageDraw.ImageDraw, x0: int, rows: list[dict], name: str, floor: float, marks: dict) -> None:
    lo_x, hi_x, lo_y, hi_y = 1.0, 1000.0, 0.3, 300.0
    w, h = PANEL_W - 2 * MARGIN, PANEL_H - 2 * MARGIN
    ox, oy = x0 + MARGIN, MARGIN

    def at(nfe: float, fd: float) -> tuple[float, float]:
        return ox + _axis(nfe, lo_x, hi_x, w), oy + h - _axis(fd, lo_y, hi_y, h)

    draw.rectangle([ox, oy, ox + w, oy + h], outline=(0, 0, 0))
    for tick in (1, 3, 10, 30, 100, 300, 1000):
        x, _ = at(tick, lo_y)
        draw.line([x, oy + h, x, oy + h + 4], fill=(0, 0, 0))
        draw.text((x - 8, oy + h + 6), str(tick), fill=(0, 0, 0))
    for tick in (0.3, 1, 3, 10, 30, 100, 300):
        _, y = at(lo_x, tick)
        draw.line([ox - 4, y, ox, y], fill=(0, 0, 0))
        draw.text((ox - 30, y - 5), f"{tick:g}", fill=(0, 0, 0))
    draw.text((ox + w // 2 - 70, oy + h + 22), "mean NFE per image (log)", fill=(0, 0, 0))
    draw.text((ox, oy - 40), f"{name}: FD vs NFE (log-log)", fill=(0, 0, 0))
    _, fy = at(lo_x, floor)
    draw.line([ox, fy, ox + w, fy], fill=(160, 160, 160))
    draw.text((ox + w - 110, fy - 12), f"real-vs-real {floor:.2f}", fill=(120, 120, 120))
    series = list(dict.fromkeys(r["series"] for r in rows))
    for k, s in enumerate(series):
        colour = PALETTE[k % len(PALETTE)]
        pts = sorted((r for r in rows if r["series"] == s), key=lambda r: r["nfe"])
        xy = [at(r["nfe"], r["fd"]) for r in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=1)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((ox + 6, oy + 4 + 11 * k), s[:48], fill=colour)
    for text, (nfe, fd) in marks.items():
        x, y = at(nfe, fd)
        draw.rectangle([x - 5, y - 5, x + 5, y + 5], outline=(0, 0, 0), width=2)
        draw.text((x + 7, y - 5), text, fill=(0, 0, 0))


def render(data: dict, marks: dict[str, dict[str, tuple[float, float]]], path: Path = PNG_PATH) -> None:
    models = _models(data)
    image = Image.new("RGB", (PANEL_W * len(models), PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(models):
        _panel(draw, i * PANEL_W, [r for r in data["sweep"] if r["model"] == name], name,
               data["floor"][name]["floor"]["fd"], marks.get(name, {}))
    tmp = path.with_name(path.name + ".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) and v <= 1.0 else f"{v}"


def section(data: dict) -> str:
    out = [TITLE, "", f"`python bench/frontier.py` then `python bench/frontier_report.py`; {data['date']}, 2-core CPU "
           "(loaded: three other jobs shared it). Judge: `models/judge.py` (features of an MLP trained only on the "
           "digits train split, held-out accuracy 0.975), reference = the 360 held-out digits; 30 samples per class "
           "(300 unconditional for `em-digits`), noise seeds 1000+i. NFE = forward rows per image (a CFG step costs "
           "2; the evaluation that stops a sample counts). Plot: `bench/frontier.png`.", ""]
    out += _summary(data)
    for name in _models(data):
        fl = data["floor"][name]
        out += [f"### {name}", "",
                f"floor (train digits vs held-out, same count): FD {fl['floor']['fd']}, precision "
                f"{fl['floor']['precision']}, recall {fl['floor']['recall']}; ceiling (uniform noise): FD "
                f"{fl['ceiling']['fd']}.", "",
                "| settings | point | mean NFE | FD | precision | recall | accuracy |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in (r for r in data["sweep"] if r["model"] == name):
            out.append(f"| {r['series']} | {r['label']} | {r['nfe']} | {r['fd']} | {_fmt(r['precision'])} | "
                       f"{_fmt(r['recall'])} | {_fmt(r['accuracy'])} |")
        out.append("")
        stop = [r for r in data.get("stopping", []) if r["model"] == name]
        if stop:
            out += ["Stopping rules on one reference NAG-GD loop (eta 0.05, mu 0.3, CFG 1.0, cap 60):", "",
                    "| workload | rule | value | mean NFE | FD | precision | recall | accuracy |",
                    "|---|---|---:|---:|---:|---:|---:|---:|"]
            for r in stop:
                out.append(f"| {r['workload']} | {r['rule']} | {r['value']} | {r['nfe']} | {r['fd']} | "
                           f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(r['accuracy'])} |")
            out.append("")
    return "\n".join(out)


def marks_of(data: dict) -> dict[str, dict[str, tuple[float, float]]]:
    """Boxed points: each model's recorded defaults now and the former ones (same weights)."""
    marks: dict[str, dict[str, tuple[float, float]]] = {}
    for r in data["sweep"]:
        if r["series"] == "recorded defaults":
            marks.setdefault(r["model"], {})["defaults"] = (r["nfe"], r["fd"])
        elif "old default" in r["label"] or r["series"] == "recorded before":
            marks.setdefault(r["model"], {})["former defaults"] = (r["nfe"], r["fd"])
        elif r["series"].startswith("official"):
            marks.setdefault(r["model"], {})[f"official, {r['label']}"] = (r["nfe"], r["fd"])
    return marks


def _summary(data: dict) -> list[str]:
    """Defaults before/after per model, and the official loop at its own best fixed-step setting."""
    out = ["Recorded defaults, former and now (same weights, same samples):", "",
           "| model | former defaults: FD at NFE | now: FD at NFE | precision, recall, accuracy now |", "|---|---|---|---|"]
    for name in _models(data):
        rows = [r for r in data["sweep"] if r["model"] == name]
        now = next(r for r in rows if r["series"] == "recorded defaults")
        old = next((r for r in rows if "old default" in r["label"] or r["series"] == "recorded before"), None)
        before = f"{old['fd']} at {old['nfe']}" if old else "-"
        out.append(f"| {name} | {before} | {now['fd']} at {now['nfe']} | {_fmt(now['precision'])}, "
                   f"{_fmt(now['recall'])}, {_fmt(now['accuracy'])} |")
    digits = [r for r in data["sweep"] if r["model"] == "digits"]
    official = [r for r in digits if r["series"].startswith("official")]
    fixed = [r for r in digits if r["series"] == "NAG eta 0.05 mu 0.3 CFG 1.0 fixed"]
    now = next((r for r in digits if r["series"] == "recorded defaults"), None)
    if official and fixed and now:
        best = min(fixed, key=lambda r: r["fd"])
        out += ["", f"The official loop (`sample_gd.py`: fixed NAG-GD steps, no stopping) on `digits`: at the paper's "
                f"249 steps with CFG 1.5, FD {official[0]['fd']} at {official[0]['nfe']} NFE; at its own best fixed-step "
                f"setting on this frontier (CFG 1.0, {best['label']} steps, the strongest honest baseline) FD {best['fd']} "
                f"at {best['nfe']} NFE. The recorded defaults here: FD {now['fd']} at {now['nfe']} NFE, i.e. equal FD at "
                f"{now['nfe'] / best['nfe']:.2f}x its evaluations: on plain generation adaptive stopping does not beat "
                "the best fixed step count; the stopping-rule tables below show where it does (a mixed workload)."]
    out += ["", "Retrained energy models (`python -m models.warm_start`), measured with `eqm eval` before the swap: "
            "`digits-e` from scratch (400 EqM-E steps) scored accuracy 0.110 and FD 25.1 at its defaults (300 samples); "
            "fine-tuned from the implicit `digits` weights (1200 steps, 617 s) 0.982 and FD 0.77 at the defaults now "
            "(600 samples; `digits` 0.69). `em-digits` after 700 warm-up steps: FD 14.18, precision 0.597, recall 0.936 "
            "(300 unconditional, Heun dt 0.02 x 50); after 1500 more (1292 s): FD 2.43, precision 0.847, recall 0.914 "
            "at the same settings.", ""]
    return out


def main() -> int:
    data = json.loads(JSON_PATH.read_text())
    render(data, marks_of(data))
    results.publish(TITLE, section(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
