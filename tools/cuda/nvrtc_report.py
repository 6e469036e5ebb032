"""Compile crates/teal-kernels/src/cuda/kernels.cu to a cubin with NVRTC and print ptxas's
resource report (registers, shared memory, spills). Needs only libnvrtc (pip package
nvidia-cuda-nvrtc), no GPU:  LIBNVRTC=/path/libnvrtc.so.13 python3 tools/cuda/nvrtc_report.py"""
import ctypes, os, sys

lib = ctypes.CDLL(os.environ.get("LIBNVRTC", "libnvrtc.so.13"))
src = open(os.path.join(os.path.dirname(__file__), "../../crates/teal-kernels/src/cuda/kernels.cu"), "rb").read()
prog = ctypes.c_void_p()
assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None) == 0
opts = [b"-arch=sm_90", b"--std=c++17", b"--ptxas-options=-v"]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
n = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
log = ctypes.create_string_buffer(n.value)
lib.nvrtcGetProgramLog(prog, log)
text = log.value.decode()
pat = sys.argv[1] if len(sys.argv) > 1 else ""
lines = text.splitlines()
for i, l in enumerate(lines):
    if pat in l or (i > 0 and pat in lines[i - 1]) or rc != 0:
        print(l)
print("rc", rc)
