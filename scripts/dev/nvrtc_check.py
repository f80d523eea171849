#!/usr/bin/env python3
"""Compile-checks the CUDA C kernels embedded in model/src/ops/*.rs with NVRTC
(no GPU needed): `python3 scripts/dev/nvrtc_check.py [path/to/libnvrtc.so]`.
NVRTC comes from PyPI's nvidia-cuda-nvrtc wheel (unzip it anywhere)."""
import ctypes, re, sys, pathlib

lib = ctypes.CDLL(sys.argv[1] if len(sys.argv) > 1 else "libnvrtc.so.13")
root = pathlib.Path(__file__).resolve().parents[2]
srcs = {}
for f in (root / "model/src/ops").rglob("*.rs"):
    text = f.read_text()
    for name, body in re.findall(r'const (\w+): &str = r#"(.*?)"#;', text, re.S):
        srcs[name] = body
prelude = srcs.pop("PRELUDE", "")
ok = True
for name, body in srcs.items():
    src = (prelude + body).encode()
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, f"{name}.cu".encode(), 0, None, None) == 0
    opts = [b"--std=c++17", b"-arch=sm_90"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    print(f"{name}: {'ok' if rc == 0 else 'FAILED'}")
    if log.value.strip():
        print(log.value.decode())
    ok &= rc == 0
sys.exit(0 if ok else 1)
