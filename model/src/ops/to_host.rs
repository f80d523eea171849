//! Device tensors copied into host memory at the bus's speed (checkpoints).
//!
//! burn's `into_data` reads through cubecl's pinned pool in pieces, copying
//! each twice on one host thread: about 2.7 GB/s, so staging a rank's 15 GB
//! of weights and moments stalled training several seconds a checkpoint.
//! Here two pinned buffers take turns: the DMA engine fills one while every
//! core copies the other into its place in the destination (touching its
//! fresh pages in parallel too).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;
use cudarc::driver::{result as drv, sys as cu};

use super::nvrtc::{self, T};

/// Bytes per pinned buffer (two per device, kept for the process's life).
const CHUNK: usize = 64 << 20;

/// A device's two pinned buffers, as host addresses.
struct Staging([usize; 2]);

fn staging(device: usize) -> Result<[usize; 2], String> {
    static BUFFERS: OnceLock<Mutex<HashMap<usize, Staging>>> = OnceLock::new();
    let mut all = BUFFERS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| "staging buffers poisoned".to_string())?;
    if let Some(s) = all.get(&device) {
        return Ok(s.0);
    }
    let mut bufs = [0usize; 2];
    for b in &mut bufs {
        // SAFETY: a plain pinned allocation in the bound context; portable,
        // so any context of the process may copy into it.
        let p = unsafe { drv::malloc_host(CHUNK, cu::CU_MEMHOSTALLOC_PORTABLE) }
            .map_err(|e| format!("pinning {} MB of host memory: {e:?}", CHUNK >> 20))?;
        *b = p as usize;
    }
    all.insert(device, Staging(bufs));
    Ok(bufs)
}

/// The destination, handed to cubecl's device thread while the caller waits.
#[derive(Clone, Copy)]
struct Dst(*mut u8);
// SAFETY: the caller blocks until the copy has finished with it.
unsafe impl Send for Dst {}

/// Copies the f32 tensors `ts`, concatenated, into `out` (exactly their
/// total length), after every op enqueued before. Returns an error, not a
/// panic, when the driver refuses (the caller may fall back).
pub fn read_f32(ts: Vec<T>, out: &mut [f32]) -> Result<(), String> {
    let ts: Vec<T> = ts.into_iter().map(into_contiguous).collect();
    if let Some(t) = ts.iter().find(|t| t.dtype != DType::F32) {
        return Err(format!("read_f32: a {:?} tensor", t.dtype));
    }
    let lens: Vec<usize> = ts.iter().map(|t| t.meta.shape().num_elements()).collect();
    if lens.iter().sum::<usize>() != out.len() {
        return Err("read_f32: the destination's length".into());
    }
    if ts.is_empty() {
        return Ok(());
    }
    let device = ts[0].device.index;
    let dst = Dst(out.as_mut_ptr().cast());
    let refs: Vec<Option<&T>> = ts.iter().map(Some).collect();
    // On cubecl's device thread, in order after what is queued there.
    nvrtc::run_dyn(&refs, move |ptrs, stream| {
        let _ctx = nvrtc::context(device);
        copy(device, &ptrs, &lens, dst, stream)
    })
}

/// The pipelined copy, on cubecl's device thread: pieces of at most
/// [`CHUNK`] bytes, the DMA of piece k + 1 beside the host's copy of k.
fn copy(
    device: usize,
    ptrs: &[u64],
    lens: &[usize],
    dst: Dst,
    stream: nvrtc::Stream,
) -> Result<(), String> {
    let err = |what: &str, e: cudarc::driver::DriverError| format!("read_f32: {what}: {e:?}");
    let bufs = staging(device)?;
    // (device address, bytes, offset in the destination)
    let mut pieces = Vec::new();
    let mut at = 0usize;
    for (&p, &n) in ptrs.iter().zip(lens) {
        let bytes = 4 * n;
        for off in (0..bytes).step_by(CHUNK) {
            pieces.push((p + off as u64, CHUNK.min(bytes - off), at + off));
        }
        at += bytes;
    }
    let event = || {
        drv::event::create(cu::CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(|e| err("event", e))
    };
    let events = [event()?, event()?];
    let issue = |k: usize| -> Result<(), String> {
        let (src, len, _) = pieces[k];
        // SAFETY: `len` bytes of a live f32 buffer (bound by the task's
        // bindings) into a pinned buffer of CHUNK bytes no copy is reading.
        unsafe {
            let host = std::slice::from_raw_parts_mut(bufs[k % 2] as *mut u8, len);
            drv::memcpy_dtoh_async(host, src, stream).map_err(|e| err("copy", e))?;
            drv::event::record(events[k % 2], stream).map_err(|e| err("event", e))
        }
    };
    let result = (|| {
        for k in 0..pieces.len().min(2) {
            issue(k)?;
        }
        for k in 0..pieces.len() {
            // SAFETY: an event recorded above.
            unsafe { drv::event::synchronize(events[k % 2]) }.map_err(|e| err("wait", e))?;
            let (_, len, to) = pieces[k];
            spread_copy(bufs[k % 2] as *const u8, dst.0.wrapping_add(to), len);
            if k + 2 < pieces.len() {
                issue(k + 2)?;
            }
        }
        Ok(())
    })();
    for e in events {
        // SAFETY: created above; every use has been waited for.
        let _ = unsafe { drv::event::destroy(e) };
    }
    result
}

/// `len` bytes from `src` to `dst` over all cores.
fn spread_copy(src: *const u8, dst: *mut u8, len: usize) {
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(16));
    let part = len.div_ceil(threads).next_multiple_of(4096);
    let (src, dst) = (src as usize, dst as usize);
    std::thread::scope(|s| {
        for start in (0..len).step_by(part) {
            let n = part.min(len - start);
            s.spawn(move || {
                // SAFETY: disjoint ranges of a pinned buffer holding `len`
                // bytes and of the caller's destination.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        (src + start) as *const u8,
                        (dst + start) as *mut u8,
                        n,
                    )
                }
            });
        }
    });
}
