#!/usr/bin/env python
"""What seeing every call of a forward costs, whatever is done with the call: the floor of the
operation level (``lrpcpp.attribute(..., level="operations")``), which rules each call of the model's
forward in a torch function mode.

Run from the repository root::

    PYTHONPATH=python .venv/bin/python benchmarks/bench_mode_floor.py            # markdown to stdout
    PYTHONPATH=python .venv/bin/python benchmarks/bench_mode_floor.py --write    # also its RESULTS.md section
    PYTHONPATH=python .venv/bin/python benchmarks/bench_mode_floor.py --quick    # a tiny model, a few rounds

Interceptors, each of which only makes the call it is given:

* ``python``: a torch function mode written in Python (``bench_models.EmptyMode``);
* ``C``: the same mode with a ``__torch_function__`` written in C (compiled here with
  ``torch.utils.cpp_extension.load_inline``; left out, and said so, where that fails), so that no Python
  runs between torch's dispatch to the mode and the call;
* ``dispatch``: a ``TorchDispatchMode`` (every ATen operator the calls reach).

Two measurements in one process:

* per call: ``Tensor.view``, an addition and ``F.layer_norm`` on small tensors with no interceptor and in
  each one (the best of 5 repeats of 20000 calls);
* all-MiniLM-L6-v2 (sequence 128, the mean-pooled embedding explained, parameters frozen): the plain
  input gradient, ``attribute`` at the registry level, the same with the model's forward in each
  interceptor (entered and left by forward pre- and post-hooks on the model), and ``attribute`` at the
  operation level. The registry level and the operation level compute the same relevance with the same
  rule operators; the operation level's mode also rules each call. Rounds call every variant once, the
  order alternating; a ratio is the median over the rounds of the two calls' ratio in the same round.
"""

import argparse
import datetime
import os
import platform
import sys
import timeit
import types

import bench_models as bm  # benchmarks/bench_models.py
import results_file  # benchmarks/results_file.py
import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py
from torch.utils._python_dispatch import TorchDispatchMode

SECTION = "## The operation level's floor: what seeing every call of a forward costs (CPU)"

_C_SOURCE = r"""
#include <Python.h>
#include <torch/extension.h>

// __torch_function__(self, func, types, args=(), kwargs=None): func(*args, **kwargs)
static PyObject* call_only(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs < 2) {
    PyErr_SetString(PyExc_TypeError, "__torch_function__: expected the mode and the function");
    return nullptr;
  }
  PyObject* kwargs = nargs > 4 && args[4] != Py_None && PyDict_GET_SIZE(args[4]) > 0 ? args[4] : nullptr;
  if (nargs > 3) {
    return PyObject_Call(args[1], args[3], kwargs);
  }
  PyObject* none = PyTuple_New(0);
  PyObject* out = none ? PyObject_Call(args[1], none, kwargs) : nullptr;
  Py_XDECREF(none);
  return out;
}

static PyMethodDef call_only_def = {"call_only", (PyCFunction)(void (*)(void))call_only, METH_FASTCALL, nullptr};

py::object function() {
  return py::reinterpret_steal<py::object>(PyCFunction_NewEx(&call_only_def, nullptr, nullptr));
}
"""


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def c_mode_class():
    """A torch function mode whose ``__torch_function__`` is C code, or the reason there is none."""
    from torch.utils.cpp_extension import load_inline

    try:
        ext = load_inline("lrpcpp_bench_mode_floor", cpp_sources=[_C_SOURCE], functions=["function"])
    except Exception as e:  # (no compiler or ninja: the row is left out, and the report says why)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    function = ext.function()

    class CMode(torch.overrides.TorchFunctionMode):
        def __init__(self):
            super().__init__()
            # (torch calls the mode's __torch_function__ as a bound method: one of the instance, whose
            # function is the C one, takes the place of the class's)
            self.__dict__["__torch_function__"] = types.MethodType(function, self)

    return CMode, None


class CallOnlyDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def per_call_us(modes, number):
    x, y = torch.ones(4, 32), torch.ones(4, 32)
    calls = {
        "Tensor.view": lambda: x.view(128),
        "addition": lambda: x + y,
        "F.layer_norm": lambda: F.layer_norm(x, (32,)),
    }
    out = {}
    for name, make in modes.items():
        mode = make() if make else None
        if mode is not None:
            mode.__enter__()
        try:
            out[name] = {c: min(timeit.repeat(f, number=number, repeat=5)) / number * 1e6 for c, f in calls.items()}
        finally:
            if mode is not None:
                mode.__exit__(None, None, None)
    return out


def model_rounds(case, modes, rounds):
    """Median time (ms) and median ratio to the plain gradient of each variant on ``case`` (parameters
    frozen), over ``rounds`` interleaved rounds after 3 warm-up calls."""
    variants = [
        ("plain gradient", True, lambda c: c.plain()),
        ("attribute, registry level", True, lambda c: c.attribute(level="registry")),
    ]
    variants += [
        (
            f"attribute, registry level, forward in the {name} interceptor",
            True,
            (lambda m: lambda c: c.attribute_mode_floor(m))(make),
        )
        for name, make in modes.items()
    ]
    variants.append(("attribute, operation level", True, lambda c: c.attribute(level="operations")))
    # (every round kept: this measurement does not drop the rounds other processes shared)
    medians, _, _, kept = bm.interleaved_times(case, variants, rounds, 3, max_foreign=1.0, max_rounds=rounds)
    return {v: (medians[v] * 1e3, bm.paired_ratio({"kept": kept}, v, "plain gradient")) for v, _, _ in variants}


def report(model_name, input_text, calls, times, c_missing, rounds, load):
    lines = [
        SECTION,
        "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch.get_num_threads() = {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; commit {results_file.commit()}",
        f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; load average (1 min) {load[0]:.2f} "
        f"before, {load[1]:.2f} after",
        "",
        "Produced by `benchmarks/bench_mode_floor.py` (see its docstring). Interceptors that only make the call "
        "they are given: `python`, a torch function mode written in Python; `C`, the same mode with its "
        "`__torch_function__` written in C; `dispatch`, a `TorchDispatchMode`."
        + (f" The C mode is left out: {c_missing}." if c_missing else ""),
        "",
        "Per call (us; best of 5 repeats):",
        "",
        "| interceptor | " + " | ".join(next(iter(calls.values()))) + " |",
        "|---|" + "---:|" * len(next(iter(calls.values()))),
    ]
    for name, row in calls.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    lines += [
        "",
        f"{model_name}, {input_text}, parameters frozen ({rounds} rounds):",
        "",
        "| variant | time (ms) | time / plain gradient |",
        "|---|---:|---:|",
    ]
    for name, (ms, ratio) in times.items():
        lines.append(f"| {name} | {ms:.1f} | {ratio:.3f} |")
    ops = times["attribute, operation level"][1]
    floor = times["attribute, registry level, forward in the python interceptor"][1]
    lines += [
        "",
        f"Reading: the operation level takes {ops:.3f}x the plain gradient; the registry level with its forward in "
        f"a mode that only makes each call, {floor:.3f}x. What any interceptor adds per call is mostly torch's "
        "dispatch to it (its arguments packed, the mode taken off the stack, the call parsed again), which a "
        "`__torch_function__` written in C does not remove.",
        "",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60, help="rounds of the model's variants (default 60)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="a tiny random model when the weights are missing, 3 rounds")
    ap.add_argument("--write", action="store_true", help=f"also write the section '{SECTION}' of RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = [os.getloadavg()[0]]
    progress("compiling the C mode")
    c_mode, c_missing = c_mode_class()
    modes = {"python": bm.EmptyMode}
    if c_mode is not None:
        modes["C"] = c_mode
    modes["dispatch"] = CallOnlyDispatch
    progress("per call")
    calls = per_call_us({"none": None, **modes}, 2000 if args.quick else 20000)
    progress("the model")
    case = bm.build_case("minilm", bm.QUICK if args.quick else bm.FULL, args.quick)
    rounds = 3 if args.quick else args.rounds
    times = model_rounds(case, modes, rounds)
    load.append(os.getloadavg()[0])
    text = report(case.model_name, case.input_text, calls, times, c_missing, rounds, load)
    sys.stdout.write(text)
    if args.write:
        progress(f"wrote the section '{SECTION}' of {results_file.write_section(SECTION, text)}")


if __name__ == "__main__":
    main()
