"""Compile crates/teal-kernels/src/cuda/kernels.cu to a cubin with NVRTC and print ptxas's
resource report (registers, shared memory, spills). Needs only libnvrtc (pip package
nvidia-cuda-nvrtc), no GPU:  LIBNVRTC=/path/libnvrtc.so.13 python3 tools/cuda/nvrtc_report.py [PATTERN]

With `--ptx FILE [SOURCE]` it writes the PTX of SOURCE (default: the kernels) instead, so that
two versions of a refactor can be compared byte for byte (`cmp`) without a GPU."""
import ctypes, os, sys

lib = ctypes.CDLL(os.environ.get("LIBNVRTC", "libnvrtc.so.13"))
ptx_out = sys.argv[2] if len(sys.argv) > 2 and sys.argv[1] == "--ptx" else None
default = os.path.join(os.path.dirname(__file__), "../../crates/teal-kernels/src/cuda/kernels.cu")
src = open(sys.argv[3] if ptx_out and len(sys.argv) > 3 else default, "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
opts = [b"-arch=compute_90", b"--std=c++17"] if ptx_out else [b"-arch=sm_90", b"--std=c++17", b"--ptxas-options=-v"]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
text = log.value.decode()
if ptx_out:
    if rc != 0:
        sys.exit(text)
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    open(ptx_out, "wb").write(ptx.value)
    sys.exit(0)
pat = sys.argv[1] if len(sys.argv) > 1 else ""
lines = text.splitlines()
for i, l in enumerate(lines):
    if pat in l or (i > 0 and pat in lines[i - 1]) or rc != 0:
        print(l)
print("rc", rc)
