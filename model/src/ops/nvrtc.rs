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
use cubecl_cuda::CudaRuntime;
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

fn context(device: usize) -> Arc<CudaContext> {
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

/// The kernel `name` of `src` (module `module`), compiled on first use.
pub fn function(device: usize, module: &'static str, src: &str, name: &str) -> cu::CUfunction {
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
        return f as cu::CUfunction;
    }
    let module_handle = m.handle as cu::CUmodule;
    let cname = std::ffi::CString::new(name).expect("kernel name");
    // SAFETY: a loaded module; the name is NUL-terminated.
    let f = unsafe { drv::module::get_function(module_handle, cname) }
        .unwrap_or_else(|e| panic!("kernel `{name}` in `{module}`: {e:?}"));
    m.functions.insert(name.to_string(), f as usize);
    f
}

/// Device pointers of several tensors (0 for `None`) and the stream of the
/// first, resolved in one call on cubecl's device thread: from any other
/// thread, each `get_resource` is a blocking round trip to that thread
/// (cubecl 0.10's channel device handle), so a launch pays one, not one per
/// operand. The round trip also orders the launch after every burn op
/// enqueued before it (the device thread runs its queue in order).
pub fn ptrs_dyn(ts: &[Option<&T>]) -> (Vec<u64>, cu::CUstream) {
    let client = ts
        .iter()
        .flatten()
        .next()
        .expect("ptrs: at least one tensor")
        .client
        .clone();
    let handles: Vec<_> = ts.iter().map(|t| t.map(|t| t.handle.clone())).collect();
    let on_device = client.clone();
    let (p, stream) = client
        .exclusive(move || {
            let mut stream = 0usize;
            let p: Vec<u64> = handles
                .into_iter()
                .map(|h| {
                    h.map_or(0, |h| {
                        let res = on_device
                            .get_resource(h)
                            .expect("device memory of a CUDA tensor");
                        let r = res.resource();
                        if stream == 0 {
                            stream = r.stream as usize;
                        }
                        r.ptr
                    })
                })
                .collect();
            (p, stream)
        })
        .expect("cubecl's device thread");
    (p, stream as cu::CUstream)
}

/// [`ptrs_dyn`] for a fixed set of tensors, some optional.
pub fn ptrs_opt<const N: usize>(ts: [Option<&T>; N]) -> ([u64; N], cu::CUstream) {
    let (p, stream) = ptrs_dyn(&ts);
    (p.try_into().expect("one pointer per tensor"), stream)
}

/// [`ptrs_dyn`] for a fixed set of tensors: `([pointers], stream of the first)`.
pub fn ptrs<const N: usize>(ts: [&T; N]) -> ([u64; N], cu::CUstream) {
    ptrs_opt(ts.map(Some))
}

/// Launches `f` on `stream`. `params` point at the kernel's arguments, in
/// order (see [`args!`](crate::kernel_args)).
///
/// # Safety
/// The arguments must match the kernel's signature and every pointer must be
/// a live buffer of the sizes the kernel reads and writes.
pub unsafe fn launch(
    device: usize,
    f: cu::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    stream: cu::CUstream,
    params: &mut [*mut c_void],
) {
    let _ctx = context(device);
    // SAFETY: forwarded to the caller.
    unsafe { drv::launch_kernel(f, grid, block, shared, stream, params) }
        .unwrap_or_else(|e| panic!("kernel launch (grid {grid:?}, block {block:?}): {e:?}"));
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
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (bf16_t)(u >> 16);
}
"#;
