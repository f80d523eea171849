//! CUDA C kernels compiled at run time with NVRTC (cudarc loads it, as it
//! loads the driver: no toolkit at build time) and launched on the CUDA
//! stream that owns burn's buffers, like the cuBLAS GEMMs (`cublas.rs`).
//!
//! Each source is compiled once per device for its own architecture and
//! kept for the life of the process.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use burn_cubecl::tensor::CubeTensor;
use cubecl_common::device::{Device, DeviceId};
use cubecl_common::device_handle::DeviceHandle;
use cubecl_common::stream_id::StreamId;
use cubecl_cuda::CudaRuntime;
use cubecl_runtime::server::{Binding, ComputeServer};
use cudarc::driver::{CudaContext, result as drv, sys as cu};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

pub type T = CubeTensor<CudaRuntime>;

/// A CUDA stream, as cubecl hands it out.
pub type Stream = cu::CUstream;

/// A compiled module: its functions by name. Handles are plain driver
/// pointers, valid on any thread of the process (primary context).
struct Module {
    handle: usize,
    functions: HashMap<String, usize>,
}

type Cache = Mutex<HashMap<(usize, &'static str), Module>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

thread_local! {
    /// The device's primary context, retained once per thread: creating a
    /// `CudaContext` per launch retains and releases it each time.
    static CONTEXTS: RefCell<HashMap<usize, Arc<CudaContext>>> = RefCell::new(HashMap::new());
}

pub(crate) fn context(device: usize) -> Arc<CudaContext> {
    CONTEXTS.with(|c| {
        let ctx = c
            .borrow_mut()
            .entry(device)
            .or_insert_with(|| CudaContext::new(device).expect("CUDA context"))
            .clone();
        ctx.bind_to_thread().expect("bind CUDA context");
        ctx
    })
}

/// `sm_XY` of `device` (NVRTC wants a `'static` name; one per device is leaked).
fn arch(ctx: &CudaContext) -> &'static str {
    let (major, minor) = ctx.compute_capability().expect("compute capability");
    Box::leak(format!("sm_{major}{minor}").into_boxed_str())
}

/// A loaded kernel. Driver handles are valid on every thread of the process,
/// and launches run on cubecl's device thread (see [`enqueue`]).
#[derive(Clone, Copy, Debug)]
pub struct Kernel(usize);

/// The kernel `name` of `src` (module `module`), compiled on first use.
pub fn function(device: usize, module: &'static str, src: &str, name: &str) -> Kernel {
    let ctx = context(device);
    let mut cache = cache().lock().expect("kernel cache");
    let m = cache.entry((device, module)).or_insert_with(|| {
        let ptx = compile_ptx_with_opts(
            src,
            CompileOptions {
                arch: Some(arch(&ctx)),
                name: Some(format!("{module}.cu")),
                options: vec!["--std=c++17".into()],
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| panic!("NVRTC compiling the `{module}` kernels: {e:?}"));
        let image = std::ffi::CString::new(ptx.to_src()).expect("PTX text");
        // SAFETY: NUL-terminated PTX from NVRTC; the context is bound.
        let handle = unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
            .unwrap_or_else(|e| panic!("loading the `{module}` kernels: {e:?}"));
        // Modules stay loaded for the life of the process.
        Module {
            handle: handle as usize,
            functions: HashMap::new(),
        }
    });
    if let Some(&f) = m.functions.get(name) {
        return Kernel(f);
    }
    let module_handle = m.handle as cu::CUmodule;
    let cname = std::ffi::CString::new(name).expect("kernel name");
    // SAFETY: a loaded module; the name is NUL-terminated.
    let f = unsafe { drv::module::get_function(module_handle, cname) }
        .unwrap_or_else(|e| panic!("kernel `{name}` in `{module}`: {e:?}"));
    m.functions.insert(name.to_string(), f as usize);
    Kernel(f as usize)
}

/// The CUDA server cubecl runs on a device's thread.
type Server = <CudaRuntime as cubecl_runtime::runtime::Runtime>::Server;

thread_local! {
    /// Handles to each device's cubecl thread (looking one up takes a global lock).
    static DEVICES: RefCell<HashMap<DeviceId, DeviceHandle<Server>>> = RefCell::new(HashMap::new());
}

/// Runs `task` on cubecl's device thread, after every burn op enqueued before
/// it and before every op enqueued after, with the device pointers of `ts`
/// (0 for `None`) and the stream that owns them. Nothing blocks: cubecl 0.10
/// queues work for a device thread that launches it, so resolving pointers
/// from the caller's thread (`get_resource`) would wait for that queue to
/// drain, and the host could never run ahead of the GPU.
///
/// The queued task holds bindings of the tensors' memory (as cubecl's own
/// launches do): the memory is not reused before the task has run, and the
/// tensors can still be updated in place (`can_mut`) by later ops.
pub fn enqueue_dyn(ts: &[Option<&T>], task: impl FnOnce(Vec<u64>, Stream) + Send + 'static) {
    let (device, bindings) = device_and_bindings(ts);
    device.submit(move |server| {
        // cubecl logs and drops a panicking task; a launch that failed
        // leaves results unwritten, so stop here (the panic is printed).
        let run = std::panic::AssertUnwindSafe(|| launch_task(server, bindings, task));
        if std::panic::catch_unwind(run).is_err() {
            eprintln!("error: a GPU launch failed on cubecl's device thread (see above)");
            std::process::exit(1);
        }
    });
}

/// [`enqueue_dyn`], but waiting for `task` to run and return (after every
/// op enqueued before it): for work whose result the host needs now.
pub fn run_dyn<R: Send>(ts: &[Option<&T>], task: impl FnOnce(Vec<u64>, Stream) -> R + Send) -> R {
    let (device, bindings) = device_and_bindings(ts);
    device
        .submit_blocking(move |server| {
            let mut out = None;
            launch_task(server, bindings, |p, stream| out = Some(task(p, stream)));
            out.expect("the task ran")
        })
        .expect("cubecl's device thread")
}

/// The device thread of `ts` (the first given) and bindings of their memory.
fn device_and_bindings(ts: &[Option<&T>]) -> (DeviceHandle<Server>, Vec<Option<Binding>>) {
    let first = ts
        .iter()
        .flatten()
        .next()
        .expect("a GPU task needs at least one tensor");
    let id = first.device.to_id();
    let bindings = ts
        .iter()
        .map(|t| t.map(|t| t.handle.clone().binding()))
        .collect();
    let device = DEVICES.with(|d| {
        d.borrow_mut()
            .entry(id)
            .or_insert_with(|| DeviceHandle::<Server>::new(id))
            .clone()
    });
    (device, bindings)
}

/// Resolves the bindings' pointers on the device thread and runs `task`.
fn launch_task(
    server: &mut Server,
    bindings: Vec<Option<Binding>>,
    task: impl FnOnce(Vec<u64>, Stream),
) {
    // The caller's stream: cubecl runs the task under the caller's id.
    let stream_id = StreamId::current();
    let mut stream: Stream = std::ptr::null_mut();
    let p = bindings
        .into_iter()
        .map(|b| {
            b.map_or(0, |b| {
                let res = server
                    .get_resource(b, stream_id)
                    .expect("device memory of a CUDA tensor");
                let r = res.resource();
                if stream.is_null() {
                    stream = r.stream;
                }
                r.ptr
            })
        })
        .collect();
    task(p, stream)
}

/// [`enqueue_dyn`] for a fixed set of tensors, some optional.
pub fn enqueue_opt<const N: usize>(
    ts: [Option<&T>; N],
    task: impl FnOnce([u64; N], Stream) + Send + 'static,
) {
    enqueue_dyn(&ts, move |p, stream| {
        task(p.try_into().expect("one pointer per tensor"), stream)
    })
}

/// [`enqueue_dyn`] for a fixed set of tensors.
pub fn enqueue<const N: usize>(ts: [&T; N], task: impl FnOnce([u64; N], Stream) + Send + 'static) {
    enqueue_opt(ts.map(Some), task)
}

/// Launches `f` on `stream`. `params` point at the kernel's arguments, in
/// order (see [`args!`](crate::kernel_args)).
///
/// # Safety
/// The arguments must match the kernel's signature and every pointer must be
/// a live buffer of the sizes the kernel reads and writes.
pub unsafe fn launch(
    device: usize,
    f: Kernel,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    stream: cu::CUstream,
    params: &mut [*mut c_void],
) {
    let _ctx = context(device);
    // SAFETY: forwarded to the caller.
    unsafe { drv::launch_kernel(f.0 as cu::CUfunction, grid, block, shared, stream, params) }
        .unwrap_or_else(|e| panic!("kernel launch (grid {grid:?}, block {block:?}): {e:?}"));
}

/// Lets `f` take `bytes` of dynamic shared memory per block (above the
/// 48 KB a launch gets without asking).
pub fn set_max_dynamic_smem(device: usize, f: Kernel, bytes: u32) {
    let _ctx = context(device);
    // SAFETY: `f` is a loaded function of this device's context.
    unsafe {
        drv::function::set_function_attribute(
            f.0 as cu::CUfunction,
            cu::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
    }
    .unwrap_or_else(|e| panic!("{bytes} bytes of dynamic shared memory: {e:?}"));
}

/// [`launch`] over `n` elements: blocks of 256 threads, a grid-stride loop
/// in the kernel covering what the grid does not (see [`grid_for`]).
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_flat(
    device: usize,
    f: Kernel,
    n: usize,
    stream: cu::CUstream,
    params: &mut [*mut c_void],
) {
    // SAFETY: forwarded to the caller.
    unsafe { launch(device, f, grid_for(n, 256), (256, 1, 1), 0, stream, params) }
}

/// `[*mut c_void]` pointing at each argument (locals that outlive the launch).
#[macro_export]
macro_rules! kernel_args {
    ($($a:expr),* $(,)?) => {
        [$(&mut $a as *mut _ as *mut ::std::ffi::c_void),*]
    };
}

/// Blocks of `threads` covering `n` elements with a grid-stride loop
/// (at most a few waves: the loop covers the rest).
pub fn grid_for(n: usize, threads: u32) -> (u32, u32, u32) {
    let blocks = n.div_ceil(threads as usize).clamp(1, 132 * 16);
    (blocks as u32, 1, 1)
}

/// bf16 <-> f32 helpers shared by the kernels (no CUDA headers needed).
pub const PRELUDE: &str = r#"
typedef unsigned short bf16_t;
__device__ __forceinline__ float bf16_to_f32(bf16_t x) {
    return __uint_as_float(((unsigned int)x) << 16);
}
// Round to nearest even in one instruction (sm_80+; the integer form took
// seven, in every bf16 store).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    bf16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}
// 2^x, approximate (as __expf's core), denormal results flushed to zero:
// two instructions where __expf takes six.
__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
#define LOG2E 1.4426950408889634f
// 1 / (1 + e^-z) with ex2 and the fast reciprocal (a few ulp): the IEEE
// division took a Newton step, a slow-path call and branches per element.
// Saturates cleanly: 1 + e^-z = inf gives 0.
__device__ __forceinline__ float sigm(float z) { return __fdividef(1.0f, 1.0f + ex2(-z * LOG2E)); }
// Two values rounded to bf16 in one instruction, `lo` in the low half (the
// lower address when stored).
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// Loads and stores in f32 arithmetic, and rounding to the storage type.
template <typename T> __device__ __forceinline__ float ld(const T* p, long long i);
template <> __device__ __forceinline__ float ld<float>(const float* p, long long i) { return p[i]; }
template <> __device__ __forceinline__ float ld<bf16_t>(const bf16_t* p, long long i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) { p[i] = f32_to_bf16(v); }
__device__ __forceinline__ float rnd(float v, float) { return v; }
__device__ __forceinline__ float rnd(float v, bf16_t) { return bf16_to_f32(f32_to_bf16(v)); }
// V consecutive elements per 16-byte access (p + i 16-byte aligned),
// as f32.
template <typename T> struct Pack;
template <> struct Pack<float> {
    static const int V = 4;
    static __device__ __forceinline__ void load(const float* p, long long i, float* v) {
        const float4 r = *reinterpret_cast<const float4*>(p + i);
        v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
    }
    static __device__ __forceinline__ void store(float* p, long long i, const float* v) {
        *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    }
};
template <> struct Pack<bf16_t> {
    static const int V = 8;
    static __device__ __forceinline__ void load(const bf16_t* p, long long i, float* v) {
        const uint4 r = *reinterpret_cast<const uint4*>(p + i);
        const unsigned u[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[2 * k] = __uint_as_float(u[k] << 16);
            v[2 * k + 1] = __uint_as_float(u[k] & 0xffff0000u);
        }
    }
    static __device__ __forceinline__ void store(bf16_t* p, long long i, const float* v) {
        unsigned u[4];
#pragma unroll
        for (int k = 0; k < 4; ++k)
            u[k] = pack2(v[2 * k], v[2 * k + 1]);
        *reinterpret_cast<uint4*>(p + i) = make_uint4(u[0], u[1], u[2], u[3]);
    }
};

"#;

/// Tensor-core helpers (sm_80+): bf16 `mma.m16n8k16` with f32 accumulators
/// and `ldmatrix` fragment loads from shared memory. A warp's 16 x 8
/// accumulator tile: lane (g = lane / 4, t = lane % 4) holds rows g and
/// g + 8, columns 2t and 2t + 1.
pub const MMA: &str = r#"
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void ldsm4(unsigned (&r)[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm4t(unsigned (&r)[4], const bf16_t* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma16816(float* c, const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 16 (or 4) bytes global -> shared without registers (cp.async); zeros
// where !valid. Wait for the n-th last committed group with cp_wait<n>.
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp4(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
                 :: "r"(smem_u32(dst)), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" :: "n"(N));
}
"#;
