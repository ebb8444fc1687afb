"""Type stub for the compiled extension ``tolaria._C`` (C++ always, CUDA when built with nvcc).

Tensors never cross this boundary as torch objects: the engine takes raw addresses (int),
byte counts (int) and CUDA stream handles (int, ``torch.cuda.Stream.cuda_stream``).
"""

from typing import TypedDict

class BuildInfo(TypedDict):
    version: str
    cuda: bool
    cuda_version: str
    cuda_architectures: str
    cuda_compiler_version: str
    cxx_compiler: str

def build_info() -> BuildInfo:
    """How this extension was built: tolaria version, whether the CUDA part was compiled, the
    CUDA runtime version and architectures ("" without CUDA), and the C++ compiler."""

def cuda_runtime_available() -> bool:
    """True when the CUDA part was compiled and a driver with at least one device is present.
    Returns False (never raises, never prints) on a machine without a driver or GPU."""
