"""`eqm serve` as a newcomer meets it: real processes, real ports, a real headless browser.

- the port opens only once a worker is ready, so the first request is queued (never a 503);
- ``:PORT/metrics`` carries the workers' engine metrics (one page);
- ``/docs`` renders in Chromium with no network but loopback, and "Try it out" works;
- ``kill -9`` of ``eqm serve`` leaves no process of the stack behind;
- unusable configuration (``--device cuda`` without CUDA, a busy port) exits 2 before anything starts;
- every ``--help`` builds without importing torch.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models import resolve_checkpoint
from service.cli import COMMANDS
from service.embedded_redis import free_port
from tests.browser import chromium_page
from tests.clientstack import stop

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120

needs_digits = pytest.mark.skipif(not resolve_checkpoint("digits").is_file(),
                                  reason="the bundled digits model (models/weights/digits.safetensors) is missing")


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    # `python` in the README's examples is this interpreter, as in the environment the README installs into.
    env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", "")))
    env.update(settings)
    return env


def _serve(args: list[str], log: Path, **settings: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", *args], env=_env(**settings), cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_port(port: int, proc: subprocess.Popen, log: Path) -> None:
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"eqm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if _port_open(port):
            return
        time.sleep(0.05)
    pytest.fail(f"port {port} never opened:\n{log.read_text()[-3000:]}")




def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (from /proc; zombies count as gone)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# -- one `eqm serve`, as a newcomer starts it ---------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = _serve(["--port", str(port), "--device", "cpu"], log, EQM_HEARTBEAT_S="0.5", **WEBHOOK_ENV)
    try:
        _wait_port(port, proc, log)
        yield f"http://127.0.0.1:{port}", proc, log
    finally:
        code = stop(proc, signal.SIGINT)                 # what Ctrl-C sends
        assert code == 0, log.read_text()[-3000:]


@needs_digits
def test_first_request_after_the_port_opens_is_queued_and_metrics_count_it(served):
    base, _, log = served
    # The port opened a moment ago: the very first request must be accepted, not "no live worker" (503).
    resp = httpx.post(f"{base}/v1/generations", json={"labels": [3], "n": 2, "max_steps": 20,
                                                      "grad_norm_threshold": 0}, timeout=30)
    assert resp.status_code == 202, resp.text
    assert "ready: API on" in log.read_text()
    job = resp.json()
    before_done = time.monotonic()
    while httpx.get(job["links"]["self"], timeout=10).json()["status"] != "done":
        assert time.monotonic() - before_done < 60, "the job never finished"
        time.sleep(0.1)
    # One metrics page: the API's own series and the worker's engine series, labelled by worker.
    text = httpx.get(f"{base}/metrics", timeout=10).text
    labels = {"model": "digits", "task": "generate"}
    assert _value(text, "eqm_steps_per_sample_count", **labels) == 2
    assert _value(text, "eqm_steps_per_sample_sum", **labels) == 40
    assert _value(text, "eqm_api_jobs_submitted_total", kind="generate") == 1
    assert _value(text, "eqm_worker_metrics_up") == 1
    workers = {s.labels["worker"] for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "eqm_steps_per_sample_count"}
    assert len(workers) == 1
    # The worker's own endpoint binds where the API binds (loopback), not every interface.
    assert len(workers) == 1 and next(iter(workers)).startswith("127.0.0.1:")
    assert httpx.get(f"{base}/sd/workers", timeout=10).json() == []       # already on this page: not twice
    # A second generation moves the counter again.
    resp = httpx.post(f"{base}/v1/generations?wait=true", json={"labels": [5], "max_steps": 7,
                                                                "grad_norm_threshold": 0}, timeout=60)
    assert resp.status_code == 200, resp.text
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert _value(text, "eqm_steps_per_sample_count", **labels) == 3
    assert _value(text, "eqm_steps_per_sample_sum", **labels) == 47
    # Docs and schema requests are counted by their route, not as "unmatched".
    httpx.get(f"{base}/openapi.json", timeout=10)
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert _value(text, "eqm_api_requests_total", route="/openapi.json") >= 1


@needs_digits
def test_docs_render_offline_in_chromium_and_try_it_out_works(served):
    base, _, _ = served
    with chromium_page() as b:
        page = b.page
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock", timeout=30_000)
        paths = page.locator(".opblock-summary-path").all_inner_texts()
        assert {"/v1/generations", "/v1/jobs/{job_id}", "/healthz", "/metrics"} <= {p.replace("\u200b", "") for p in paths}
        # This server has no keys: no "Authorize" button and no lock icon on any operation.
        assert page.locator("button.authorize").count() == 0
        assert page.locator(".authorization__btn").count() == 0
        # "Try it out" on GET /healthz: a real call from the page to the server, answered 200.
        block = page.locator(".opblock-get", has=page.locator(".opblock-summary-path[data-path='/healthz']"))
        block.locator(".opblock-summary").click()
        block.locator("button.try-out__btn").click()
        block.locator("button.execute").click()
        status = block.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for(timeout=30_000)
        assert status.inner_text().strip().startswith("200")
        page.goto(f"{base}/redoc")
        page.locator("h2", has_text="Generate images of classes").first.wait_for(timeout=30_000)   # ReDoc renders
        assert b.blocked == [], b.blocked                 # nothing was fetched from outside the server
        assert b.page_errors == [], b.page_errors


# -- stops --------------------------------------------------------------------------------------------

@needs_digits
def test_kill_9_of_serve_leaves_no_process_behind(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(["--port", str(port), "--device", "cpu"], log, EQM_HEARTBEAT_S="0.5")
    try:
        _wait_port(port, proc, log)
        stack = _descendants(proc.pid)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in stack}
        assert "redis-server" in names and len(stack) >= 3, names   # Redis, the supervisor, a worker
        proc.kill()
        proc.wait()
        end = time.monotonic() + 20
        while _alive(stack) and time.monotonic() < end:
            time.sleep(0.1)
        assert not _alive(stack), f"still running after kill -9 of eqm serve: {_alive(stack)}"
        assert not _port_open(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- configuration that cannot work: exit 2 at once ---------------------------------------------------

def _run_cli(args: list[str], timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def test_device_cuda_without_cuda_exits_2_before_starting():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    port = free_port()
    result = _run_cli(["serve", "--device", "cuda", "--port", str(port)])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["eqm serve: error: device 'cuda': CUDA is not available on this machine "
                     f"(torch {torch.__version__}); use --device cpu"], result.stderr
    assert not _port_open(port)


def test_busy_ports_exit_2_before_starting():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run_cli(["serve", "--device", "cpu", "--port", str(port)])
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"eqm serve: error: cannot listen on 127.0.0.1:{port}") and \
            "pass --port another port" in result.stderr
        result = _run_cli(["serve", "--device", "cpu", "--port", str(free_port()), "--metrics-port", str(port)])
        assert result.returncode == 2 and "pass --metrics-port another port" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_every_help_builds_without_importing_torch():
    """`eqm --help` and every command's --help: parsers only, torch is left to the handlers."""
    code = ("import sys, contextlib, io\n"
            "from service.cli import build_parser\n"
            "out = {}\n"
            f"for argv in [[]] + [[c] for c in {[c.replace('_', '-') for c in COMMANDS]!r}]:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n"
            "            build_parser().parse_args(argv + ['--help'])\n"
            "        except SystemExit as exc:\n"
            "            assert exc.code == 0, argv\n"
            "    out[' '.join(argv)] = buf.getvalue()\n"
            "print(repr(sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules)))\n"
            "import json; print(json.dumps(out))\n")
    result = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    heavy, helps = result.stdout.splitlines()[0], json.loads(result.stdout.splitlines()[1])
    assert heavy == "[]", f"--help imported {heavy}"
    assert all(text.startswith("usage: eqm") for text in helps.values())
    assert "--threads THREADS" in helps["serve"] and "default 1" in helps["serve"]
    assert "train-digits" in helps[""] and "eval-digits" in helps[""]


def test_cpu_thread_default_is_one_where_the_worker_reads_it():
    from service.worker import WorkerConfig
    assert WorkerConfig(redis_url="redis://x").threads == 1


# -- README.md: every example runs (or, where it needs the released weights, parses) ---------------------

README = ROOT / "README.md"
NEEDS_RELEASED_WEIGHTS = ("EqM-XL-2", "0400000.pt", "--noise noise.npy", "cifar10_main_training_147000.pt")
SECTIONS_WITH_EXAMPLES = {"On a fresh machine": ".ci/run", "Using the API": "served", "Tests": ".ci/run",
                          "Client conventions": "served", "Sampling runs: 50,000 images for an FID": "served",
                          "Offline sampling: `eqm sample`": "run", "Weights: `eqm convert`": "parsed",
                          "Energy Matching models": "run", "Quality: `eqm eval`": "run"}
# A served section's command that starts a server is checked against the parser (the test's own
# `eqm serve` runs with the same settings) rather than started a second time.
STARTS_A_SERVER = re.compile(r"^[^#\n]*\beqm serve\b.*$", re.M)
# The settings the README's webhook example starts its server with (a receiver on loopback port 9000).
WEBHOOK_ENV = {"EQM_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8, "EQM_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1:9000"}


def readme_blocks(language: str = "bash") -> list[tuple[str, str]]:
    """``(section heading, block)`` for every fenced block in ``language``, in README order."""
    return [(heading, block) for heading, lang, block in readme_examples() if lang == language]


def readme_examples() -> list[tuple[str, str, str]]:
    """``(section heading, language, block)`` for every fenced bash or python block, in README order."""
    out, heading, block, lang = [], "", None, ""
    for line in README.read_text(encoding="utf-8").splitlines():
        if block is not None:
            if line.strip() == "```":
                out.append((heading, lang, "\n".join(block)))
                block = None
            else:
                block.append(line)
        elif line.strip() in ("```bash", "```python"):
            block, lang = [], line.strip()[3:]
        elif line.startswith("## "):
            heading = line[3:].strip()
    return out


def readme_commands(block: str) -> list[str]:
    """One string per command: comments dropped, lines ending in ``\\`` or ``|`` joined to the next."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").rstrip() + " " if line.rstrip().endswith(("\\", "|")) else line
        if not line.rstrip().endswith(("\\", "|")):
            commands.append(current.strip())
            current = ""
    return commands


def _bash(script: str, cwd: Path, timeout_s: float = 300) -> subprocess.CompletedProcess:
    # `eqm` as the installed console script would run it, from this source tree; curl fails on HTTP errors.
    prelude = (f'set -euo pipefail\neqm() {{ "{sys.executable}" -m service.cli "$@"; }}\n'
               'curl() { command curl --fail-with-body --max-time 120 "$@"; }\n')
    return subprocess.run(["bash", "-c", prelude + script], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout_s)


def test_readme_examples_are_all_covered():
    blocks = readme_blocks()
    assert blocks and {heading for heading, _ in blocks} <= set(SECTIONS_WITH_EXAMPLES), \
        "a README section with examples that no test runs: add it to SECTIONS_WITH_EXAMPLES and run it"
    fresh = [c for heading, block in blocks if heading == "On a fresh machine" for c in readme_commands(block)]
    assert fresh == ['pip install "torch==2.13.0" && pip install -e .', "eqm serve",
                     "sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium prometheus "
                     "docker-compose",
                     'pip install -e ".[test]"', "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "On a fresh machine" in ci and "pytest" in ci            # .ci/run takes its install lines from there


def printed_lines(block: str) -> dict[str, list[str]]:
    """``command -> lines it prints``: the ``# wrote ...`` comments written right under a command."""
    commands, out, last, continued = iter(readme_commands(block)), {}, None, False
    for line in block.splitlines():
        text = line.strip()
        if continued:                                  # the rest of a command written over several lines
            continued = text.endswith(("\\", "|"))
        elif text.startswith("# wrote ") and last is not None:
            out.setdefault(last, []).append(text[2:])
        elif text and not text.startswith("#"):
            last, continued = next(commands), text.endswith(("\\", "|"))
    return out


@needs_digits
def test_readme_offline_examples_run(tmp_path):
    """The offline sections' examples, in order, in one folder with the environment's `eqm` and `python`:
    each runs, and prints the `# wrote ...` lines written under it."""
    from service.cli import build_parser
    ran = checked = 0
    for heading, block in readme_blocks():
        if SECTIONS_WITH_EXAMPLES.get(heading) not in ("run", "parsed"):
            continue
        printed = printed_lines(block)
        for command in readme_commands(block):
            assert command.startswith(("eqm ", "python -c ")), command
            if heading == "Quality: `eqm eval`" and command.split("#")[0].strip() == "eqm eval":
                continue            # run and its printed table checked by test_readme_eval_output_is_what_eqm_eval_prints
            if SECTIONS_WITH_EXAMPLES[heading] == "parsed" or any(w in command for w in NEEDS_RELEASED_WEIGHTS):
                build_parser().parse_args(shlex.split(command, comments=True)[1:])     # the flags exist, at least
                continue
            result = _bash(command, tmp_path)
            assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
            shown = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("wrote ")]
            assert shown == printed.get(command, shown), f"{command}: the README says it prints " \
                                                         f"{printed[command]}, it printed {shown}"
            ran, checked = ran + 1, checked + (command in printed)
    assert ran >= 5 and checked >= 3
    assert len(list((tmp_path / "digits_png").glob("*.png"))) == 10
    assert (tmp_path / "clean.npy").is_file() and (tmp_path / "mix.npy").is_file()
    assert len(list((tmp_path / "completed").glob("*.png"))) == 2           # the inpainting example


@needs_digits
def test_readme_eval_output_is_what_eqm_eval_prints(tmp_path):
    """The table under the README's first `eqm eval` is what that command prints, line for line (the judge and
    the sampler are deterministic: a changed default, weight or metric shows here)."""
    block = next(block for heading, block in readme_blocks() if heading == "Quality: `eqm eval`")
    lines = block.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("eqm eval"))
    shown = []
    for line in lines[first + 1:]:
        if not line.startswith("# "):
            break
        shown.append(line[2:].rstrip())
    assert len(shown) >= 5, shown
    result = _bash(lines[first].split("#")[0], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line.rstrip() for line in result.stdout.splitlines() if line.strip()] == shown


@needs_digits
def test_readme_api_examples_run_against_eqm_serve(served, tmp_path):
    """Every bash and python example of the served sections, top to bottom in one fresh shell, in an empty
    folder: each example finds what it needs made by an earlier one (no file prepared by the test)."""
    base, _, _ = served
    script = []
    from service.cli import build_parser
    for heading, lang, block in readme_examples():
        if SECTIONS_WITH_EXAMPLES.get(heading) != "served":
            continue
        if lang == "python":
            assert "http://127.0.0.1:8000" in block, block
            block = block.replace("http://127.0.0.1:8000", base)
            script.append(f"python3 - <<'PYTHON_EXAMPLE'\n{block}\nPYTHON_EXAMPLE")
            continue
        for start in STARTS_A_SERVER.findall(block):
            words = shlex.split(start.split("eqm serve", 1)[1])
            build_parser().parse_args(["serve", *words])
            assert all(f"{k}=" in start for k in WEBHOOK_ENV), start
        block = STARTS_A_SERVER.sub(":", block)
        script.append(re.sub(r"^API=\S+", f"API={base}", block, flags=re.M))
    assert any(s.startswith("python3 - <<") for s in script), "the OpenAI client example was not run"
    assert "API=http://127.0.0.1:8000" not in "\n".join(script)
    assert not list(tmp_path.iterdir())
    result = _bash("\n".join(script), tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "event: done" in result.stdout and '"status":"done"' in result.stdout
    assert "eqm_steps_per_sample_count" in result.stdout            # the README's one metrics page
    # The scores example's comment: the generated 5 scores in distribution, the uniform noise 0.0.
    scores = json.loads(re.search(r'"scores":(\[[^\]]*\])', result.stdout).group(1))
    assert [s["index"] for s in scores] == [0, 1] and scores[1]["in_distribution"] == 0.0, scores
    assert scores[0]["in_distribution"] > 0.05 and scores[0]["grad_norm"] < scores[1]["grad_norm"], scores
    # What the README says of a JSON body sent without its Content-Type.
    resp = httpx.post(f"{base}/v1/generations", content=b'{"labels": [3]}', timeout=10)
    assert resp.status_code == 422
    assert resp.json()["message"] == "body: expected a JSON object; send it with the header " \
                                     "'Content-Type: application/json'"


@needs_digits
def test_double_ctrl_c_with_a_running_job_stops_everything_at_once(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _serve(["--port", str(port), "--device", "cpu"], log, EQM_HEARTBEAT_S="0.5")
    try:
        _wait_port(port, proc, log)
        stack = _descendants(proc.pid)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/generations",
                          json={"labels": [1], "n": 32, "max_steps": 1000, "grad_norm_threshold": 0}, timeout=30)
        job_url = resp.json()["links"]["self"]                 # links are absolute
        end = time.monotonic() + 30
        while httpx.get(job_url, timeout=10).json()["status"] != "running":
            assert time.monotonic() < end, "the job never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)                                   # the API has stopped; the worker has 10 s of grace
        proc.send_signal(signal.SIGINT)                   # ... which a second Ctrl-C cuts short
        code = proc.wait(timeout=30)
        assert code == 0, log.read_text()[-3000:]
        assert not _alive(stack), f"still running after eqm serve exited: {_alive(stack)}"   # nothing prints later
        text = log.read_text()
        assert "handed back to the queue" in text and "Traceback" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_digits
def test_readme_adaptive_compute_example_stops_early(served):
    """The README's `?wait=true` example shows the adaptive stop: every image stops below its threshold
    before its step cap."""
    base, _, _ = served
    block = next(b for h, b in readme_blocks() if h == "Using the API" and "grad_norm_threshold" in b)
    body = json.loads(re.search(r"/v1/generations\?wait=true\".*?-d '(\{[^']*grad_norm_threshold[^']*\})'",
                                block, re.S).group(1))
    job = httpx.post(f"{base}/v1/generations?wait=true", json=body, timeout=90).json()
    assert job["status"] == "done", job
    for image in job["images"]:
        assert image["stopped_early"] and image["steps"] < body["max_steps"], image
        assert image["grad_norm"] < body["grad_norm_threshold"], image
