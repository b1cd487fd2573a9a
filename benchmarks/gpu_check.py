"""The GPU check's steps and report (driven by ``benchmarks/gpu_check.sh``).

Usage: ``python benchmarks/gpu_check.py --out DIR [--dry-run]`` runs every step, each in
its own process under a time limit, and writes ``DIR/gpu_check.json``;
``python benchmarks/gpu_check.py --step NAME --out DIR [--dry-run]`` runs one step.

Steps (the GPU sizes; ``--dry-run`` runs them all on the CPU at tiny sizes, so that CI
keeps the script working):

``env``
    Versions, the device, which paths exist (CuPy, torch CUDA, Triton).
``tests``
    The array kernel's and the Triton kernel's tests on the device (torch CUDA, CuPy;
    Triton compiled for the device: ``TRITON_INTERPRET=0``), and the backend tests.
``verify``
    ``certattn verify --backend cupy --rows 10000000`` (dry run: NumPy, 100 rows, TV-TAIL).
``agreement``
    Every path (array kernel on NumPy, torch, CuPy; Triton) against the NumPy path on the
    benchmark's rows: rows whose ``k`` differs (0 expected) and the largest relative
    ``tail_upper`` difference; and the Triton polynomial exp against its one-operation-at-
    a-time NumPy reference, bit for bit, on the device.
``speed``
    ``certify_topk`` on (8192, 32768) float32 and float16 Gaussian logits (sigma 3,
    eps 0.01) per GPU path, against the HBM read floor (``x.max(-1)`` on the same device),
    medians of repeats measured in this one run.
``evaluate``
    ``certattn evaluate --model smollm2`` where the ``[hf]`` extra and the model are present
    (``evaluate`` has no device option yet: it runs where certattn.hf puts the model; a
    dry run only probes for the model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = {  # name: time limit in seconds (GPU run); the whole check stays under 8 minutes
    "env": 20, "tests": 170, "verify": 110, "agreement": 60, "speed": 60, "evaluate": 40,
}
EPS = 0.01


def sizes(dry: bool) -> dict[str, Any]:
    """Rows and keys of the agreement and speed steps."""
    if dry:
        return {"agree": (64, 512), "speed": (8, 512), "repeats": 2}
    return {"agree": (1024, 32768), "speed": (8192, 32768), "repeats": 5}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _cupy() -> Any:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:  # ImportError, CUDARuntimeError: no CuPy or no GPU
        return None


def _cuda(torch: Any) -> bool:
    try:
        return torch is not None and bool(torch.cuda.is_available())
    except Exception:  # a driver error
        return False


def _triton() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def paths(dry: bool) -> list[tuple[str, str, str]]:
    """``(name, library, kernel)`` of every path to check here: the GPU paths, or in a
    dry run their CPU stand-ins (torch on the CPU, Triton in its interpreter)."""
    torch = _torch()
    out = [("array-numpy", "numpy", "array")]
    if _cupy() is not None:
        out.append(("array-cupy", "cupy", "array"))
    if _cuda(torch):
        out.append(("array-torch-cuda", "torch-cuda", "array"))
        if _triton():
            out.append(("triton-torch-cuda", "torch-cuda", "triton"))
    elif dry and torch is not None:
        out.append(("array-torch-cpu", "torch-cpu", "array"))
        if _triton():
            out.append(("triton-interpreter", "torch-cpu", "triton"))
    return out


def gaussian(rows: int, n: int, seed: int = 0) -> Any:
    import numpy as np

    return (np.random.default_rng(seed).standard_normal((rows, n), dtype=np.float32) * 3.0)


def _on(lib: str, x: Any) -> Any:
    if lib == "numpy":
        return x
    if lib == "cupy":
        import cupy

        return cupy.asarray(x)
    import torch

    return torch.from_numpy(x).to("cuda" if lib == "torch-cuda" else "cpu")


def _host(a: Any) -> Any:
    from certattn._array import to_numpy

    return to_numpy(a)


def _sync(lib: str) -> None:
    if lib == "torch-cuda":
        import torch

        torch.cuda.synchronize()
    elif lib == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def _certify(x: Any, kernel: str) -> Any:
    import certattn

    os.environ["CERTATTN_KERNEL"] = kernel
    return certattn.certify_topk(x, EPS)


# --- steps ---------------------------------------------------------------------------


def step_env(dry: bool, out: Path) -> dict[str, Any]:
    import numpy as np

    torch = _torch()
    cupy = _cupy()
    info: dict[str, Any] = {
        "python": platform.python_version(), "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None), "triton": _triton(),
        "cupy": getattr(cupy, "__version__", None), "cuda": _cuda(torch),
        "kernel_paths": [p[0] for p in paths(dry)],
    }
    if _cuda(torch):
        props = torch.cuda.get_device_properties(0)
        info["device"] = {"name": props.name, "memory_gib": props.total_memory / 2**30,
                          "capability": list(torch.cuda.get_device_capability(0))}
    return info


def step_tests(dry: bool, out: Path) -> dict[str, Any]:
    files = ["tests/test_topk_array.py", "tests/test_topk_triton.py"]
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if dry:  # the script's plumbing only: CI runs these tests in full anyway
        cmd += ["-k", "routing or constants"]
    else:  # compiled for the device, the backend tests of every namespace too
        env["TRITON_INTERPRET"] = "0"
        cmd += ["tests/test_topk.py", "-k", "backend or triton or array or cuda or cupy"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = (r.stdout + r.stderr).strip().splitlines()
    return {"rc": r.returncode, "summary": lines[-1] if lines else "", "tail": lines[-30:]}


def step_verify(dry: bool, out: Path) -> dict[str, Any]:
    if dry:
        args = ["--backend", "numpy", "--rows", "100", "--only", "TV-TAIL"]
    elif _cupy() is not None:
        args = ["--backend", "cupy", "--rows", "10000000"]
    else:
        return {"skipped": "CuPy with a GPU not available"}
    cmd = [sys.executable, "-m", "certattn", "verify", *args, "--json", "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    try:
        results = json.loads(r.stdout)
    except ValueError:
        results = None
    return {"rc": r.returncode, "args": args, "results": results,
            "stderr": r.stderr.strip().splitlines()[-10:]}


def step_agreement(dry: bool, out: Path) -> dict[str, Any]:
    import numpy as np

    rows, n = sizes(dry)["agree"]
    x = gaussian(rows, n, seed=1)
    x[: rows // 8, n // 2:] = -np.inf  # causal-like rows
    x[rows // 8 : rows // 4] *= 3.0  # wider rows
    ref = _certify(x, "numpy")
    report: dict[str, Any] = {"rows": rows, "n": n, "eps": EPS, "paths": {}}
    for name, lib, kernel in paths(dry):
        cert = _certify(_on(lib, x), kernel)
        k, tail = _host(cert.k), _host(cert.tail_upper)
        rel = np.abs(tail - ref.tail_upper) / np.maximum(ref.tail_upper, 1e-300)
        report["paths"][name] = {
            "k_mismatches": int((k != ref.k).sum()), "tail_max_rel_diff": float(rel.max()),
            "sound_vs_eps": bool((tail <= EPS).all()),
        }
    report["exp_poly_bits"] = _exp_bits(dry)
    return report


def _exp_bits(dry: bool) -> dict[str, Any]:
    """The Triton polynomial exp on the device against its NumPy reference, bit for bit."""
    torch = _torch()
    if _triton() is None or torch is None or not (_cuda(torch) or dry):
        return {"skipped": "Triton with torch (CUDA, or the interpreter in a dry run) absent"}
    import numpy as np

    import certattn._topk_triton as tt

    sys.path.insert(0, str(ROOT))
    from tests.test_topk_triton import _exp_reference

    a = np.random.default_rng(2).uniform(-700.0, 709.0, 20000 if dry else 2_000_000)
    dev = "cuda" if _cuda(torch) else "cpu"
    got = tt.exp_poly(torch.from_numpy(a).to(dev)).cpu().numpy()
    ref = _exp_reference(a)
    return {"args": int(a.size), "device": dev,
            "bit_mismatches": int((got.view(np.int64) != ref.view(np.int64)).sum())}


def step_speed(dry: bool, out: Path) -> dict[str, Any]:

    rows, n = sizes(dry)["speed"]
    repeats = sizes(dry)["repeats"]
    report: dict[str, Any] = {"rows": rows, "n": n, "eps": EPS, "cases": {}}
    gpu = [p for p in paths(dry) if p[1] != "numpy"] or [("array-numpy", "numpy", "array")]
    for dtype in ("float32", "float16"):
        x_host = gaussian(rows, n).astype(dtype)
        for name, lib, kernel in gpu:
            x = _on(lib, x_host)
            floor = _median(lambda x=x: x.max(-1), lib, repeats)  # one read of the logits
            took = _median(lambda x=x, kernel=kernel: _certify(x, kernel), lib, repeats)
            report["cases"][f"{name}-{dtype}"] = {
                "certify_s": took, "floor_s": floor, "ratio_to_floor": took / floor,
            }
    return report


def _median(fn: Any, lib: str, repeats: int) -> float:
    fn()  # warm-up (compiles)
    _sync(lib)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(lib)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_evaluate(dry: bool, out: Path) -> dict[str, Any]:
    try:
        import transformers  # noqa: F401

        from certattn.models._smollm2 import smollm2_gguf

        smollm2_gguf()
    except Exception as err:  # no [hf] extra, or no SmolLM2 package/file here
        return {"skipped": f"[hf] or the SmolLM2 model not available: {type(err).__name__}"}
    if dry:
        return {"skipped": "dry run: the model is only run on a GPU machine"}
    cmd = [sys.executable, "-m", "certattn", "evaluate", "--model", "smollm2", "--json",
           "--tokens", "256"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    try:
        results = json.loads(r.stdout)
    except ValueError:
        results = None
    return {"rc": r.returncode, "results": results, "stderr": r.stderr.splitlines()[-10:]}


# --- driver --------------------------------------------------------------------------


def run_step(name: str, dry: bool, out: Path) -> dict[str, Any]:
    """One step in a child process under its time limit: its result, or why none."""
    limit = STEPS[name] * (4 if dry else 1)
    target = out / f"step-{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out)]
    if dry:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        rc, tail = r.returncode, (r.stdout + r.stderr).strip().splitlines()[-20:]
    except subprocess.TimeoutExpired:
        rc, tail = None, [f"timed out after {limit} s"]
    result: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 2), "rc": rc}
    if rc == 0 and target.exists():
        result["result"] = json.loads(target.read_text())
        result["status"] = status(result["result"])
    else:
        result["status"] = "failed"
        result["tail"] = tail
    return result


def status(result: dict[str, Any]) -> str:
    """``ok``, ``skipped`` or ``failed`` for one step's result."""
    if "skipped" in result:
        return "skipped"
    if result.get("rc", 0) != 0:
        return "failed"
    bad = [p for p in result.get("paths", {}).values() if p["k_mismatches"]]
    bits = result.get("exp_poly_bits", {}).get("bit_mismatches", 0)
    return "failed" if bad or bits else "ok"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    ap.add_argument("--step", choices=list(STEPS))
    ap.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    args = ap.parse_args()
    if args.dry_run:  # Triton's interpreter stands in for a GPU (read at triton's import)
        os.environ["TRITON_INTERPRET"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step:
        result = globals()[f"step_{args.step}"](args.dry_run, args.out)
        (args.out / f"step-{args.step}.json").write_text(json.dumps(result, indent=1))
        return
    t0 = time.perf_counter()
    report: dict[str, Any] = {"dry_run": args.dry_run, "steps": {}}
    for name in args.only or list(STEPS):
        report["steps"][name] = run_step(name, args.dry_run, args.out)
        print(f"gpu_check: {name}: {report['steps'][name]['status']} "
              f"({report['steps'][name]['seconds']} s)", flush=True)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        report["ok"] = all(s["status"] != "failed" for s in report["steps"].values())
        # written after every step: a run cut short still leaves what it measured
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"gpu_check: report in {args.out / 'gpu_check.json'}; ok={report['ok']}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
