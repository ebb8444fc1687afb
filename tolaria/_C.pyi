"""Type stub for the compiled extension ``tolaria._C`` (C++ always, CUDA when built with nvcc).

Tensors never cross this boundary as torch objects: the engine takes raw addresses (int),
byte counts (int) and CUDA stream handles (int, ``torch.cuda.Stream.cuda_stream``).
"""

from typing import Any, TypedDict

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

# ---- host health pass (csrc/host_health.*, csrc/health_bindings.cpp) ----

def sum_squares_host(
    addresses: list[int], numels: list[int], dtypes: list[int], threads: int = 0
) -> list[float]:
    """Per-tensor sums of squares of contiguous CPU tensors, read in place with the GIL released:
    ``addresses[i]`` holds ``numels[i]`` elements of dtype code ``dtypes[i]`` (0 float32,
    1 float16, 2 bfloat16, 3 float64). A NaN or an Inf makes its sum non-finite. ``threads=0``:
    automatic (threads past 8 MB). Raises ValueError on mismatched lengths, an unknown code or a
    null address."""

def healthy_rows(address: int, count: int) -> tuple[list[float], list[float]] | None:
    """``(squares, norms)`` of the ``[4, count]`` float64 check result at ``address`` in host
    memory (sums of squares, then NaN, +Inf and -Inf counts) when every count is zero, else None.
    Raises ValueError on a negative count or a null address."""

# ---- object scans (csrc/object_scan.*): per-step questions about Python objects, one C loop ----

def same_members(
    module_dicts: tuple[dict[str, object], ...],
    valued_keys: tuple[str, ...],
    sized_keys: tuple[str, ...],
    values: tuple[object, ...],
    sizes: tuple[int, ...],
) -> bool:
    """Whether each module instance dict still holds, under each of ``sized_keys``, a container of
    the recorded length and, under each of ``valued_keys``, a dict whose values are the very
    objects recorded (both in walk order: module by module, sized keys then valued keys). A
    missing holder, or one that is not a dict, reads as changed."""

def untrusted(
    objects: list[Any] | tuple[Any, ...], trusted_ids: list[int], state: bytearray, seen_ids: list[int]
) -> tuple[list[int], list[int]]:
    """``(compare, repeated)``: the indices whose object is not the trusted one (``trusted_ids[i]``
    while ``state[i] == 1``), and of those with ``state[i] == 0`` the ones whose object is the one
    ``seen_ids[i]`` names; every other of those gets ``seen_ids[i] = id(objects[i])``. TypeError
    when ``objects`` is not a list or a tuple, ValueError when the lengths differ."""

def gradients(params: tuple[object, ...]) -> tuple[list[Any], list[int] | None]:
    """The ``.grad`` of every parameter that has one, in order, and those parameters' indices
    (None when every one has a gradient)."""

# ---- snapshot engine (csrc/host_arena.*, csrc/cuda_snapshot.*, csrc/snapshot_bindings.cpp) ----
# The byte-moving primitives behind tolaria.snapshot.native; the verify/commit policy lives
# in Python. Calls that copy, allocate or wait release the GIL.

class CudaError(RuntimeError):
    """A CUDA runtime call failed; the message names the call and carries cudaGetErrorString.
    Raised by every CUDA call of a build without CUDA, too."""

class ArenaLayout:
    """Where each tensor lives in an arena: tensor ``i`` occupies bytes
    ``[offsets[i], offsets[i] + sizes[i])`` of chunk ``chunk_index[i]``."""

    @property
    def sizes(self) -> list[int]: ...
    @property
    def chunk_index(self) -> list[int]: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def chunk_sizes(self) -> list[int]: ...
    @property
    def alignment(self) -> int: ...
    @property
    def total_bytes(self) -> int:
        """Sum of the chunk sizes (payload plus alignment padding), in bytes."""

def plan_layout(sizes: list[int], alignment: int = 256, chunk_bytes: int = 1 << 30) -> ArenaLayout:
    """Pack byte ``sizes`` (each > 0) in order at offsets that are multiples of ``alignment``
    (a power of two >= 256), in chunks of at most ``chunk_bytes``; a tensor larger than that
    gets a chunk of its own, and no tensor straddles two chunks.

    Raises ValueError for a zero size, a bad alignment or ``chunk_bytes == 0``."""

class HostChunk:
    """One host allocation of an arena. Supports the buffer protocol (writable bytes), so
    ``torch.frombuffer(chunk, dtype=torch.uint8, count=n, offset=o)`` views it; such views keep
    the chunk alive after its arena is gone."""

    @property
    def address(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def pinned(self) -> bool: ...

class HostArena:
    """Host memory for one copy of a layout: one chunk per ``chunk_sizes`` entry.

    With ``pin=True`` every chunk comes from ``cudaHostAlloc`` (portable) on ``device``; if any
    chunk cannot be pinned (no driver, no memory, a build without CUDA) all chunks are pageable
    instead and ``fallback_reason`` says why. Every chunk is zeroed at allocation (padding between
    slots reads as 0); pageable chunks are page aligned (2 MiB with transparent huge pages when
    large), so the first capture pays no page faults. Raises MemoryError when even pageable
    memory is exhausted."""

    def __init__(self, chunk_sizes: list[int], pin: bool = False, device: int = 0) -> None: ...
    @property
    def chunks(self) -> list[HostChunk]: ...
    @property
    def pinned(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def fallback_reason(self) -> str | None:
        """Why pinning was refused (the arena is then pageable), or None."""

class CopyPlan:
    """The host addresses of one arena's slots (from ``layout``), so that each capture or
    restore passes only the live tensors' addresses. ``addresses[i]`` is the first byte of a
    contiguous tensor paired with slot ``i``, or with slot ``slots[i]`` when ``slots`` is given
    (a subset in any order); each copy moves that slot's ``layout.sizes`` bytes. Keeps
    ``arena`` alive.

    Every method raises ValueError when the counts disagree, a slot index is out of range or
    an address is 0."""

    def __init__(self, arena: HostArena, layout: ArenaLayout) -> None: ...
    @property
    def slot_count(self) -> int: ...
    @property
    def total_bytes(self) -> int:
        """Payload bytes (sum of the slot sizes)."""
    @property
    def host_addresses(self) -> list[int]: ...
    @property
    def arena(self) -> HostArena: ...
    def capture_host(self, addresses: list[int], threads: int = 0, slots: list[int] = ...) -> None:
        """memcpy each CPU tensor into its slot; large copies (>= 16 MiB in all) are split by
        bytes across up to ``threads`` threads (0: the hardware's count, at most 8). Blocking."""
    def capture_host_checked(
        self, addresses: list[int], dtypes: list[int], threads: int = 0, slots: list[int] = ...
    ) -> list[float]:
        """capture_host fused with the host health pass: copies each CPU tensor into its slot block
        by block and returns the sum of squares of what it wrote, per address (dtype codes as
        :func:`sum_squares_host`, or -1 for raw bytes: copied, sum 0). Blocking."""
    def restore_host(self, addresses: list[int], threads: int = 0, slots: list[int] = ...) -> None:
        """memcpy each slot back into its CPU tensor. Blocking."""
    def capture_device(self, addresses: list[int], stream: int, device: int, slots: list[int] = ...) -> None:
        """Enqueue device-to-host copies of each CUDA tensor into its slot on ``stream`` (a
        ``cudaStream_t`` as int) with ``cudaMemcpyBatchAsync`` (a ``cudaMemcpyAsync`` loop on
        the legacy default stream 0 or an older runtime). Returns before the copies complete.
        Raises CudaError."""
    def restore_device(self, addresses: list[int], stream: int, device: int, slots: list[int] = ...) -> None:
        """``cudaDeviceSynchronize``, then host-to-device copies of each slot into its CUDA
        tensor on ``stream`` (batched), then ``cudaStreamSynchronize(stream)``. Raises CudaError."""

class CudaEvent:
    """A ``cudaEvent_t`` with timing disabled, created on ``device``. Every call selects
    ``device`` for its duration and restores the thread's previous device. Raises CudaError."""

    def __init__(self, device: int) -> None: ...
    @property
    def device(self) -> int: ...
    def record(self, stream: int) -> None:
        """Capture the work queued on ``stream`` so far."""
    def block_stream(self, stream: int) -> None:
        """Make ``stream`` wait, on the GPU, for the last ``record()``; the host does not wait."""
    def query(self) -> bool:
        """True when the recorded work has completed (or nothing was recorded)."""
    def synchronize(self) -> None:
        """Block the calling thread (GIL released) until the recorded work has completed."""

def cuda_batch_copy_compiled() -> bool:
    """True when copies are batched with ``cudaMemcpyBatchAsync`` (built with CUDA >= 12.8)."""
