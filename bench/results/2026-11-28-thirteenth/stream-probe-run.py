# Thirteenth-session probe harness (kept as a record): driver API through ctypes; times the kernels
# of stream-probe.cu on the 1-token gate_up shape of gpt-oss-20b, L2 flushed before each launch
# (span: first block's entry to last block's exit by %globaltimer; event: cuEvent around the launch).
import ctypes as C, struct, sys, statistics, random
cu = C.CDLL("libcuda.so.1")
def ck(r, what):
    if r != 0: raise SystemExit(f"{what}: CUDA error {r}")
ck(cu.cuInit(0), "init"); dev = C.c_int(); ck(cu.cuDeviceGet(C.byref(dev), 0), "dev")
ctx = C.c_void_p(); ck(cu.cuDevicePrimaryCtxRetain(C.byref(ctx), dev), "ctx"); ck(cu.cuCtxSetCurrent(ctx), "set")
sms = C.c_int(); ck(cu.cuDeviceGetAttribute(C.byref(sms), 16, dev), "sms"); SM = sms.value
name = C.create_string_buffer(100); cu.cuDeviceGetName(name, 100, dev); print(name.value.decode(), SM, "SMs")
mod = C.c_void_p(); ck(cu.cuModuleLoadData(C.byref(mod), C.c_char_p(open(sys.argv[1] if len(sys.argv) > 1 else "probe.cubin", "rb").read())), "load")
def fn(n):
    f = C.c_void_p(); ck(cu.cuModuleGetFunction(C.byref(f), mod, n.encode()), n); return f
def alloc(n):
    p = C.c_uint64(); ck(cu.cuMemAlloc_v2(C.byref(p), C.c_size_t(n)), "alloc"); return p
STEP = 544
E, TILES, STEPS = 32, 360, 45
import numpy as np
W = alloc(E * TILES * STEPS * STEP)
host = np.random.default_rng(5).integers(0, 256, size=(E * TILES * STEPS, STEP), dtype=np.uint8)
host[:, 512:] = np.random.default_rng(6).integers(112, 136, size=(E * TILES * STEPS, 32), dtype=np.uint8)  # finite scales
ck(cu.cuMemcpyHtoD_v2(W, host.ctypes.data_as(C.c_void_p), C.c_size_t(host.nbytes)), "fill"); del host
experts = alloc(64 * 4); out = alloc(1 << 20); st = alloc(16); flush = alloc(256 << 20)
ev0, ev1 = C.c_void_p(), C.c_void_p(); ck(cu.cuEventCreate(C.byref(ev0), 0), "ev"); ck(cu.cuEventCreate(C.byref(ev1), 0), "ev")
rng = random.Random(3)
def run(kname, grid, threads, smem, tiles, steps, S, reps=15, cold=True, ex=None):
    f = fn(kname)
    if smem > 48 * 1024: ck(cu.cuFuncSetAttribute(f, 8, C.c_int(smem)), "smem attr")
    ex = ex or rng.sample(range(E * TILES * STEPS // (tiles * steps)), S)
    b = struct.pack(f"<{S}i", *ex); ck(cu.cuMemcpyHtoD_v2(experts, b, C.c_size_t(len(b))), "htod")
    args = [C.c_uint64(W.value), C.c_uint64(experts.value), C.c_int(tiles), C.c_int(steps), C.c_int(S), C.c_uint64(out.value), C.c_uint64(st.value)]
    arr = (C.c_void_p * len(args))(*[C.cast(C.pointer(a), C.c_void_p) for a in args])
    evs, spans = [], []
    for r in range(reps + 1):
        if cold: ck(cu.cuMemsetD8_v2(flush, C.c_ubyte(r & 255), C.c_size_t(256 << 20)), "flush")
        ck(cu.cuMemcpyHtoD_v2(st, struct.pack("<QQ", 2**64 - 1, 0), C.c_size_t(16)), "st")
        ck(cu.cuEventRecord(ev0, None), "rec")
        ck(cu.cuLaunchKernel(f, grid, 1, 1, threads, 1, 1, smem, None, arr, None), kname)
        ck(cu.cuEventRecord(ev1, None), "rec"); ck(cu.cuCtxSynchronize(), kname + " sync")
        ms = C.c_float(); ck(cu.cuEventElapsedTime(C.byref(ms), ev0, ev1), "elapsed")
        bs = C.create_string_buffer(16); ck(cu.cuMemcpyDtoH_v2(bs, st, C.c_size_t(16)), "dtoh")
        a, z = struct.unpack("<QQ", bs.raw)
        if r: evs.append(ms.value * 1000); spans.append((z - a) / 1000)
    mb = S * tiles * steps * STEP / 1e6
    e, s = statistics.median(evs), statistics.median(spans)
    print(f"{kname:10} S={S:2} tiles={tiles} steps={steps:2} {mb:7.1f} MB  grid {grid:4}x{threads}  event {e:7.2f} us  span {s:7.2f} us  {mb / s:6.2f} TB/s (span)  {'cold' if cold else 'warm'}")
    return s
def outputs():
    b = C.create_string_buffer(2 * SM * 256 * 4); ck(cu.cuMemcpyDtoH_v2(b, out, C.c_size_t(len(b))), "dtoh"); return b.raw
ex = rng.sample(range(E), 4)
run("sp_pipe", 2 * SM, 256, 45 * 256, 360, 45, 4, reps=1, ex=ex); a = outputs()
run("sp_pipe3", 2 * SM, 256, 45 * 256, 360, 45, 4, reps=1, ex=ex); b = outputs()
print("pipe vs pipe3 outputs:", "identical" if a == b else "DIFFER")
ex = rng.sample(range(60), 4)
run("sp_pipe", 2 * SM, 256, 23 * 256, 360, 23, 4, reps=1, ex=ex); a = outputs()
run("sp_pipe3", 2 * SM, 256, 23 * 256, 360, 23, 4, reps=1, ex=ex); b = outputs()
print("pipe vs pipe3 outputs (23 steps):", "identical" if a == b else "DIFFER")
for st_, t_ in ((45, 360), (23, 360), (45, 180)):
    for k in ("sp_pipe", "sp_pipe3", "sp_pipe", "sp_pipe3"):
        run(k, 2 * SM, 256, st_ * 256, t_, st_, 4)
for k in ("sp_pipe", "sp_pipe3"):
    run(k, 2 * SM, 256, 45 * 256, 360, 45, 4, cold=False)
    run(k, 2 * SM, 256, 45 * 256, 360, 45, 16)
print("-- diagnostics: gate_up shape, T = 1")
for k, g in (("sp_pipe", 2 * SM), ("sp_nodq", 2 * SM), ("sp_pipeeven", 2 * SM)):
    run(k, g, 256, 45 * 256, 360, 45, 4)

