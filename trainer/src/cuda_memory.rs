//! How burn's CUDA backend pools device memory, chosen by the environment
//! variable `BAMBA_CUDA_MEMORY` (as `PYTORCH_CUDA_ALLOC_CONF` does for
//! PyTorch), before a device is first used:
//!
//! - `subslices` (cubecl's own default): every size class cuts allocations out of
//!   large pages, and each reservation coalesces and scans every slice of
//!   its class's pages, so its cost grows with the number of live
//!   allocations. A kernel launch reserves two or three times (output,
//!   metadata, pinned staging).
//! - `exclusive`: every allocation is its own page, found by size class.
//! - `mixed`: exclusive pages up to 4 MiB (the many small allocations),
//!   cubecl's sliced pages above (the few large ones).
//! - `bucketed` (the default here): `mixed` up to 64 MiB, exclusive pages
//!   above, in size classes four to a doubling up to the largest page, kept once
//!   allocated (a step's large tensors recur with the same sizes). Sliced
//!   pages mix a step's sizes within a page: on Bamba-9B's layers 16 deep
//!   on one H200 (2 x 4096, a quarter of the layers recomputed) they held
//!   116 GB for a live peak near 91 GB, where exclusive pages held 106 GB
//!   (2026-12-03, `BAMBA_MEMORY_TRACE`). Exclusive pools scan their pages on
//!   each reservation, so the many mid-size requests stay on sliced pages.
//!
//! Per reservation on host memory (`bench --ops --only allocator` in a cuda
//! build; cubecl's pool logic is the same for every storage), 120 to 7,200
//! live allocations: subslices 4.6 to 13.5 us, exclusive 3.4 to 4.8, mixed
//! 0.25 to 0.92.
//!
//! On the GPU (2026-11-23), one small burn op cost the host 61 us under
//! `subslices` and 11.7 us under `mixed` on an H100 (`bench --ops --only
//! launch`); the 1B step went from 204 to 199 ms and Bamba-9B on 2 H200s
//! gained 1-2%, with peak memory no higher (65.7 vs 66.0 GB; 121.0 vs
//! 122.4 GB).

use anyhow::{Result, bail};

/// The environment variable that picks the pools.
pub const VAR: &str = "BAMBA_CUDA_MEMORY";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    SubSlices,
    Exclusive,
    Mixed,
    Bucketed,
}

impl Preset {
    /// `value` of [`VAR`]; unset or empty is the default.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        Ok(match value.map(str::trim).unwrap_or("") {
            "subslices" => Self::SubSlices,
            "exclusive" => Self::Exclusive,
            "mixed" => Self::Mixed,
            "" | "bucketed" => Self::Bucketed,
            other => {
                bail!("{VAR}={other:?}: expected one of subslices, exclusive, mixed, bucketed")
            }
        })
    }

    pub fn from_env() -> Result<Self> {
        Self::parse(std::env::var(VAR).ok().as_deref())
    }
}

/// One pool of a [`Preset::Mixed`] configuration, smallest first: the first
/// pool whose `max` holds a request serves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Each allocation its own page, up to `max` bytes.
    Exclusive { max: u64 },
    /// Slices of up to `max` bytes cut from pages of `page` bytes.
    Sliced { max: u64, page: u64 },
}

impl Pool {
    pub fn max(&self) -> u64 {
        match *self {
            Pool::Exclusive { max } | Pool::Sliced { max, .. } => max,
        }
    }
}

/// Largest request served by the small exclusive pools of [`Preset::Mixed`]
/// and [`Preset::Bucketed`] (returned to the driver when unused).
pub const EXCLUSIVE_MAX: u64 = 4 << 20;

/// [`Preset::Mixed`]'s pools for a device whose largest allocation is
/// `max_page` bytes with offsets aligned to `align`: exclusive size classes
/// up to [`EXCLUSIVE_MAX`], then cubecl's own sliced pools (its `SubSlices`
/// preset) for what is larger.
pub fn mixed_pools(max_page: u64, align: u64) -> Vec<Pool> {
    const MB: u64 = 1 << 20;
    // Requests smaller than the alignment can't take offsets (cubecl's first pool).
    let mut pools = vec![Pool::Exclusive { max: 0 }];
    let mut size = 4 << 10;
    while size <= EXCLUSIVE_MAX {
        pools.push(Pool::Exclusive { max: size });
        size *= 4;
    }
    // cubecl's SubSlices classes: pages a quarter of the previous one,
    // slices of at most page / 2^i, down to pages of 32 MiB.
    let (mut page, mut shift, mut sliced) = (max_page, 1u32, vec![]);
    while page >= 32 * MB {
        page = (page / 4).next_multiple_of(align);
        sliced.push(Pool::Sliced {
            max: page >> shift,
            page,
        });
        shift += 1;
    }
    sliced.reverse();
    pools.extend(sliced.into_iter().filter(|p| p.max() > EXCLUSIVE_MAX));
    let top = max_page / align * align;
    pools.push(Pool::Sliced {
        max: top,
        page: top,
    });
    pools
}

/// Smallest request served by [`Preset::Bucketed`]'s large exclusive pages.
pub const LARGE_MIN: u64 = 64 << 20;

/// [`Preset::Bucketed`]'s large classes per doubling of size: each class
/// is at most a quarter above the one below it. A page is made at least the
/// running mean of its class's requests, and a request takes any free page
/// of its class that holds it, so a wide class wastes up to half of what
/// it holds (doubling classes: 18.4 GB over a 94.7 GB live peak on the 9B
/// proxy, 2026-12-03).
const LARGE_CLASSES_PER_DOUBLING: u64 = 4;

/// [`Preset::Bucketed`]'s pools: [`mixed_pools`]' below [`LARGE_MIN`], then
/// exclusive pages in classes [`LARGE_CLASSES_PER_DOUBLING`] to a doubling,
/// up to `max_page` (a request takes a free page of its class or a new one).
pub fn bucketed_pools(max_page: u64, align: u64) -> Vec<Pool> {
    let mut pools: Vec<Pool> = mixed_pools(max_page, align)
        .into_iter()
        .filter(|p| p.max() < LARGE_MIN)
        .collect();
    let top = max_page / align * align;
    let mut octave = LARGE_MIN;
    'classes: loop {
        for j in 0..LARGE_CLASSES_PER_DOUBLING {
            let size = (octave + octave * j / LARGE_CLASSES_PER_DOUBLING).next_multiple_of(align);
            if size >= top {
                break 'classes;
            }
            pools.push(Pool::Exclusive { max: size });
        }
        octave *= 2;
    }
    pools.push(Pool::Exclusive { max: top });
    pools
}

#[cfg(feature = "cuda")]
mod cubecl_pools {
    use super::{EXCLUSIVE_MAX, Pool, Preset, bucketed_pools, mixed_pools};
    use cubecl_runtime::memory_management::{MemoryConfiguration, MemoryPoolOptions, PoolType};

    /// Unused exclusive pages are returned to the driver after this many
    /// reservations (cubecl's base period).
    const DEALLOC_PERIOD: u64 = 5000;
    /// The same for [`Preset::Bucketed`]'s large pages: a step reserves a
    /// few thousand times, so a page unused for tens of steps.
    const LARGE_DEALLOC_PERIOD: u64 = 100_000;

    pub fn configuration(preset: Preset, max_page: u64, align: u64) -> MemoryConfiguration {
        match preset {
            Preset::SubSlices => MemoryConfiguration::SubSlices,
            Preset::Exclusive => MemoryConfiguration::ExclusivePages,
            Preset::Mixed | Preset::Bucketed => MemoryConfiguration::Custom {
                pool_options: match preset {
                    Preset::Mixed => mixed_pools(max_page, align),
                    _ => bucketed_pools(max_page, align),
                }
                .into_iter()
                .map(|p| match p {
                    // Large pages are freed only after long disuse (a shape
                    // change: evaluation, another micro-batch): freeing one
                    // synchronises the device.
                    Pool::Exclusive { max } => MemoryPoolOptions {
                        pool_type: PoolType::ExclusivePages {
                            max_alloc_size: max,
                        },
                        dealloc_period: match max {
                            0 => None,
                            m if m <= EXCLUSIVE_MAX => Some(DEALLOC_PERIOD),
                            _ => Some(LARGE_DEALLOC_PERIOD),
                        },
                    },
                    Pool::Sliced { max, page } => MemoryPoolOptions {
                        pool_type: PoolType::SlicedPages {
                            page_size: page,
                            max_slice_size: max,
                        },
                        dealloc_period: None,
                    },
                })
                .collect(),
            },
        }
    }
}
#[cfg(feature = "cuda")]
pub use cubecl_pools::configuration;

/// Reads [`VAR`] and makes CUDA devices started from now on use its pools.
/// Call before the first use of a device; later calls keep the first choice.
#[cfg(feature = "cuda")]
pub fn install() -> Result<Preset> {
    static PRESET: std::sync::OnceLock<Preset> = std::sync::OnceLock::new();
    let preset = Preset::from_env()?;
    let chosen = *PRESET.get_or_init(|| preset);
    cubecl_cuda::set_memory_configuration(|props| {
        configuration(
            *PRESET.get().expect("set before the device starts"),
            props.max_page_size,
            props.alignment,
        )
    });
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_bad_values_name_the_variable() {
        assert_eq!(Preset::parse(None).unwrap(), Preset::Bucketed);
        assert_eq!(Preset::parse(Some("")).unwrap(), Preset::Bucketed);
        assert_eq!(Preset::parse(Some("mixed")).unwrap(), Preset::Mixed);
        assert_eq!(Preset::parse(Some("subslices")).unwrap(), Preset::SubSlices);
        assert_eq!(
            Preset::parse(Some(" exclusive ")).unwrap(),
            Preset::Exclusive
        );
        let err = Preset::parse(Some("fast")).unwrap_err().to_string();
        assert!(
            err.contains(VAR) && err.contains("fast") && err.contains("mixed"),
            "{err}"
        );
    }

    #[test]
    fn mixed_pools_route_small_requests_to_exclusive_pages() {
        let (max_page, align) = (20 << 30, 512);
        let pools = mixed_pools(max_page, align);
        // Ordered by the largest request each serves, so the first fit is the tightest.
        assert!(
            pools.windows(2).all(|w| w[0].max() < w[1].max()),
            "{pools:?}"
        );
        let serve = |size: u64| *pools.iter().find(|p| p.max() >= size).unwrap();
        for size in [1, 256, 4096, 100_000, EXCLUSIVE_MAX] {
            assert!(matches!(serve(size), Pool::Exclusive { .. }), "{size}");
        }
        for size in [EXCLUSIVE_MAX + 1, 64 << 20, 3 << 30, max_page] {
            let p = serve(size);
            assert!(matches!(p, Pool::Sliced { .. }), "{size}: {p:?}");
            if let Pool::Sliced { max, page } = p {
                assert!(max <= page && page % align == 0, "{p:?}");
            }
        }
    }

    #[test]
    fn bucketed_pools_keep_large_requests_on_exclusive_classes() {
        let (max_page, align) = (20 << 30, 512);
        let pools = bucketed_pools(max_page, align);
        assert!(
            pools.windows(2).all(|w| w[0].max() < w[1].max()),
            "{pools:?}"
        );
        let serve = |size: u64| *pools.iter().find(|p| p.max() >= size).unwrap();
        assert!(matches!(serve(EXCLUSIVE_MAX), Pool::Exclusive { .. }));
        assert!(matches!(serve(EXCLUSIVE_MAX + 1), Pool::Sliced { .. }));
        // From LARGE_MIN up a class is exclusive and at most a quarter above
        // its smallest request.
        for size in [
            LARGE_MIN,
            LARGE_MIN + 1,
            100 << 20,
            3 << 30,
            (3 << 30) + 7,
            max_page,
        ] {
            let p = serve(size);
            assert!(matches!(p, Pool::Exclusive { .. }), "{size}: {p:?}");
            let class = p.max();
            assert!(class >= size && class % align == 0, "{size}: {class}");
            assert!(
                4 * class <= 5 * size || size == LARGE_MIN,
                "{size}: {class}"
            );
        }
        assert_eq!(pools.last().unwrap().max(), max_page);
    }
}
