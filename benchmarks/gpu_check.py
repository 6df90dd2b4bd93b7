"""One-shot check of gptforge on a GPU: its CUDA tests, then training and decoding speed, in a few minutes.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out=DIR [--nanogpt=PATH] [--budget_s=400]
    PYTHONPATH=src python3 benchmarks/gpu_check.py --device=cpu --tiny --out=DIR    # the same flow, tiny

It needs only torch, numpy, tiktoken, safetensors, tqdm and pytest (no network, no serving packages). The
stages, each pass/fail/skip with its numbers:

- environment: torch, the device, its peak FLOPS and memory bandwidth, which optional packages are missing;
- imports: `gptforge.train`, `bench`, `sample` and `evaluate` import with fastapi and uvicorn hidden;
- cuda tests: every test marked `cuda` (`pytest -m cuda`; a test file that needs a missing package is a skip);
- train b=N: GPT-2 124M (block 1024, the device's auto dtype and compile) timed by `gptforge bench` at two
  micro-batch sizes: tokens/s, MFU against the device's own peak, peak memory against the memory plan;
- decode: GPT-2 124M (random weights, auto dtype) generating greedily at batch 1 and 32: tokens/s and the
  share of the memory bandwidth the weights and KV cache stream at;
- speedrun: configs/speedrun_gpt2.toml's step (Muon, rope, ReLU², ...) at one micro-step;
- nanogpt: with `--nanogpt=PATH` (a nanoGPT checkout), nanoGPT's train.py on the same shape and batch as the
  first train stage, on the same kind of random tokens, side by side.

Each stage but the first runs in its own process with its own time box, inside an overall `--budget_s`, so
a crash, a hang or an out-of-memory loses that stage only; DIR/gpu_check.json and DIR/gpu_check.md are
rewritten after every stage, and DIR/logs/STAGE.log keeps each stage's output. `--tiny` shrinks every
model, batch and step count so the flow runs on a CPU in about a minute (what the test suite checks).
"""

import argparse
import importlib.abc
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVING = ("fastapi", "uvicorn")
OPTIONAL = ("transformers", "tiktoken", "safetensors", "numpy", "pytest", "hypothesis", *SERVING)
MIN_STAGE_S = 15  # a stage with less time than this left is skipped, not started
# the shapes and counts of a full check, and of --tiny
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
FULL = dict(model=GPT2, batch_sizes=(16, 64), burn_in=3, steps=10, decode_batches=(1, 32), prompt=16,
            new_tokens=256, nanogpt_iters=20)
TINY = dict(model=dict(n_layer=2, n_head=2, n_embd=64, block_size=64), batch_sizes=(2, 4), burn_in=1, steps=3,
            decode_batches=(1, 4), prompt=4, new_tokens=8, nanogpt_iters=8)
# (stage, its time box in seconds in a full check); the train stages are one per micro-batch size
BOXES = {"imports": 30, "cuda tests": 120, "train": 120, "decode": 45, "speedrun": 120, "nanogpt": 120}
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)


# -- the stages, each run in a child process: `gpu_check.py --stage=NAME` --

def stage_imports(args: argparse.Namespace) -> dict[str, Any]:
    class HideServing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in SERVING:
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, HideServing())
    modules = ["gptforge.train", "gptforge.bench", "gptforge.sample", "gptforge.evaluate", "gptforge.cli"]
    for name in modules:
        importlib.import_module(name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in SERVING)
    return {"status": "fail" if leaked else "pass", "numbers": {"modules": len(modules)},
            "note": f"imported {', '.join(modules)} with {', '.join(SERVING)} hidden"
                    + (f"; but {leaked} loaded" if leaked else "")}


def stage_cuda_tests(args: argparse.Namespace) -> dict[str, Any]:
    import pytest

    files = (["tests/test_cuda.py"] if args.tiny else
             sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                    if "pytest.mark.cuda" in p.read_text(encoding="utf-8")))
    tally = TestTally(Path(args.result))
    os.chdir(ROOT)
    pytest.main(["-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                 *files], plugins=[tally])
    return tally.summary()


class TestTally:
    """A pytest plugin that counts outcomes and rewrites the stage's result after every test, so a stage
    stopped by its time box still reports the tests that ran."""

    def __init__(self, result: Path):
        self.result, self.outcomes, self.notes = result, {}, {}

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:  # a test file that does not import: a skip if this machine lacks a package
            missing = re.search(r"No module named '([\w.]+)'", str(report.longrepr))
            self.record(report.nodeid, "skipped" if missing else "failed",
                        f"needs {missing.group(1)}" if missing else str(report.longrepr).splitlines()[-1])

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed:
            self.record(report.nodeid, "failed", str(report.longrepr).strip().splitlines()[-1][:200])
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
            self.record(report.nodeid, "skipped", reason.removeprefix("Skipped: "))
        elif report.when == "call" and self.outcomes.get(report.nodeid) != "failed":
            self.record(report.nodeid, "passed", "")

    def record(self, nodeid: str, outcome: str, note: str) -> None:
        if self.outcomes.get(nodeid) == "failed":
            return
        self.outcomes[nodeid], self.notes[nodeid] = outcome, note
        self.result.write_text(json.dumps(self.summary()))

    def summary(self) -> dict[str, Any]:
        counts = {k: list(self.outcomes.values()).count(k) for k in ("passed", "failed", "skipped")}
        failed = [f"{nodeid}: {self.notes[nodeid]}" for nodeid, o in self.outcomes.items() if o == "failed"]
        skipped = sorted({self.notes[nodeid] for nodeid, o in self.outcomes.items() if o == "skipped"})
        status = "fail" if counts["failed"] else "pass" if counts["passed"] else "skip"
        return {"status": status, "numbers": counts, "note": "; ".join(failed + skipped)}


def stage_train(args: argparse.Namespace) -> dict[str, Any]:
    from gptforge.bench import BenchOptions

    shape = TINY if args.tiny else FULL
    opts = BenchOptions(**shape["model"], batch_size=args.batch_size, device=args.device,
                        burn_in=shape["burn_in"], steps=shape["steps"])
    return timed_bench(opts)


def stage_speedrun(args: argparse.Namespace) -> dict[str, Any]:
    from gptforge.bench import BenchOptions
    from gptforge.config import load_train_config

    shape = TINY if args.tiny else FULL
    tiny = (dict(TINY["model"], batch_size=TINY["batch_sizes"][0], dtype="auto", compile=None) if args.tiny
            else {})
    opts = load_train_config([str(ROOT / "configs" / "speedrun_gpt2.toml")],
                             {"dataset": None, "gradient_accumulation_steps": 1, "device": args.device,
                              "burn_in": shape["burn_in"], "steps": shape["steps"], **tiny},
                             base=BenchOptions())
    return timed_bench(opts)


def timed_bench(opts: Any) -> dict[str, Any]:
    """`gptforge bench` with `opts`: throughput, MFU and peak memory against the plan."""
    import torch

    from gptforge.bench import bench
    from gptforge.flops import PEAK_UNKNOWN

    result = bench(opts)
    numbers = {"micro_batch": opts.batch_size, "block": opts.block_size,
               "tokens_per_s": result.tokens_per_sec, "ms_per_step": result.median_ms,
               "mfu_pct": None if result.mfu is None else 100 * result.mfu,
               "planned_gib": result.planned_bytes / 2**30, "peak_gib": peak_memory_gib(opts.device)}
    if torch.cuda.is_available() and opts.device.startswith("cuda"):
        numbers["device_gib"] = torch.cuda.get_device_properties(opts.device).total_memory / 2**30
    return {"status": "pass", "numbers": numbers,
            "note": "" if result.mfu is not None else f"MFU: {PEAK_UNKNOWN}"}


def peak_memory_gib(device: str) -> float:
    """The process's peak: GPU memory allocated on CUDA, else its resident set."""
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def stage_decode(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gptforge import GPT, GPTConfig
    from gptforge.device import resolve_device, resolve_dtype
    from gptforge.flops import gpu_memory_bandwidth
    from gptforge.generate import decoding_model, generate

    shape = TINY if args.tiny else FULL
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    torch.manual_seed(0)
    model = decoding_model(GPT(GPTConfig(**shape["model"], bias=False)), device, dtype)
    cfg = model.config
    # a decode step reads every weight but the position table once, and the keys and values cached so far
    weights = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)
    element = next(model.parameters()).element_size()
    peak_bw = gpu_memory_bandwidth(torch.cuda.get_device_name(device)) if device.startswith("cuda") else None
    numbers: dict[str, Any] = {"dtype": dtype}
    for batch in shape["decode_batches"]:
        prompt = torch.randint(0, cfg.vocab_size, (batch, shape["prompt"]), device=device)
        generate(model, prompt, 4, temperature=0.0)  # warm-up: kernels, allocator
        synchronize(device)
        t0 = time.perf_counter()
        generate(model, prompt, shape["new_tokens"], temperature=0.0)
        synchronize(device)
        dt = time.perf_counter() - t0
        mean_context = shape["prompt"] + shape["new_tokens"] / 2
        kv = 2 * cfg.n_layer * batch * mean_context * cfg.n_embd * element
        numbers[f"b{batch}_tokens_per_s"] = batch * shape["new_tokens"] / dt
        numbers[f"b{batch}_ms_per_step"] = 1000 * dt / shape["new_tokens"]
        if peak_bw:
            numbers[f"b{batch}_bandwidth_pct"] = 100 * (weights + kv) * shape["new_tokens"] / dt / peak_bw
    return {"status": "pass", "numbers": numbers,
            "note": "" if peak_bw else "bandwidth utilization: peak bandwidth unknown for this device"}


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def stage_nanogpt(args: argparse.Namespace) -> dict[str, Any]:
    """nanoGPT's train.py (copied with its model.py and configurator.py into a scratch directory, where its
    `data/random` is written) on the first train stage's shape and batch."""
    import torch

    from gptforge import GPT, GPTConfig
    from gptforge.bench import write_random_dataset
    from gptforge.device import resolve_compile, resolve_device, resolve_dtype, torch_dtype
    from gptforge.flops import peak_flops_per_sec

    shape = TINY if args.tiny else FULL
    device = resolve_device(args.device)
    dtype, compile = resolve_dtype("auto", device), resolve_compile(None, device)
    model, batch = shape["model"], shape["batch_sizes"][0]
    with tempfile.TemporaryDirectory(prefix="gpu-check-nanogpt-") as tmp:
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(Path(args.nanogpt) / name, tmp)
        write_random_dataset(Path(tmp) / "data" / "random")
        options = {**model, "dataset": "random", "batch_size": batch, "gradient_accumulation_steps": 1,
                   "max_iters": shape["nanogpt_iters"], "eval_interval": 10**9, "eval_iters": 1,
                   "log_interval": 1, "device": device, "dtype": dtype, "compile": compile, "dropout": 0.0,
                   "bias": False, "always_save_checkpoint": False, "wandb_log": False, "out_dir": "out"}
        proc = subprocess.run([sys.executable, "train.py", *(f"--{k}={v}" for k, v in options.items())],
                              cwd=tmp, capture_output=True, text=True)
    print(proc.stdout[-5000:], proc.stderr[-5000:])
    times = [float(ms) for it, ms in NANOGPT_ITER.findall(proc.stdout) if int(it) >= shape["burn_in"]]
    if proc.returncode != 0 or not times:
        return {"status": "fail", "numbers": {}, "note": f"nanoGPT's train.py exited {proc.returncode}: "
                                                         f"{(proc.stderr.strip().splitlines() or [''])[-1]}"}
    ms = statistics.median(times)
    tokens_per_s = batch * model["block_size"] / (ms / 1000)
    with torch.device("meta"):
        gpt = GPT(GPTConfig(**model, bias=False))
    L, H, T = model["n_layer"], model["n_head"], model["block_size"]
    flops_per_token = 6 * gpt.get_num_params() + 12 * L * H * (model["n_embd"] // H) * T
    peak = peak_flops_per_sec(torch.device(device), torch_dtype(dtype))
    mfu = 100 * tokens_per_s * flops_per_token / peak if peak else None
    return {"status": "pass", "note": "nanoGPT uses the exact erf GELU, gptforge GPT-2's tanh",
            "numbers": {"micro_batch": batch, "tokens_per_s": tokens_per_s, "ms_per_step": ms,
                        "mfu_pct": mfu}}


STAGES = {"imports": stage_imports, "cuda tests": stage_cuda_tests, "train": stage_train,
          "decode": stage_decode, "speedrun": stage_speedrun, "nanogpt": stage_nanogpt}


# -- the parent: the environment, then each stage in its own process --

def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gptforge.device import resolve_device, resolve_dtype
    from gptforge.flops import gpu_memory_bandwidth, peak_flops_per_sec

    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    numbers: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "cuda": torch.version.cuda, "device": device, "dtype": dtype}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        numbers |= {"name": props.name, "capability": f"{props.major}.{props.minor}",
                    "memory_gib": props.total_memory / 2**30}
        bandwidth = gpu_memory_bandwidth(props.name)
        numbers["peak_bandwidth_tbps"] = bandwidth / 1e12 if bandwidth else None
    else:
        numbers["name"] = platform.processor() or platform.machine()
    peak = peak_flops_per_sec(torch.device(device), {"bfloat16": torch.bfloat16, "float16": torch.float16,
                                                     "float32": torch.float32}[dtype])
    numbers["peak_tflops"] = peak / 1e12 if peak else None
    note = "; ".join(f"{name} is not installed: what needs it is skipped" for name in missing)
    return {"name": "environment", "status": "pass", "seconds": 0.0, "numbers": numbers, "note": note}


def run_stage(name: str, args: argparse.Namespace, box: float, extra: list[str]) -> dict[str, Any]:
    """`name` in a child process killed after `box` seconds; its output goes to OUT/logs/NAME.log."""
    out = Path(args.out).resolve()
    label = name if not extra else f"{name} {' '.join(extra)}".replace("--batch_size=", "b=")
    stem = out / "logs" / label.replace(" ", "_")
    log, result = stem.with_suffix(".log"), stem.with_suffix(".json")
    log.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, f"--stage={name}", f"--result={result}", f"--out={out}",
               f"--device={args.device}", *(["--tiny"] if args.tiny else []),
               *([f"--nanogpt={args.nanogpt}"] if args.nanogpt else []), *extra]
    t0 = time.perf_counter()
    with log.open("w") as f:
        child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=box)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    seconds = time.perf_counter() - t0
    timed_out = child.returncode == -signal.SIGKILL
    if result.is_file() and not timed_out:
        return {"name": label, **json.loads(result.read_text()), "seconds": seconds}
    partial = json.loads(result.read_text()) if result.is_file() else {"numbers": {}, "note": ""}
    lines = log.read_text(errors="replace").strip().splitlines()
    why = f"timed out after {box:.0f} s" if timed_out else f"exited {child.returncode}"
    last = lines[-1][:300] if lines else "no output"
    return {"name": label, "status": "fail", "seconds": seconds, "numbers": partial["numbers"],
            "note": "; ".join(filter(None, [f"{why}: {last} (logs/{log.name})", partial["note"]]))}


def write_report(out: Path, report: dict[str, Any]) -> None:
    from gptforge.atomic import atomic_write_text

    atomic_write_text(out / "gpu_check.json", json.dumps(report, indent=2) + "\n")
    env = report["stages"][0]["numbers"]
    lines = [f"# gptforge GPU check: {env.get('name')} ({env['device']}, {env['dtype']})", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}, {report['started']}; "
             f"{'--tiny, ' if report['tiny'] else ''}budget {report['budget_s']} s", "",
             "| stage | result | numbers | seconds |", "| --- | --- | --- | ---: |"]
    for stage in report["stages"]:
        numbers = ", ".join(f"{k} {format_number(v)}" for k, v in stage["numbers"].items())
        note = f" ({stage['note']})".replace("|", "/") if stage.get("note") else ""
        lines.append(f"| {stage['name']} | {stage['status']}{note} | {numbers} | {stage['seconds']:.1f} |")
    atomic_write_text(out / "gpu_check.md", "\n".join(lines) + "\n")


def format_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def stage_plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    shape = TINY if args.tiny else FULL
    trains = [("train", [f"--batch_size={b}"]) for b in shape["batch_sizes"]]
    return [("imports", []), ("cuda tests", []), trains[0], ("decode", []), *trains[1:], ("speedrun", []),
            *([("nanogpt", [])] if args.nanogpt else [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where gpu_check.json, gpu_check.md and logs/ go")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu; auto: what there is")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and counts: the flow on a CPU")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout to time side by side")
    parser.add_argument("--budget_s", type=float, default=400, help="the whole check's wall-clock budget")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nanogpt and not (Path(args.nanogpt) / "train.py").is_file():
        sys.exit(f"--nanogpt={args.nanogpt} has no train.py; point it at a nanoGPT checkout")
    if os.environ.get("PYTHONPATH"):  # `PYTHONPATH=src` must still find gptforge from the tests' directories
        os.environ["PYTHONPATH"] = os.pathsep.join(str(Path(entry).resolve())
                                                   for entry in os.environ["PYTHONPATH"].split(os.pathsep))
    if args.tiny:  # on a shared CPU, OpenMP threads that wait for each other cost more than they gain
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.stage:  # a child: run one stage and write its result
        Path(args.result).write_text(json.dumps(STAGES[args.stage](args)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "tiny": args.tiny, "budget_s": args.budget_s,
              "stages": [environment(args)]}
    write_report(out, report)
    for name, extra in stage_plan(args):
        left = deadline - time.monotonic()
        if left < MIN_STAGE_S:
            stage = {"name": name, "status": "skip", "seconds": 0.0, "numbers": {},
                     "note": f"out of time ({args.budget_s:.0f} s budget)"}
        else:
            stage = run_stage(name, args, min(BOXES[name], left), extra)
        report["stages"].append(stage)
        write_report(out, report)
        print(f"{stage['name']}: {stage['status']} ({stage['seconds']:.1f} s) {stage['numbers']} "
              f"{stage['note']}", flush=True)
    compare_nanogpt(report)
    write_report(out, report)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")


def compare_nanogpt(report: dict[str, Any]) -> None:
    """gptforge's tokens/s over nanoGPT's at the same shape and batch, into the nanogpt stage."""
    stages = {s["name"]: s for s in report["stages"]}
    nanogpt = stages.get("nanogpt")
    if nanogpt is None or nanogpt["status"] != "pass":
        return
    ours = next((s for s in report["stages"] if s["name"].startswith("train") and s["status"] == "pass"
                 and s["numbers"]["micro_batch"] == nanogpt["numbers"]["micro_batch"]), None)
    if ours is not None:
        ratio = ours["numbers"]["tokens_per_s"] / nanogpt["numbers"]["tokens_per_s"]
        nanogpt["numbers"]["gptforge_vs_nanogpt"] = ratio


if __name__ == "__main__":
    main()
