//! `BAMBA_MEMORY_TRACE=1` (CUDA): the device memory that live tensors take
//! (`in_use`) and that burn's pools hold (`reserved`, which only grows: it
//! is at least every peak so far), marked at the layer-by-layer step's
//! unit boundaries. `bench` runs one traced step after the timed ones and
//! prints the marks: where a step's memory goes, and between which marks
//! its peak lies (where `reserved` grows).

use std::sync::Mutex;

/// The environment variable that turns the trace on.
pub const VAR: &str = "BAMBA_MEMORY_TRACE";

type Probe = Box<dyn Fn() -> Option<(u64, u64)> + Send>;

struct Trace {
    probe: Probe,
    on: bool,
    marks: Vec<(String, u64, u64)>,
}

static TRACE: Mutex<Option<Trace>> = Mutex::new(None);

/// Whether [`VAR`] asks for a trace.
pub fn requested() -> bool {
    std::env::var(VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Installs the probe of `local_rank`'s GPU (off until [`start`]); nothing
/// on CPU builds.
pub fn install(local_rank: usize) {
    #[cfg(feature = "cuda")]
    {
        use cubecl_runtime::runtime::Runtime;
        let device = cubecl_cuda::CudaDevice::new(local_rank);
        let probe: Probe = Box::new(move || {
            let usage = cubecl_cuda::CudaRuntime::client(&device)
                .memory_usage()
                .ok()?;
            Some((usage.bytes_in_use, usage.bytes_reserved))
        });
        *TRACE.lock().expect("memory trace") = Some(Trace {
            probe,
            on: false,
            marks: Vec::new(),
        });
    }
    #[cfg(not(feature = "cuda"))]
    let _ = local_rank;
}

/// Starts recording marks (after an [`install`]).
pub fn start() {
    if let Some(t) = TRACE.lock().expect("memory trace").as_mut() {
        t.on = true;
        t.marks.clear();
    }
}

/// Records `label()` with the memory now, while recording.
pub fn mark(label: impl FnOnce() -> String) {
    if let Some(t) = TRACE.lock().expect("memory trace").as_mut()
        && t.on
        && let Some((in_use, reserved)) = (t.probe)()
    {
        t.marks.push((label(), in_use, reserved));
    }
}

/// Stops recording; the marks `(label, in_use, reserved)` so far.
pub fn finish() -> Vec<(String, u64, u64)> {
    match TRACE.lock().expect("memory trace").as_mut() {
        Some(t) => {
            t.on = false;
            std::mem::take(&mut t.marks)
        }
        None => Vec::new(),
    }
}
