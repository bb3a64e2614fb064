r"""The prepared device check: every GPU fact the project needs, in one time-boxed run.

    python benchmarks/gpu_check.py --out benchmarks/results/<date>     # CUDA: <= 7 min wall
    python benchmarks/gpu_check.py --out /tmp/check --smoke             # CPU, tiny: < 90 s

Writes ``DIR/gpu-check.json`` (per step: status, seconds, time box, peak GPU and host memory,
its results or its error), ``DIR/gpu-check.md`` (the same, readable), ``DIR/gpu-check.log``
(the worker's output) and ``DIR/pytest-gpu.xml``. Steps, in order, each reusing the code named:

  decode       ``decode_throughput.py``: JPEG decode + ViT-L preprocessing img/s, threads
               against processes, 1 / 4 / all cores
  env          GPU name, memory, capability; torch, CUDA, cuDNN versions; cores; commit
  pytest       ``pytest -m gpu tests/test_gpu.py`` (a subprocess): the CUDA paths against CPU
  extract      ViT-L/14 at 336 px (``dinov2-l``, random init), bf16: ``run_extraction`` of
               generated JPEGs into a local store (img/s, MB/s written) ÷ the bare forward
               (``Encoder.run_layers``, same batches and precision, pre-decoded tensors on the
               same GPU), storing one layer and the CLI's seven; and bare bf16 ÷ fp32
  loader       ``FeatureLoader`` into GPU memory, ViT-L-sized rows (stores written by
               ``lfm_store_vs_memory.write_stores``): staged (``stage()``) and streamed GB/s
  ffm-n2, ffm-n14, ffm-n22
               ``ffm_cached_vs_live.measure``, DINOv2-L -> CLIP-L at n = 2, 14, 22: cached and
               live steps/s, measured ÷ FLOP-predicted speed-up
  tree-2, tree-4
               ``stitchtrain.tree.bench.run_bench`` (``tree bench``): 2 and 4 ViT-L encoders,
               bf16, batch 1 and 32, read at layer 23 (the readout layer), VST-14 and VST-22

Time boxes: a worker process runs the steps in order and reports each start and end (JSON
lines, ``DIR/gpu-check.steps.jsonl``) to this process, which watches it. A step that raises is
recorded ``failed`` and the next one runs; a step past its time box, or past the run's budget
(``--budget-s``, 400 s on CUDA), has the worker killed (with its subprocesses), is recorded
``timeout``, and a fresh worker goes on with the next step; a worker that dies (a CUDA fault)
has its step recorded ``crashed``, likewise; a step the budget no longer allows is
``skipped``. Peak memory of a step: ``torch.cuda.max_memory_allocated`` since its start, and
the worker's peak resident set since its start (VmHWM, reset through /proc/self/clear_refs).

``--smoke`` runs the same steps, through the same code, on the CPU with tiny models and small
sizes (``tests/test_gpu_check.py`` runs it), so the script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
for folder in (BENCHMARKS, REPO):  # benchmark modules import each other by name
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

STATUSES = ("ok", "failed", "timeout", "crashed", "skipped")
DEFAULT_BUDGET_S = {False: 400.0, True: 85.0}  # whole run: CUDA (7 min with margin), smoke


class StepFailed(Exception):
    """A step that ran but whose outcome is a failure (failing tests); keeps its results."""

    def __init__(self, message: str, result: dict[str, Any]):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Sizes:
    """What one step runs on, full (CUDA) or smoke (CPU, tiny)."""

    smoke: bool

    def pick(self, full, smoke):
        return smoke if self.smoke else full


# -- the steps ---------------------------------------------------------------------------------
def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_decode(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    import decode_throughput

    cores = len(os.sched_getaffinity(0))
    workers = sorted({1, min(4, cores), cores}) if not sizes.smoke else [1, 2]
    args = decode_throughput.parse_args(
        ["--model", sizes.pick("dinov2-l", "dinov2-tiny"),
         "--images", str(sizes.pick(256, 12)), "--size", sizes.pick("500x375", "160x120"),
         "--workers", ",".join(map(str, workers)), "--repeats", str(sizes.pick(2, 1)),
         "--dir", str(scratch)]
    )  # fmt: skip
    return decode_throughput.measure(args)


def step_env(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    import platform

    import psutil
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_cores": len(os.sched_getaffinity(0)),
        "host_memory_gib": psutil.virtual_memory().total / 2**30,
        "gpus": [],
    }
    info["commit"] = None
    if shutil.which("git"):
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        info["commit"] = commit.stdout.strip() or None
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        info["gpus"].append(
            {"name": props.name, "memory_gib": total / 2**30, "free_gib": free / 2**30,
             "capability": f"{props.major}.{props.minor}",
             "multiprocessors": props.multi_processor_count,
             "bf16": torch.cuda.is_bf16_supported()}
        )  # fmt: skip
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
             "power.limit", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip()
    return info


def step_pytest(sizes: Sizes, scratch: Path, out: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ElementTree

    report = out / "pytest-gpu.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
               "tests/test_gpu.py", f"--junitxml={report}"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if not report.exists():  # pytest stopped before writing it (collection error, bad option)
        result = {"returncode": done.returncode, "output_tail": output[-3000:]}
        raise StepFailed(f"pytest wrote no report (rc {done.returncode})", result)
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failing = [
        f"{case.get('classname')}::{case.get('name')}: "
        + (case.find("failure") if case.find("failure") is not None else case.find("error")).get(
            "message", ""
        )[:300]
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    result = {
        "returncode": done.returncode,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"] + counts["errors"],
        "skipped": counts["skipped"],
        "failing": failing,
        "output_tail": output[-3000:],
    }
    if done.returncode != 0 or result["failed"]:
        raise StepFailed(f"{result['failed']} CUDA test(s) failed (rc {done.returncode})", result)
    return result


def step_extract(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    """Extraction ÷ bare forward of dinov2-l (random init), bf16, on generated JPEGs."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from _jpegs import make_jpeg_folder

    from featcache.encoders import load_encoder
    from featcache.extract import ExtractConfig, plan_extraction, run_extraction
    from featcache.extract.decode import _prepare

    device = _device()
    name = sizes.pick("dinov2-l", "dinov2-tiny")
    batch_size, shard_size = sizes.pick(32, 8), sizes.pick(256, 16)
    images, repeats, precision = sizes.pick(768, 32), sizes.pick(2, 1), "bf16"
    layer_sets = {
        "one layer": sizes.pick([22], [4]),
        "seven layers": sizes.pick([2, 6, 10, 14, 18, 22, 24], [1, 2, 3, 4, 5, 6]),
    }
    encoder = load_encoder(name, random_init=True, device=device)
    folder = make_jpeg_folder(scratch / "jpegs", images, size=sizes.pick((500, 375), (160, 120)))
    workers = len(os.sched_getaffinity(0))

    def config(layers: list[int], out: Path) -> ExtractConfig:
        return ExtractConfig(
            models=[name], data=str(folder), out=str(out), layers=layers, batch_size=batch_size,
            shard_size=shard_size, device=device.type, precision=precision, num_workers=workers,
        )  # fmt: skip

    plan = plan_extraction(config(layer_sets["one layer"], scratch / "plan"), [encoder])
    # the batches extraction forms (per shard, consecutive rows), decoded by its own _prepare
    with ThreadPoolExecutor(workers) as pool:
        inputs = [
            item.inputs[0] for item in pool.map(lambda r: _prepare(r, [encoder]), plan.records)
        ]
    batches = [
        torch.stack(inputs[offset : min(offset + batch_size, start + shard_size)]).to(device)
        for start in range(0, len(inputs), shard_size)
        for offset in range(start, min(start + shard_size, len(inputs)), batch_size)
    ]

    def bare(layers: list[int], mode: str, count: int | None = None) -> float:
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode(), encoder.autocast(mode):
            for batch in batches[:count]:
                encoder.run_layers(batch, layers)
        _sync(device)
        return time.perf_counter() - started

    def extract(layers: list[int], out: Path, shards=None) -> tuple[float, dict]:
        shutil.rmtree(out, ignore_errors=True)
        run_plan = plan_extraction(config(layers, out), [encoder])
        started = time.perf_counter()
        summary = run_extraction(run_plan, shards=shards)
        seconds = time.perf_counter() - started
        store = summary["stores"][0]
        shutil.rmtree(out)
        return seconds, {"bytes": store["bytes"], "timings": summary["timings"],
                         "precision_error": store.get("precision_error")}  # fmt: skip

    bare(layer_sets["one layer"], precision, 2)  # warm-up: kernels, autotuning
    extract(layer_sets["one layer"], scratch / "warm", shards=[0])
    rows = {}
    for label, layers in layer_sets.items():
        bare_s, extract_runs = [], []
        for _ in range(repeats):
            bare_s.append(bare(layers, precision))
            extract_runs.append(extract(layers, scratch / "out"))
        seconds, facts = min(extract_runs, key=lambda run: run[0])
        rows[label] = {
            "layers": layers,
            "arrays": len(layers) + 2,  # + final, pooled
            "bare_images_per_s": len(inputs) / min(bare_s),
            "extract_images_per_s": len(inputs) / seconds,
            "ratio": min(bare_s) / seconds,
            "mb_per_s_written": facts["bytes"] / seconds / 1e6,
            "mb_per_image": facts["bytes"] / len(inputs) / 1e6,
            "timings_s": facts["timings"],
            "bare_s": bare_s,
            "extract_s": [run[0] for run in extract_runs],
            "precision_error": facts["precision_error"],
        }
    layers = layer_sets["one layer"]
    fp32_s = bare(layers, "fp32")
    return {
        "model": name,
        "random_init": True,
        "device": str(device),
        "precision": precision,
        "images": len(inputs),
        "jpeg_size": list(sizes.pick((500, 375), (160, 120))),
        "batch_size": batch_size,
        "shard_size": shard_size,
        "num_workers": workers,
        "goal": "extract img/s ÷ bare forward img/s >= 0.9 (bf16)",
        "rows": rows,
        "bare_fp32_images_per_s": len(inputs) / fp32_s,
        "bare_bf16_speedup_over_fp32": fp32_s / min(rows["one layer"]["bare_s"]),
    }


def step_loader(sizes: Sizes, scratch: Path) -> dict[str, Any]:
    """FeatureLoader staged and streamed into (GPU) memory, GB/s."""
    import lfm_store_vs_memory as lfm
    import numpy as np

    from featcache.store import FeatureStore
    from stitchtrain.data.loader import FeatureLoader, Field

    device = _device()
    position = sizes.pick(12, 2)
    args = lfm.parse_args(
        ["--images", str(sizes.pick(512, 64)), "--grid", str(sizes.pick(24, 4)),
         "--width", str(sizes.pick(1024, 32)), "--target-width", str(sizes.pick(1024, 32)),
         "--shard-size", str(sizes.pick(128, 16)), "--position", str(position)]
    )  # fmt: skip
    source, target, write_s = lfm.write_stores(args, scratch)
    layer = f"layers/{position}"
    fields = [Field("source", FeatureStore.open(source), layer),
              Field("target", FeatureStore.open(target), layer)]  # fmt: skip
    rows = np.arange(args.images)
    batch = sizes.pick(256, 16)

    def loader(budget: int) -> FeatureLoader:
        return FeatureLoader(fields, rows, batch, device=device, memory_budget=budget, seed=0)

    def epoch(feed: FeatureLoader, number: int) -> tuple[float, int]:
        before = feed.stats.bytes_read
        _sync(device)
        started = time.perf_counter()
        for _ in feed.epoch(number):
            pass
        _sync(device)
        return time.perf_counter() - started, feed.stats.bytes_read - before

    staged = loader(1 << 60)
    _sync(device)
    started = time.perf_counter()
    staged.stage()
    _sync(device)
    stage_s = time.perf_counter() - started
    staged_epoch_s, _ = epoch(staged, 0)
    streamed = loader(1)
    runs = [epoch(streamed, number) for number in range(sizes.pick(3, 2))]
    streamed_s, streamed_bytes = min(runs[1:])  # the first pass warms the reader
    return {
        "device": str(device),
        "rows": args.images,
        "tokens": 1 + args.grid**2,
        "width": args.width,
        "store_dtype": args.dtype,
        "stored_bytes": staged.stats.bytes_read,
        "in_memory_bytes": staged.nbytes,
        "write_s": write_s,
        "page_cache": "warm (the stores were just written)",
        "staged_s": stage_s,
        "staged_gb_per_s": staged.stats.bytes_read / stage_s / 1e9,
        "staged_epoch_gb_per_s": staged.nbytes / staged_epoch_s / 1e9,
        "streamed_epoch_s": streamed_s,
        "streamed_gb_per_s": streamed_bytes / streamed_s / 1e9,
        "streamed_delivered_gb_per_s": staged.nbytes / streamed_s / 1e9,
        "streamed_read_decode_gb_per_s": streamed.stats.gb_per_s,
        "streamed_read_workers": getattr(streamed, "read_workers", None),
    }


def _ffm_step(full_position: int) -> Callable[[Sizes, Path], dict[str, Any]]:
    def step(sizes: Sizes, scratch: Path) -> dict[str, Any]:
        import ffm_cached_vs_live as ffm

        # tiny encoders have 6 blocks: the same relative depth of the 24-block position
        position = sizes.pick(full_position, max(1, min(5, round(full_position * 6 / 24))))
        args = ffm.parse_args(
            ["--source", sizes.pick("dinov2-l", "dinov2-tiny"),
             "--target", sizes.pick("clip-l", "clip-tiny"),
             "--source-img-size", "0", "--target-img-size", "0", "--depth", "0",
             "--position", str(position), "--images", str(sizes.pick(96, 16)),
             "--batch-size", str(sizes.pick(32, 8)), "--steps", str(sizes.pick(6, 1)),
             "--repeats", str(sizes.pick(2, 1)), "--warmup", "1", "--dir", str(scratch),
             "--threads", str(sizes.pick(len(os.sched_getaffinity(0)), 1))]
        )  # fmt: skip
        result = ffm.measure(args)
        keep = ("source", "target", "position", "device", "autocast", "batch_size", "train_rows",
                "flops_per_step", "predicted_speedup", "cached_steps_per_s", "live_steps_per_s",
                "measured_speedup", "ratio", "ratio_paired_median", "cached_loader_wait_fraction",
                "phase_seconds_per_step", "loss_relative_difference",
                "same_batches_cached_vs_live", "goal")  # fmt: skip
        return {key: result[key] for key in keep}

    return step


def _tree_step(count: int) -> Callable[[Sizes, Path], dict[str, Any]]:
    def step(sizes: Sizes, scratch: Path) -> dict[str, Any]:
        from stitchtrain.tree.bench import run_bench
        from stitchtrain.tree.bench_config import BenchConfig

        names = sizes.pick(["dinov2-l", "clip-l", "siglip2-l", "dinov3-l"],
                           ["dinov2-tiny", "clip-tiny", "siglip2-tiny", "dinov3-tiny"])  # fmt: skip
        config = BenchConfig(
            encoders=names[:count], positions=sizes.pick((14, 22), (2, 4)),
            batch_sizes=sizes.pick((1, 32), (1, 4)), warmup=sizes.pick(3, 1),
            repeats=sizes.pick(10, 2), precision="bf16", random_init=True,
            readout_layer=sizes.pick(23, 5),
        )  # fmt: skip
        return run_bench(config, log=lambda line: print(line, flush=True))

    return step


STEPS: dict[str, tuple[Callable, float, float]] = {
    # name: (function, time box in s on CUDA, time box in s in smoke mode)
    "decode": (step_decode, 45, 20),
    "env": (step_env, 30, 10),
    "pytest": (step_pytest, 130, 40),
    "extract": (step_extract, 110, 25),
    "loader": (step_loader, 50, 15),
    "ffm-n2": (_ffm_step(2), 60, 15),
    "ffm-n14": (_ffm_step(14), 60, 15),
    "ffm-n22": (_ffm_step(22), 60, 15),
    "tree-2": (_tree_step(2), 60, 15),
    "tree-4": (_tree_step(4), 90, 20),
}


# -- the worker: runs steps in order, reports each ---------------------------------------------
def _peaks_reset() -> None:
    import torch

    from stitchtrain.tree.measure import _reset_peak_rss

    if torch.cuda.is_initialized():  # not before the first step that uses CUDA: decode forks
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()


def _peaks() -> dict[str, float | None]:
    import torch

    from stitchtrain.tree.measure import _rss_kib

    host = _rss_kib("VmHWM")
    cuda = torch.cuda.is_initialized()
    return {
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
        "peak_host_mib": host / 1024 if host is not None else None,
    }


def _emit(events: Path, record: dict[str, Any]) -> None:
    with events.open("a") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def worker(names: list[str], sizes: Sizes, out: Path, deadline: float) -> None:
    """Run ``names`` in order; a start and an end record per step go to the events file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sizes.smoke:  # one intra-op thread: on a small shared CI machine more threads thrash
        os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    import featcache._compat  # noqa: F401  (torchvision import fix, before timm loads)

    if sizes.smoke:
        torch.set_num_threads(1)

    events = out / "gpu-check.steps.jsonl"
    for name in names:
        function = STEPS[name][0]
        if deadline - time.time() < 3:
            _emit(events, {"event": "end", "step": name, "status": "skipped",
                           "error": "the run's budget was spent"})  # fmt: skip
            continue
        scratch = out / "scratch" / name
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        _emit(events, {"event": "start", "step": name, "time": time.time()})
        print(f"== {name}", flush=True)
        _peaks_reset()
        started = time.perf_counter()
        record: dict[str, Any] = {"event": "end", "step": name}
        try:
            arguments = (sizes, scratch, out) if name == "pytest" else (sizes, scratch)
            record.update(status="ok", result=function(*arguments))
        except StepFailed as failure:
            record.update(status="failed", error=str(failure), result=failure.result)
        except Exception as err:  # recorded, not fatal: the next step runs
            record.update(status="failed", error=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc()[-4000:])  # fmt: skip
        record.update(seconds=time.perf_counter() - started, **_peaks())
        shutil.rmtree(scratch, ignore_errors=True)
        _emit(events, record)
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


# -- the watcher: starts workers, enforces time boxes, writes the report -----------------------
def _read_events(path: Path, offset: int) -> tuple[list[dict], int]:
    if not path.exists():
        return [], offset
    with path.open() as handle:
        handle.seek(offset)
        text = handle.read()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line], offset + len(complete)


def _kill(process: subprocess.Popen) -> None:
    """Stop the worker and every process it started (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_check(
    out: Path, sizes: Sizes, names: list[str], budget_s: float, boxes: dict[str, float]
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    events = out / "gpu-check.steps.jsonl"
    events.unlink(missing_ok=True)
    started = time.time()
    deadline = started + budget_s
    records: dict[str, dict[str, Any]] = {}
    offset, position = 0, 0
    with (out / "gpu-check.log").open("w") as log:
        while position < len(names):
            command = [
                sys.executable,
                __file__,
                "--worker",
                "--out",
                str(out),
                "--steps",
                ",".join(names[position:]),
                "--deadline",
                str(deadline),
            ]
            command += ["--smoke"] if sizes.smoke else []  # fmt: skip
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
            current, step_started, ended, before = None, 0.0, False, len(records)
            while not ended:
                new, offset = _read_events(events, offset)
                for event in new:
                    if event["event"] == "start":
                        current, step_started = event["step"], event["time"]
                    else:
                        records[event.pop("step")] = event
                        current = None
                if process.poll() is not None:
                    new, offset = _read_events(events, offset)
                    for event in new:
                        if event["event"] == "end":
                            records[event.pop("step")] = event
                            current = None
                    ended = True
                elif current is not None and time.time() > min(
                    deadline, step_started + boxes[current]
                ):
                    _kill(process)
                    spent = time.time() - step_started
                    limit = (
                        f"its time box of {boxes[current]:.0f} s"
                        if step_started + boxes[current] <= deadline
                        else f"the run's budget of {budget_s:.0f} s"
                    )
                    records[current] = {
                        "status": "timeout",
                        "error": f"killed after {spent:.0f} s at {limit}",
                        "seconds": spent,
                    }
                    ended = True
                else:
                    time.sleep(0.1)
            if current is not None and current not in records:  # the worker died in it
                records[current] = {
                    "status": "crashed",
                    "error": f"the worker exited with {process.returncode} during this step "
                    "(see gpu-check.log)",
                }
            if len(records) == before:  # it died before its first step: a restart would too
                for name in names[position:]:
                    records[name] = {"status": "crashed", "error": "the worker failed to start "
                                     f"(exit {process.returncode}; see gpu-check.log)"}  # fmt: skip
                break
            position = max(names.index(name) for name in records) + 1
            if time.time() > deadline:
                break
    for name in names:
        records.setdefault(name, {"status": "skipped", "error": "the run's budget was spent"})
    steps = [{"name": name, "time_box_s": boxes[name], **records[name]} for name in names]
    return {
        "check": "gpu_check",
        "smoke": sizes.smoke,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_s": time.time() - started,
        "budget_s": budget_s,
        "statuses": {name: records[name]["status"] for name in names},
        "steps": steps,
    }


# -- the readable report -----------------------------------------------------------------------
def _f(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headline(name: str, result: dict[str, Any] | None) -> str:
    """One line of the step's main figures."""
    if not result:
        return ""
    if name == "decode":
        best = {}
        for row in result["rows"]:
            best[row["way"]] = row  # the most workers measured
        return "; ".join(
            f"{way} x{row['workers']}: {row['images_per_s']:.0f} img/s "
            f"({row['images_per_s_per_worker']:.0f}/worker, scaling {row['scaling']:.2f})"
            for way, row in best.items()
        )
    if name == "env":
        gpus = ", ".join(f"{g['name']} {g['memory_gib']:.0f} GiB" for g in result["gpus"])
        return f"{gpus or 'no GPU'}; torch {result['torch']}, CUDA {result['cuda']}, " \
               f"cuDNN {result['cudnn']}, {result['cpu_cores']} cores"  # fmt: skip
    if name == "pytest":
        return f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    if name == "extract":
        parts = [
            f"{label}: extract {row['extract_images_per_s']:.0f} img/s "
            f"({row['mb_per_s_written']:.0f} MB/s written) ÷ bare "
            f"{row['bare_images_per_s']:.0f} img/s = **{row['ratio']:.2f}**"
            for label, row in result["rows"].items()
        ]
        return "; ".join(parts) + f"; bare bf16 ÷ fp32 {result['bare_bf16_speedup_over_fp32']:.2f}x"
    if name == "loader":
        return (
            f"staged {result['staged_gb_per_s']:.2f} GB/s (stored bytes) into "
            f"{result['device']}; streamed {result['streamed_gb_per_s']:.2f} GB/s "
            f"({result['streamed_delivered_gb_per_s']:.2f} GB/s float32 delivered)"
        )
    if name.startswith("ffm"):
        return (
            f"n={result['position']}: cached {result['cached_steps_per_s']:.2f} steps/s, "
            f"live {result['live_steps_per_s']:.2f}; measured {result['measured_speedup']:.2f}x "
            f"vs FLOPs {result['predicted_speedup']:.2f}x: **{result['ratio']:.2f}**"
        )
    if name.startswith("tree"):
        cells = []
        for system in result["systems"]:
            latency = ", ".join(
                f"b{batch} {measured['latency_ms']:.1f} ms"
                for batch, measured in system["by_batch"].items()
            )
            cells.append(f"{system['system']}: {latency}")
        return "; ".join(cells)
    return ""


def write_markdown(report: dict[str, Any], path: Path) -> None:
    mode = "smoke (CPU, tiny models)" if report["smoke"] else "full"
    env = next((s.get("result") for s in report["steps"] if s["name"] == "env"), None) or {}
    lines = [
        f"# Device check ({mode}), {report['started_utc']}",
        "",
        f"Wall time {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"GPU: {', '.join(g['name'] for g in env.get('gpus', [])) or 'none'}; torch "
        f"{env.get('torch')}, CUDA {env.get('cuda')}; commit {env.get('commit')}. "
        "Every figure is in gpu-check.json; `benchmarks/gpu_check.py` says how each is measured.",
        "",
        "| step | status | seconds (box) | peak GPU MiB | peak host MiB | main figures |",
        "|---|---|---:|---:|---:|---|",
    ]
    for step in report["steps"]:
        lines.append(
            f"| {step['name']} | {step['status']} | {_f(step.get('seconds'), 0)} "
            f"({step['time_box_s']:.0f}) | {_f(step.get('peak_gpu_mib'), 0)} | "
            f"{_f(step.get('peak_host_mib'), 0)} | {headline(step['name'], step.get('result'))} |"
        )
    problems = [step for step in report["steps"] if step["status"] != "ok"]
    if problems:
        lines += ["", "## Not ok", ""]
        for step in problems:
            lines += [f"### {step['name']}: {step['status']}", "", "```", step.get("error", ""),
                      *(step.get("result") or {}).get("failing", []),
                      step.get("traceback", "")[-1500:], "```", ""]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu-check.json / .md")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, small sizes")
    parser.add_argument("--steps", default=",".join(STEPS), help="steps to run, in order")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="whole run, s (default 400; smoke 85)"
    )
    parser.add_argument(
        "--time-box", action="append", default=[], metavar="STEP=SECONDS",
        help="replace one step's time box (repeatable)",
    )  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [name for name in args.steps.split(",") if name]
    unknown = [name for name in names if name not in STEPS]
    if unknown:
        parser.error(f"expected --steps from {', '.join(STEPS)}; got {', '.join(unknown)}")
    args.names = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes, out = Sizes(args.smoke), Path(args.out)
    if args.worker:
        worker(args.names, sizes, out, args.deadline)
        return 0
    boxes = {name: float(STEPS[name][2 if args.smoke else 1]) for name in STEPS}
    for item in args.time_box:
        name, _, seconds = item.partition("=")
        if name not in STEPS or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"error: expected --time-box STEP=SECONDS with STEP in {list(STEPS)}")
        boxes[name] = float(seconds)
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[args.smoke]
    report = run_check(out, sizes, args.names, budget, boxes)
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_markdown(report, out / "gpu-check.md")
    width = max(len(name) for name in args.names)
    for step in report["steps"]:
        print(f"{step['name']:<{width}}  {step['status']:<8} {_f(step.get('seconds'), 1):>6} s  "
              f"{headline(step['name'], step.get('result'))}")  # fmt: skip
    print(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
