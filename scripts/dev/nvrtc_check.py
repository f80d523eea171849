#!/usr/bin/env python3
"""Compile-checks the CUDA C kernels embedded in model/src/ops/*.rs with NVRTC
(no GPU needed): `python3 scripts/dev/nvrtc_check.py [path/to/libnvrtc.so]`.
NVRTC comes from PyPI's nvidia-cuda-nvrtc wheel (unzip it anywhere).
With `--ptxas PATH [--only NAME]` (ptxas from the nvidia-cuda-nvcc wheel) it
also assembles each source's PTX and prints registers and spills per kernel;
`--cubin DIR` keeps each source's cubin there (DIR/NAME.cubin, for nvdisasm
from the nvidia-cuda-nvdisasm wheel: `nvdisasm -fun KERNEL -c FILE`)."""
import ctypes, re, subprocess, sys, tempfile, pathlib

args = sys.argv[1:]
ptxas = only = None
if "--ptxas" in args:
    i = args.index("--ptxas"); ptxas = args[i + 1]; del args[i:i + 2]
cubin = None
if "--cubin" in args:
    i = args.index("--cubin"); cubin = args[i + 1]; del args[i:i + 2]
if "--only" in args:
    i = args.index("--only"); only = args[i + 1]; del args[i:i + 2]
lib = ctypes.CDLL(args[0] if args else "libnvrtc.so.13")
root = pathlib.Path(__file__).resolve().parents[2]
srcs = {}
for f in (root / "model/src/ops").rglob("*.rs"):
    text = f.read_text()
    for name, body in re.findall(r'const (\w+): &str = r#"(.*?)"#;', text, re.S):
        srcs[name] = body
prelude = srcs.pop("PRELUDE", "") + srcs.pop("MMA", "")
ok = True
for name, body in srcs.items():
    if only and name != only:
        continue
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
    if ptxas and rc == 0:
        n = ctypes.c_size_t()
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        ptx = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, ptx)
        with tempfile.NamedTemporaryFile(suffix=".ptx") as f:
            f.write(ptx.value)
            f.flush()
            dst = f"{cubin}/{name}.cubin" if cubin else "/dev/null"
            out = subprocess.run([ptxas, "-v", "-arch=sm_90", f.name, "-o", dst],
                                 capture_output=True, text=True)
        fn = None
        for line in out.stderr.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                fn = m.group(1)
            elif "registers" in line or ("spill" in line and " 0 bytes spill stores" not in line):
                print(f"  {fn}: {line.split(':', 1)[-1].strip()}")
sys.exit(0 if ok else 1)
