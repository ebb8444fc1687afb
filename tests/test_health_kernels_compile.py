"""The health kernels compile for the GPUs tolaria targets, checked on a machine without one.

The interpreter runs the kernels' Python semantics on CPU tensors, but it accepts programs the
compiler rejects (types, pointer casts, layouts) and says nothing about the code the GPU would
run. Here every kernel variant the plan launches (recorded from a real check: the argument
types the plan passes, and the 16-byte alignment of its pointers, on which Triton's launcher
specializes as it does on a GPU) is lowered to PTX and a cubin for sm_80 (A100) and sm_90
(H100/H200) with the ptxas shipped in the Triton wheel, and the PTX is read for what the design
promises: no atomics (the result is deterministic), and every full block of the hot loop and of
the counting loop read with 16-byte vector loads.

The compile runs in a subprocess without TRITON_INTERPRET: kernels decorated in interpreter mode
cannot be lowered, and the interpreter patches triton.language in some releases.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tolaria.health import check_tensors

triton = pytest.importorskip("triton")

ARCHS = (80, 90)
ROOT = Path(__file__).resolve().parents[1]
_TYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}
_KERNELS = ("_health_partials_kernel", "_health_finish_kernel")

# Runs in the subprocess: argv[1] is the recorded calls, stdout one JSON object per compile.
_COMPILE = r"""
import json, re, subprocess, sys, tempfile
from pathlib import Path
import triton
import triton.backends.nvidia
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tolaria.health import triton_kernels as kernels

CUOBJDUMP = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"

def constant(value):
    return tl.dtype(value["dtype"]) if isinstance(value, dict) else value

def resources(cubin):
    # "REG:42 STACK:0 SHARED:0 LOCAL:0 ...": registers per thread; STACK/LOCAL are spills.
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", file.name],
                              capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", text)}

for call in json.loads(sys.argv[1]):
    fn = getattr(kernels, call["kernel"])
    constants = {name: constant(value) for name, value in call["constants"].items()}
    signature = dict(call["signature"], **{name: "constexpr" for name in constants})
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()},
        attrs={(index,): [["tt.divisibility", 16]] for index in call["aligned"]},
    )
    for arch in call["archs"]:
        options = {"num_warps": call["num_warps"]}
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        ptx = compiled.asm["ptx"]
        # Each instruction's opcode, past an optional "@%p" predicate.
        opcodes = [words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
                   for words in (line.split() for line in ptx.splitlines()) if words]
        print(json.dumps({
            "kernel": call["kernel"], "constants": call["constants"], "arch": arch,
            "cubin_bytes": len(compiled.asm["cubin"]),
            "resources": resources(compiled.asm["cubin"]),
            "atomics": sum(op.startswith(("atom.", "red.")) for op in opcodes),
            "vector_loads": ptx.count("ld.global.v4.b32") + ptx.count("ld.global.v2.b64"),
        }))
"""


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, arg_names: list[str], calls: list[dict[str, Any]]) -> None:
        self.name, self.arg_names, self.calls = name, arg_names, calls

    def __getitem__(self, grid: object) -> Any:
        def launch(*args: object, num_warps: int, **constants: object) -> None:
            signature, aligned = {}, []
            for index, (name, value) in enumerate(zip(self.arg_names, args, strict=False)):
                if isinstance(value, torch.Tensor):
                    signature[name] = "*" + _TYPE_NAMES[value.dtype]
                    if value.data_ptr() % 16 == 0:
                        aligned.append(index)
                else:
                    assert isinstance(value, int) and abs(value) < 2**31, (name, value)
                    signature[name] = "i32"
            encoded = {
                key: {"dtype": str(value)} if isinstance(value, triton.language.dtype) else value
                for key, value in constants.items()
            }
            call = {"kernel": self.name, "signature": signature, "constants": encoded, "aligned": aligned}
            self.calls.append(dict(call, num_warps=num_warps))

        return launch


def _recorded_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The distinct launches of one check over tensors of every kernel dtype (and an integer)."""
    from tolaria.health import triton_kernels as kernels

    if not kernels.INTERPRETED:
        pytest.skip("records the plan's launches on CPU tensors, which needs TRITON_INTERPRET=1")
    calls: list[dict[str, Any]] = []
    for name in _KERNELS:
        monkeypatch.setattr(kernels, name, _Recorder(name, getattr(kernels, name).arg_names, calls))
    tensors = [(f"t{i}", torch.ones(5000, dtype=dtype)) for i, dtype in enumerate(kernels.KERNEL_DTYPES)]
    check_tensors(tensors + [("int", torch.ones(3, dtype=torch.int64))], backend="triton", blocking=False)
    distinct = {json.dumps(call, sort_keys=True): call for call in calls}
    return list(distinct.values())


@pytest.fixture(scope="module")
def compiled() -> list[dict[str, Any]]:
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this Triton wheel has no NVIDIA backend to compile with")
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _recorded_calls(monkeypatch)
    for call in calls:
        call["archs"] = list(ARCHS)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(calls)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


def _rows(compiled: list[dict[str, Any]], kernel: str) -> list[dict[str, Any]]:
    return [row for row in compiled if row["kernel"] == kernel]


def _itemsize(name: str) -> int:
    return int(triton.language.dtype(name).primitive_bitwidth) // 8


def test_every_dtype_and_the_finish_pass_compile_for_each_arch(compiled: list[dict[str, Any]]) -> None:
    from tolaria.health import triton_kernels as kernels

    partials = {(r["constants"]["ELEMENT"]["dtype"], r["arch"]) for r in _rows(compiled, _KERNELS[0])}
    elements = {str(kernels.partials_constants(dtype, 1)["ELEMENT"]) for dtype in kernels.KERNEL_DTYPES}
    assert elements == {"fp32", "fp16", "bf16", "fp64"}
    assert partials == {(name, arch) for name in elements for arch in ARCHS}
    assert sorted(r["arch"] for r in _rows(compiled, _KERNELS[1])) == list(ARCHS)
    assert all(r["cubin_bytes"] > 0 for r in compiled)


def test_no_atomics_anywhere(compiled: list[dict[str, Any]]) -> None:
    # Determinism rests on it: partials land in their own slots, the finish sums in a fixed order.
    assert [r for r in compiled if r["atomics"]] == []


def test_full_blocks_are_read_with_16_byte_vector_loads(compiled: list[dict[str, Any]]) -> None:
    from tolaria.health import triton_kernels as kernels

    threads = kernels.NUM_WARPS * 32
    for row in _rows(compiled, _KERNELS[0]):
        constants = row["constants"]
        block_bytes = constants["BLOCK"] * _itemsize(constants["ELEMENT"]["dtype"])
        per_loop = block_bytes // (threads * 16)
        # Two loops read full blocks (the sum of squares, the sick path's recount).
        assert row["vector_loads"] == 2 * per_loop, row


def test_no_spills_and_registers_leave_room_for_occupancy(compiled: list[dict[str, Any]]) -> None:
    # At most 64 registers a thread keeps >= 8 programs of 128 threads resident per SM: with
    # 16-byte loads in flight per thread, several times the bytes HBM latency needs.
    for row in compiled:
        assert row["resources"]["STACK"] == 0 and row["resources"]["LOCAL"] == 0, row
        assert 0 < row["resources"]["REG"] <= 64, row
