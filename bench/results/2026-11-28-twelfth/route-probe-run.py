# Twelfth-session probe harness (kept as a record; expects the cubin at probe/probe.cubin): driver API through ctypes,
# times route_token (V0) against a redux.sync top-k (V1) in one block, and checks that both route the same.
import ctypes as C, random, struct, sys, math
cu = C.CDLL("libcuda.so.1")
def ck(r, what):
    if r != 0: raise SystemExit(f"{what}: CUDA error {r}")
ck(cu.cuInit(0), "init"); dev = C.c_int(); ck(cu.cuDeviceGet(C.byref(dev), 0), "dev")
ctx = C.c_void_p(); ck(cu.cuDevicePrimaryCtxRetain(C.byref(ctx), dev), "ctx"); ck(cu.cuCtxSetCurrent(ctx), "set")
mod = C.c_void_p(); data = open("probe/probe.cubin", "rb").read()
ck(cu.cuModuleLoadData(C.byref(mod), C.c_char_p(data)), "load")
def fn(name):
    f = C.c_void_p(); ck(cu.cuModuleGetFunction(C.byref(f), mod, name.encode()), name); return f
def alloc(n):
    p = C.c_uint64(); ck(cu.cuMemAlloc_v2(C.byref(p), C.c_size_t(n)), "alloc"); return p
def put(p, fmt, vals):
    b = struct.pack(f"<{len(vals)}{fmt}", *vals); ck(cu.cuMemcpyHtoD_v2(p, b, C.c_size_t(len(b))), "htod")
def get(p, fmt, n):
    b = C.create_string_buffer(4 * n if fmt in "if" else 8 * n); ck(cu.cuMemcpyDtoH_v2(b, p, C.c_size_t(len(b))), "dtoh")
    return struct.unpack(f"<{n}{fmt}", b.raw)
logits, corr, stamps, out, flush = alloc(16 * 384 * 4), alloc(384 * 4), alloc(64 * 8 * 4), alloc(2 * 16 * 8 * 4), alloc(256 << 20)
def launch(f, mode, norm, scale, E, k, T, reps):
    args = [C.c_uint64(logits.value), C.c_uint64(corr.value), C.c_int(mode), C.c_int(norm), C.c_float(scale), C.c_int(E),
            C.c_int(k), C.c_int(T), C.c_int(reps), C.c_uint64(stamps.value), C.c_uint64(out.value)]
    arr = (C.c_void_p * len(args))(*[C.cast(C.pointer(a), C.c_void_p) for a in args])
    ck(cu.cuLaunchKernel(f, 1, 1, 1, 256, 1, 1, 0, None, arr, None), "launch"); ck(cu.cuCtxSynchronize(), "sync")
rng = random.Random(7)
cases = [("mimo sigmoid E256 k8", 2, 1, 2.5, 256, 8, 8), ("gpt-oss topk-softmax E32 k4", 1, 0, 1.0, 32, 4, 1),
         ("softmax-topk E128 k8", 0, 1, 1.0, 128, 8, 8)]
# Equality: many random inputs with ties, -0, +-inf and NaN.
bad = 0; trials = 0
for name, mode, norm, scale, E, k, J in cases:
    for trial in range(300):
        T = rng.choice([1, 3, 8, 16])
        kind = trial % 4
        def val():
            if kind == 0: return rng.gauss(0, 1)
            if kind == 1: return rng.choice([-1.0, -0.5, 0.0, -0.0, 0.5, 1.0])
            if kind == 2: return rng.choice([0.25, 0.25, 0.5, float("-inf"), -0.0, 0.0, float("nan")] + [rng.gauss(0, 1)])
            return round(rng.gauss(0, 2), 1)
        put(logits, "f", [val() for _ in range(T * E)])
        put(corr, "f", [rng.choice([0.0, 0.0, 0.1, -0.1, rng.gauss(0, 0.05)]) for _ in range(E)])
        res = []
        for v in (0, 1):
            launch(fn(f"probe_v{v}_j{J}"), mode, norm, scale, E, k, T, 1)
            res.append(get(out, "i", 2 * T * k))
        trials += 1
        if res[0] != res[1]:
            bad += 1
            if bad <= 3: print("MISMATCH", name, T, kind, res[0][:16], res[1][:16])
print(f"equality: {trials - bad}/{trials} inputs route the same (V0 vs V1)")
# Timing: cycles for route_token and group_pairs, rep 0 cold (after a 256 MB memset), reps 1..7 warm.
print(f"{'case':32} {'T':>3} {'V':>2} {'cold tok':>9} {'warm tok':>9} {'cold grp':>9} {'warm grp':>9} {'cold ns':>8} {'warm ns':>8}")
for name, mode, norm, scale, E, k, J in cases:
    for T in (1, 8):
        put(logits, "f", [rng.gauss(0, 1) for _ in range(T * E)]); put(corr, "f", [rng.gauss(0, 0.05) for _ in range(E)])
        for v in (0, 1, 0, 1):
            f = fn(f"probe_v{v}_j{J}")
            launch(f, mode, norm, scale, E, k, T, 1)  # load the module's code once
            ck(cu.cuMemsetD8_v2(flush, C.c_ubyte(v), C.c_size_t(256 << 20)), "flush"); ck(cu.cuCtxSynchronize(), "sync")
            launch(f, mode, norm, scale, E, k, T, 8)
            s = get(stamps, "q", 32)
            warm = [s[4 * r] for r in range(1, 8)]; wg = [s[4 * r + 1] for r in range(1, 8)]; wn = [s[4 * r + 2] for r in range(1, 8)]
            print(f"{name:32} {T:3} {v:2} {s[0]:9} {sorted(warm)[3]:9} {s[1]:9} {sorted(wg)[3]:9} {s[2]:8} {sorted(wn)[3]:8}")
