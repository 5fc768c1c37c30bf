# Harness of the persistent-chain probe (dense_chain.cu; scripts/gpu-probe-chain builds and runs
# it): the driver API through ctypes, on the GPU machine's Python (numpy only).
# Builds a chain of P dependent 1-token FP8 products (alternating 4096 x 2880 and 2880 x 4096,
# gpt-oss-20b's o_proj and its transpose, 128 x 128 tile multipliers), then runs it in the ways
# WAYS names, on the same bytes, each writing its own outputs:
#   kernels / plain: Fulgur's gemv_wide_fp8_t1 (the 1-token FP8 product the executor runs), one
#             launch a product, with / without programmatic launches (PDL), in one CUDA graph;
#   inline:   dense_chain_inline, one resident grid, a product's weights asked for when it starts;
#   ahead:    the next product's weights asked for when this one starts (two buffers);
#   after:    the next product's weights asked for once this one's x is in shared memory;
#   -rel:     arrival by one release add (else a fence and an atomic add); -ss: the tile
#             multipliers copied into shared memory with the weights (else read from global);
#   tc-:      rows on the tensor cores (mma m16n8k16, x as f16 hi + lo); cm-: a thread a chunk
#             column; -noconv: tc with the E4M3 bytes fed raw (a diagnostic, not checked);
#             -alu: tc converting with integer operations; -sa: tc reading shared memory through
#             32-bit shared addresses made once (not yet run on a GPU); nomath-: the rows left out
#             (not checked);
#   -bulk:    copies on the tensor memory accelerator (cp.async.bulk, a row each, an mbarrier a
#             buffer) instead of 16-byte cp.async by every thread;
#   stream*:  the ahead kernels with only the copies and their waits (no barrier, no arithmetic);
#   rows-only-*: the after kernels without the grid barrier and arrivals (wrong results, not
#             checked): the rows and copies alone, for profiling them.
# Every product of every way is checked against numpy (float64, from that way's own input),
# then each way is timed: CUDA events around the launch, median of REPS after warm-up.
# Usage: python3 dense_chain.py PROBE.cubin FULGUR.fatbin [PRODUCTS]
import ctypes as C, struct, sys, statistics
import numpy as np

cu = C.CDLL("libcuda.so.1")
def ck(r, what):
    if r != 0:
        name = C.c_char_p(); cu.cuGetErrorName(r, C.byref(name))
        raise SystemExit(f"{what}: CUDA error {r} ({name.value.decode() if name.value else '?'})")
ck(cu.cuInit(0), "init"); dev = C.c_int(); ck(cu.cuDeviceGet(C.byref(dev), 0), "device")
ctx = C.c_void_p(); ck(cu.cuDevicePrimaryCtxRetain(C.byref(ctx), dev), "context"); ck(cu.cuCtxSetCurrent(ctx), "set context")
def attr(a):
    v = C.c_int(); ck(cu.cuDeviceGetAttribute(C.byref(v), a, dev), f"attribute {a}"); return v.value
SM = attr(16)  # CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
SMEM_OPTIN = attr(97)  # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
name = C.create_string_buffer(100); cu.cuDeviceGetName(name, 100, dev)
print(f"{name.value.decode()}, {SM} multiprocessors, {SMEM_OPTIN} bytes of shared memory a block (opt-in)")

def module(path):
    m = C.c_void_p(); ck(cu.cuModuleLoadData(C.byref(m), C.c_char_p(open(path, "rb").read())), f"load {path}"); return m
probe, fulgur = module(sys.argv[1]), module(sys.argv[2])
P = int(sys.argv[3]) if len(sys.argv) > 3 else 48
REPS = 20
def function(m, n):
    f = C.c_void_p(); ck(cu.cuModuleGetFunction(C.byref(f), m, n.encode()), n); return f
def alloc(n):
    p = C.c_uint64(); ck(cu.cuMemAlloc_v2(C.byref(p), C.c_size_t(max(n, 16))), f"alloc {n}"); return p.value
def upload(ptr, a):
    a = np.ascontiguousarray(a); ck(cu.cuMemcpyHtoD_v2(C.c_uint64(ptr), a.ctypes.data_as(C.c_void_p), C.c_size_t(a.nbytes)), "upload")
def download(ptr, n, dtype):
    a = np.empty(n, dtype=dtype); ck(cu.cuMemcpyDtoH_v2(a.ctypes.data_as(C.c_void_p), C.c_uint64(ptr), C.c_size_t(a.nbytes)), "download"); return a
stream = C.c_void_p(); ck(cu.cuStreamCreate(C.byref(stream), 1), "stream")  # non-blocking
ev0, ev1 = C.c_void_p(), C.c_void_p(); ck(cu.cuEventCreate(C.byref(ev0), 0), "event"); ck(cu.cuEventCreate(C.byref(ev1), 0), "event")
def elapsed_us():
    ms = C.c_float(); ck(cu.cuEventSynchronize(ev1), "sync"); ck(cu.cuEventElapsedTime(C.byref(ms), ev0, ev1), "elapsed"); return ms.value * 1000

# E4M3 decode table (NaN codes are never drawn).
codes = np.arange(256)
e, m = (codes >> 3) & 15, codes & 7
mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
LUT = np.where(codes >> 7, -mag, mag)
finite = np.array([c for c in range(256) if (c & 0x7F) != 0x7F], dtype=np.uint8)
RMS = float(np.sqrt(np.mean(LUT[finite] ** 2)))

rng = np.random.default_rng(7)
shapes = [(4096, 2880) if p % 2 == 0 else (2880, 4096) for p in range(P)]
weights, scales, host = [], [], []
total = 0
for n, k in shapes:
    q = finite[rng.integers(0, len(finite), size=n * k)]
    tiles = ((n + 127) // 128, (k + 127) // 128)
    s = (rng.uniform(0.5, 2.0, size=tiles) / (np.sqrt(k) * RMS)).astype(np.float32)
    w = alloc(n * k); upload(w, q); sp = alloc(s.nbytes); upload(sp, s)
    weights.append(w); scales.append(sp); host.append((q, s)); total += n * k + s.nbytes
x0 = rng.standard_normal(shapes[0][1]).astype(np.float32)
X0 = alloc(x0.nbytes); upload(X0, x0)
print(f"{P} products, {total / 1e6:.1f} MB of weights")

# Copy bandwidth as Fulgur measures it (CopyBandwidth.swift): 1 GiB device to device, read + written.
big = 1 << 30
A, B = alloc(big), alloc(big)
ck(cu.cuMemsetD8_v2(C.c_uint64(A), C.c_ubyte(1), C.c_size_t(big)), "memset")
times = []
for r in range(13):
    ck(cu.cuEventRecord(ev0, stream), "record"); ck(cu.cuMemcpyDtoDAsync_v2(C.c_uint64(B), C.c_uint64(A), C.c_size_t(big), stream), "copy")
    ck(cu.cuEventRecord(ev1, stream), "record"); t = elapsed_us()
    if r >= 3: times.append(t)
copy_gbps = 2 * big / (statistics.median(times) * 1e-6) / 1e9
ck(cu.cuMemFree_v2(C.c_uint64(A)), "free"); ck(cu.cuMemFree_v2(C.c_uint64(B)), "free")
roof_us = total / (copy_gbps * 1e3)
print(f"copy bandwidth {copy_gbps:.0f} GB/s; roofline of the chain {roof_us:.1f} us ({roof_us / P:.2f} us a product)")

def outputs():
    return [alloc(4 * n) for n, _ in shapes]
dense = {}
def matrix(p):  # W_p in float64, made once
    if p not in dense:
        n, k = shapes[p]
        q, s = host[p]
        dense[p] = LUT[q].reshape(n, k) * np.repeat(np.repeat(s.astype(np.float64), 128, 0), 128, 1)[:n, :k]
    return dense[p]
def check(label, ys):
    worst = 0.0
    x = x0.astype(np.float64)
    for p, (n, k) in enumerate(shapes):
        ref = matrix(p) @ x
        y = download(ys[p], n, np.float32)
        err = float(np.max(np.abs(y - ref)) / max(np.max(np.abs(ref)), 1e-30))
        worst = max(worst, err)
        x = y.astype(np.float64)  # the next product's reference starts from this way's own output
    ok = worst < 1e-5
    print(f"{label:20} check: worst rel. error over {P} products {worst:.2e} {'PASS' if ok else 'FAIL'}")
    return ok

def args_array(vals):
    arr = (C.c_void_p * len(vals))(*[C.cast(C.pointer(v), C.c_void_p) for v in vals])
    return arr, vals  # keep the values alive

# --- kernels: gemv_wide_fp8_t1 chain, PDL, one graph.
wide = function(fulgur, "gemv_wide_fp8_t1")
ys_k = outputs()
def wide_grid(n, k):
    smem = (k // 16) * 20 * 4
    per = C.c_int(); ck(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(C.byref(per), wide, 256, C.c_size_t(smem)), "occupancy")
    return min((n + 7) // 8, per.value * SM), smem
keep = []
def launch_wide(p, pdl):
    n, k = shapes[p]
    grid, smem = wide_grid(n, k)
    vals = [C.c_uint64(weights[p]), C.c_uint64(scales[p]), C.c_uint64(0), C.c_uint64(X0 if p == 0 else ys_k[p - 1]),
            C.c_uint64(ys_k[p]), C.c_int(n), C.c_int(k), C.c_int(n), C.c_int(128)]
    arr, vals = args_array(vals); keep.append((arr, vals))
    if not pdl:
        ck(cu.cuLaunchKernel(wide, grid, 1, 1, 256, 1, 1, smem, stream, arr, None), "launch wide"); return
    attribute = (C.c_ubyte * 72)(); struct.pack_into("<ii", attribute, 0, 6, 0); struct.pack_into("<i", attribute, 8, 1)
    config = (C.c_ubyte * 56)()
    struct.pack_into("<7I", config, 0, grid, 1, 1, 256, 1, 1, smem)
    struct.pack_into("<QQI", config, 32, stream.value or 0, C.addressof(attribute), 1)
    keep.append((attribute, config))
    ck(cu.cuLaunchKernelEx(config, wide, arr, None), "launch wide (PDL)")
def capture(pdl):
    ck(cu.cuStreamBeginCapture_v2(stream, 2), "begin capture")  # relaxed
    for p in range(P): launch_wide(p, pdl)
    graph = C.c_void_p(); ck(cu.cuStreamEndCapture(stream, C.byref(graph)), "end capture")
    exe = C.c_void_p(); ck(cu.cuGraphInstantiateWithFlags(C.byref(exe), graph, C.c_ulonglong(0)), "instantiate")
    return exe
graphs = {"kernels": capture(True), "plain": capture(False)}
def run_graph(label):
    ck(cu.cuEventRecord(ev0, stream), "record"); ck(cu.cuGraphLaunch(graphs[label], stream), "graph launch")
    ck(cu.cuEventRecord(ev1, stream), "record"); return elapsed_us()

# --- the persistent probe.
row_stride = lambda k: k + 64 if k % 128 == 0 else k  # dense_chain.cu's row_stride
buffer_bytes = max(((n + SM - 1) // SM) * row_stride(k) for n, k in shapes)
# After the two weight buffers: x staged (a warp a row) or the per-(row, chunk) sums (cm-*).
smem = 2 * buffer_bytes + max(max((k // 16) * 20 * 4, ((n + SM - 1) // SM) * (k // 16) * 4, 4 * k + 64 + 2048) for n, k in shapes)
if smem > SMEM_OPTIN: raise SystemExit(f"needs {smem} bytes of shared memory a block, the GPU allows {SMEM_OPTIN}")
# The tensor-core rows take two 16-row tiles a block, and every block must be resident at once
# (a plain launch of one block a multiprocessor: the grid barrier would hang otherwise).
if max((n + SM - 1) // SM for n, _ in shapes) > 32: raise SystemExit(f"more than 32 rows a block on {SM} multiprocessors (the tc ways take 32)")
counter = alloc(4); stamps = alloc(8 * (6 * P + 5))
probes = {}
WAYS = (("inline", "dense_chain_inline", 0), ("inline-rel-ss", "dense_chain_inline_rel_ss", 0),
        ("ahead-rel-ss", "dense_chain_ahead_rel_ss", 0), ("after-rel-ss", "dense_chain_after_rel_ss", 0),
        ("tc-inline-rel-ss", "dense_chain_tc_inline_rel_ss", 0), ("tc-ahead-rel-ss", "dense_chain_tc_ahead_rel_ss", 0),
        ("tc-after-rel-ss", "dense_chain_tc_after_rel_ss", 0), ("tc-ahead-bulk-rel-ss", "dense_chain_tc_ahead_bulk_rel_ss", 0),
        ("tc-after-rel", "dense_chain_tc_after_rel", 0), ("cm-ahead-rel", "dense_chain_cm_ahead_rel", 0),
        ("tc-inline-noconv", "dense_chain_tc_inline_rel_ss_noconv", 0), ("tc-after-noconv", "dense_chain_tc_after_rel_ss_noconv", 0),
        ("tc-inline-alu", "dense_chain_tc_inline_rel_ss_alu", 0), ("tc-after-alu", "dense_chain_tc_after_rel_ss_alu", 0),
        ("tc-inline-sa", "dense_chain_tc_inline_rel_ss_sa", 0), ("tc-after-sa", "dense_chain_tc_after_rel_ss_sa", 0),
        ("nomath-inline", "dense_chain_nomath_inline", 0), ("nomath-after", "dense_chain_nomath_after", 0),
        ("stream", "dense_chain_ahead", 1), ("stream-bulk", "dense_chain_ahead_bulk", 1),
        ("rows-only-after", "dense_chain_after_rel_ss", 2), ("rows-only-tc-after", "dense_chain_tc_after_rel_ss", 2))
for label, kname, _ in WAYS:
    f = function(probe, kname)
    ck(cu.cuFuncSetAttribute(f, 8, C.c_int(smem)), "max dynamic shared memory")  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    per = C.c_int(); ck(cu.cuOccupancyMaxActiveBlocksPerMultiprocessor(C.byref(per), f, 512, C.c_size_t(smem)), "occupancy")
    if per.value < 1: raise SystemExit(f"{kname} does not fit a multiprocessor")
    ys = outputs()
    rows = b"".join(struct.pack("<QQQQii", weights[p], scales[p], X0 if p == 0 else ys[p - 1], ys[p], n, k) for p, (n, k) in enumerate(shapes))
    tp = alloc(len(rows)); upload(tp, np.frombuffer(rows, dtype=np.uint8))
    probes[label] = (f, ys, tp, dict((w[0], w[2]) for w in WAYS)[label])
print(f"probe: grid {SM} x 512 threads, {smem} bytes of shared memory a block ({buffer_bytes} a weight buffer)")
def run_probe(label, with_stamps=False):
    f, ys, tp, stream_only = probes[label]
    ck(cu.cuMemsetD32Async(C.c_uint64(counter), 0, 1, stream), "zero counter")
    ck(cu.cuMemsetD32Async(C.c_uint64(stamps), 0, 2 * (6 * P + 5), stream), "zero stamps")
    vals = [C.c_uint64(tp), C.c_int(P), C.c_uint64(counter), C.c_uint64(stamps if with_stamps else 0), C.c_int(buffer_bytes), C.c_int(stream_only)]
    arr, vals = args_array(vals)
    ck(cu.cuEventRecord(ev0, stream), "record")
    ck(cu.cuLaunchKernel(f, SM, 1, 1, 512, 1, 1, smem, stream, arr, None), f"launch {label}")
    ck(cu.cuEventRecord(ev1, stream), "record"); return elapsed_us()

ok = True
run_graph("kernels"); ok &= check("kernels", ys_k)
run_graph("plain"); ok &= check("plain", ys_k)
for label in probes:
    run_probe(label)
    if not probes[label][3] and not label.startswith("nomath") and "noconv" not in label: ok &= check(label, probes[label][1])
results = {k: [] for k in ["plain", "kernels"] + list(probes)}
for r in range(REPS + 3):
    for label in results:
        t = run_graph(label) if label in graphs else run_probe(label)
        if r >= 3: results[label].append(t)
print(f"\n{'way':20} {'chain us':>9} {'us a product':>13} {'GB/s':>7} {'% of copy':>10}")
for label, ts in results.items():
    t = statistics.median(ts)
    print(f"{label:20} {t:9.1f} {t / P:13.2f} {total / (t * 1e3):7.0f} {100 * roof_us / t:9.1f}%")
# Where a product's time goes (block 0's clock, median over the products): the barrier (from
# its own arrival posted to the last block's seen), x staged and weights landed, the rows, the
# arrival (fence and atomic, or the release add).
print(f"\n{'block 0':20} {'barrier':>8} {'x+weights':>10} {'rows':>6} {'arrive':>7}  (us, median of the products)")
for label in probes:
    if probes[label][3] == 1: continue
    run_probe(label, with_stamps=True)
    s = download(stamps, 6 * P + 5, np.uint64).astype(np.int64)
    med = lambda xs: statistics.median(xs) / 1e3
    barrier = med([s[4 * i] - s[4 * i - 1] for i in range(1, P)])
    staged = med([s[4 * i + 1] - s[4 * i] for i in range(P)])
    rows = med([s[4 * i + 2] - s[4 * i + 1] for i in range(P)])
    arrive = med([s[4 * i + 3] - s[4 * i + 2] for i in range(P)])
    A = 4 * P + 5
    loops = "" if s[A] == 0 else f"  rows' loop: warp 0 {med([s[A + 2 * i] - s[4 * i + 1] for i in range(P)]):.2f}, last warp {med([s[A + 2 * i + 1] - s[4 * i + 1] for i in range(P)]):.2f};"
    print(f"{label:20} {barrier:8.2f} {staged:10.2f} {rows:6.2f} {arrive:7.2f}{loops}  kernel span {(s[4 * P + 1] - s[4 * P]) / 1e3:.1f} us, "
          f"clock {(s[4 * P + 3] - s[4 * P + 2]) / (s[4 * P + 4] - s[4 * P]):.2f} GHz")
sys.exit(0 if ok else 1)
