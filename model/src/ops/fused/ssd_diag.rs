//! The SSD's intra-chunk (diagonal-block) product and its gradients.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;

use super::{Cb, empty, same_dtype, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

/// The SSD's intra-chunk product without its `[q, q]` matrix per head
/// (mamba_ssm's `chunk_scan` diagonal blocks): 64 x 64 output tiles, the
/// masked decay built tile by tile in shared memory.
const SSD_DIAG: &str = r#"
// Per (batch-chunk, head), with S [bc, g, q, q], cs [bc, q, h], v and out
// [bc, q, h, p] (rows of h * p):
//   forward:   out[i] = sum_{j <= i} exp(cs[i] - cs[j]) S[g(h)][i, j] v[j]
//   transpose: out[i] = sum_{j >= i} exp(cs[j] - cs[i]) S[g(h)][j, i] v[j]
// 64 x 64 output tiles, 256 threads (8 warps). Every thread owns the 16
// elements of an mma.m16n8k8 accumulator layout: warp w covers rows
// (w % 4) * 16 + {g, g + 8} and columns (w / 4) * 32 + 8 s + {2 t, 2 t + 1}
// (g = lane / 4, t = lane % 4, s < 4). TC multiplies on tensor cores in
// TF32 (bf16 training); otherwise the same products run as f32 FMAs.
#define DG_T 64
#define DG_K 32
#define DG_KP 36  // padded rows: conflict-free fragment loads
#define DG_VP 72

__device__ __forceinline__ unsigned tf32_bits(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct Frag {
    int rb, cb, g, t;
    __device__ Frag() {
        const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
        rb = (w & 3) * 16; cb = (w >> 2) * 32; g = lane >> 2; t = lane & 3;
    }
    // Accumulator element e (s = e / 4, k = e % 4) -> tile row and column.
    __device__ int row(int e) const { return rb + g + ((e & 2) ? 8 : 0); }
    __device__ int col(int e) const { return cb + 8 * (e >> 2) + 2 * t + (e & 1); }
};

// acc += A[rows, 0..kn) B[0..kn), cols) over one shared tile, with
// A(i, k) and B(k, j) read through the accessors.
template <bool TC, typename FA, typename FB>
__device__ __forceinline__ void tile_mma(float (&acc)[16], const Frag& f, int kn, FA A, FB B) {
    if (TC) {
        for (int k = 0; k < kn; k += 8) {
            unsigned a[4];
            a[0] = tf32_bits(A(f.rb + f.g, k + f.t));
            a[1] = tf32_bits(A(f.rb + f.g + 8, k + f.t));
            a[2] = tf32_bits(A(f.rb + f.g, k + f.t + 4));
            a[3] = tf32_bits(A(f.rb + f.g + 8, k + f.t + 4));
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int j = f.cb + 8 * s + f.g;
                mma_tf32(acc + 4 * s, a, tf32_bits(B(k + f.t, j)), tf32_bits(B(k + f.t + 4, j)));
            }
        }
    } else {
#pragma unroll 4
        for (int k = 0; k < kn; ++k) {
            const float a0 = A(f.rb + f.g, k), a1 = A(f.rb + f.g + 8, k);
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int j = f.cb + 8 * s + 2 * f.t;
                const float b0 = B(k, j), b1 = B(k, j + 1);
                acc[4 * s + 0] = fmaf(a0, b0, acc[4 * s + 0]);
                acc[4 * s + 1] = fmaf(a0, b1, acc[4 * s + 1]);
                acc[4 * s + 2] = fmaf(a1, b0, acc[4 * s + 2]);
                acc[4 * s + 3] = fmaf(a1, b1, acc[4 * s + 3]);
            }
        }
    }
}

// One block's (batch-chunk, head, row tile, column tile) of diag_apply:
// grid (i tiles * bc * h, p tiles). A (chunk, head)'s row tiles run side by
// side (its v rows stay in L2), the longest (most column tiles) first.
template <bool TRANS>
struct ApplyTile {
    int i0, p0, j_begin, j_end;
    long long rs;
    const float *Sm, *cm, *vm;
    float* om;
    // Also loads the row tile's cs into c_i (shared, read after a barrier).
    __device__ __forceinline__ ApplyTile(const float* S, const float* cs, const float* v,
                                         float* out, int q, int h, int g, int p, float* c_i) {
        const int nt = (q + DG_T - 1) / DG_T;
        const int r = (int)(blockIdx.x % (unsigned)nt);
        const int it = TRANS ? r : nt - 1 - r;
        const int hi = (int)((blockIdx.x / (unsigned)nt) % (unsigned)h);
        const long long bc = blockIdx.x / ((unsigned)nt * (unsigned)h);
        p0 = blockIdx.y * DG_T;
        i0 = it * DG_T;
        const int gi = hi / (h / g);
        Sm = S + (bc * g + gi) * (long long)q * q;
        cm = cs + bc * q * (long long)h + hi;
        rs = (long long)h * p;
        vm = v + bc * q * rs + (long long)hi * p;
        om = out + bc * q * rs + (long long)hi * p;
        j_begin = TRANS ? i0 : 0;
        j_end = TRANS ? q : min(q, i0 + DG_T);
        const int tid = threadIdx.x;
        if (tid < DG_T) c_i[tid] = i0 + tid < q ? cm[(long long)(i0 + tid) * h] : 0.0f;
    }
    // The accumulator tile, written out.
    __device__ __forceinline__ void store(const float (&acc)[16], const Frag& f, int q,
                                          int p) const {
#pragma unroll
        for (int e = 0; e < 16; ++e) {
            const int i = i0 + f.row(e), pc = p0 + f.col(e);
            if (i < q && pc < p) om[(long long)i * rs + pc] = acc[e];
        }
    }
};

// grid (i tiles * bc * h, p tiles).
template <bool TRANS, bool TC>
__device__ __forceinline__ void diag_apply(
    const float* __restrict__ S, const float* __restrict__ cs, const float* __restrict__ v,
    float* __restrict__ out, int q, int h, int g, int p)
{
    __shared__ float Ms[DG_T][DG_KP];
    __shared__ float Vs[DG_K][DG_VP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[DG_K];
    const int tid = threadIdx.x;
    const Frag f;
    const ApplyTile<TRANS> a(S, cs, v, out, q, h, g, p, c_i);
    const int i0 = a.i0, p0 = a.p0, j_begin = a.j_begin, j_end = a.j_end;
    const float *Sm = a.Sm, *cm = a.cm, *vm = a.vm;
    const long long rs = a.rs;
    float acc[16] = {};
    for (int j0 = j_begin; j0 < j_end; j0 += DG_K) {
        __syncthreads();  // the previous tile is consumed
        if (tid < DG_K) c_j[tid] = j0 + tid < q ? cm[(long long)(j0 + tid) * h] : 0.0f;
        for (int e = tid; e < DG_K * DG_T; e += 256) {
            const int jj = e / DG_T, pp = e - jj * DG_T;
            const int j = j0 + jj, pc = p0 + pp;
            Vs[jj][pp] = (j < q && pc < p) ? vm[(long long)j * rs + pc] : 0.0f;
        }
        __syncthreads();
        for (int e = tid; e < DG_T * DG_K; e += 256) {
            // Coalesced reads of S: along j forward, along i transposed.
            const int ii = TRANS ? e % DG_T : e / DG_K;
            const int jj = TRANS ? e / DG_T : e % DG_K;
            const int i = i0 + ii, j = j0 + jj;
            float m = 0.0f;
            if (i < q && j < q) {
                if (!TRANS && j <= i) m = __expf(c_i[ii] - c_j[jj]) * Sm[(long long)i * q + j];
                if (TRANS && j >= i) m = __expf(c_j[jj] - c_i[ii]) * Sm[(long long)j * q + i];
            }
            Ms[ii][jj] = m;
        }
        __syncthreads();
        tile_mma<TC>(acc, f, DG_K,
                     [&](int i, int k) { return Ms[i][k]; },
                     [&](int k, int j) { return Vs[k][j]; });
    }
    a.store(acc, f, q, p);
}

// diag_apply with the next 32-row tile of v, S and cs copied in (cp.async)
// while this one multiplies: the loop was bound by two dependent global
// round trips per tile. Needs p and q multiples of 4 (16-byte rows).
#define DG_SP 68  // transposed S tile [32][64] rows, padded (16-byte aligned)
template <bool TRANS, bool TC>
__device__ __forceinline__ void diag_apply_pipe(
    const float* __restrict__ S, const float* __restrict__ cs, const float* __restrict__ v,
    float* __restrict__ out, int q, int h, int g, int p)
{
    __shared__ __align__(16) float Vs[2][DG_K][DG_VP];
    __shared__ __align__(16) float Sr[2][DG_T * DG_KP];  // [64][36] or [32][68]
    __shared__ float Ms[DG_T][DG_KP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[2][DG_K];
    const int tid = threadIdx.x;
    const Frag f;
    const ApplyTile<TRANS> a(S, cs, v, out, q, h, g, p, c_i);
    const int i0 = a.i0, p0 = a.p0, j_begin = a.j_begin, j_end = a.j_end;
    const float *Sm = a.Sm, *cm = a.cm, *vm = a.vm;
    const long long rs = a.rs;
    float acc[16] = {};
    const int tiles = (j_end - j_begin + DG_K - 1) / DG_K;
    auto issue = [&](int t, int buf) {
        const int j0 = j_begin + t * DG_K;
        if (tid < DG_K) {
            const int j = j0 + tid;
            cp4(&c_j[buf][tid], j < q ? cm + (long long)j * h : cm, j < q);
        }
        for (int e = tid; e < DG_K * 16; e += 256) {
            const int jj = e >> 4, c4 = (e & 15) * 4, j = j0 + jj, pc = p0 + c4;
            const bool ok = j < q && pc < p;
            cp16(&Vs[buf][jj][c4], ok ? vm + (long long)j * rs + pc : vm, ok);
        }
        if (!TRANS) {  // S[i0 .. i0 + 64, j0 .. j0 + 32]
            for (int e = tid; e < DG_T * 8; e += 256) {
                const int ii = e >> 3, c4 = (e & 7) * 4, i = i0 + ii, j = j0 + c4;
                const bool ok = i < q && j < q;
                cp16(&Sr[buf][ii * DG_KP + c4], ok ? Sm + (long long)i * q + j : Sm, ok);
            }
        } else {  // S[j0 .. j0 + 32, i0 .. i0 + 64]
            for (int e = tid; e < DG_K * 16; e += 256) {
                const int jj = e >> 4, c4 = (e & 15) * 4, j = j0 + jj, i = i0 + c4;
                const bool ok = j < q && i < q;
                cp16(&Sr[buf][jj * DG_SP + c4], ok ? Sm + (long long)j * q + i : Sm, ok);
            }
        }
        cp_commit();
    };
    issue(0, 0);
    for (int t = 0; t < tiles; ++t) {
        const int buf = t & 1, j0 = j_begin + t * DG_K;
        if (t + 1 < tiles) {
            issue(t + 1, buf ^ 1);
            cp_wait<1>();
        } else {
            cp_wait<0>();
        }
        __syncthreads();  // tile t (and c_i) landed for every thread
        for (int e = tid; e < DG_T * DG_K; e += 256) {
            int ii, jj;
            if (TRANS) {  // 4 rows x 8 columns per warp: conflict-free column reads of Sr
                const int w = e >> 5, lane = e & 31;
                ii = (w & 15) * 4 + (lane & 3);
                jj = (w >> 4) * 8 + (lane >> 2);
            } else {
                ii = e / DG_K;
                jj = e % DG_K;
            }
            const int i = i0 + ii, j = j0 + jj;
            float m = 0.0f;
            if (i < q && j < q) {
                if (!TRANS && j <= i)
                    m = __expf(c_i[ii] - c_j[buf][jj]) * Sr[buf][ii * DG_KP + jj];
                if (TRANS && j >= i)
                    m = __expf(c_j[buf][jj] - c_i[ii]) * Sr[buf][jj * DG_SP + ii];
            }
            Ms[ii][jj] = m;
        }
        __syncthreads();
        tile_mma<TC>(acc, f, DG_K,
                     [&](int i, int k) { return Ms[i][k]; },
                     [&](int k, int j) { return Vs[buf][k][j]; });
        __syncthreads();  // Ms and this buffer consumed before they are refilled
    }
    a.store(acc, f, q, p);
}

// Register caps from ncu on the H100 (1B shapes): the forward at 78
// registers ran 3 blocks per SM, at 64 four (-30%); the transpose needs 48.
// APPLY: diag_apply or diag_apply_pipe.
#define DIAG_ENTRY(name, APPLY, TRANS, TC, MINB)                                         \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(                        \
        const float* S, const float* cs, const float* v, float* out, int q, int h, int g, int p) \
    {                                                                                    \
        APPLY<TRANS, TC>(S, cs, v, out, q, h, g, p);                                     \
    }
DIAG_ENTRY(ssd_diag_fwd, diag_apply, false, false, 4)
DIAG_ENTRY(ssd_diag_dx, diag_apply, true, false, 5)
DIAG_ENTRY(ssd_diag_fwd_tc, diag_apply, false, true, 4)
DIAG_ENTRY(ssd_diag_dx_tc, diag_apply, true, true, 5)
DIAG_ENTRY(ssd_diag_fwd_p, diag_apply_pipe, false, false, 4)
DIAG_ENTRY(ssd_diag_dx_p, diag_apply_pipe, true, false, 4)
DIAG_ENTRY(ssd_diag_fwd_tc_p, diag_apply_pipe, false, true, 4)
DIAG_ENTRY(ssd_diag_dx_tc_p, diag_apply_pipe, true, true, 4)

// One head's share of a (batch-chunk, group) tile's gradients, from its
// d = dy x^T tile: dS into `ds`; dcs row sums into part slot jt, column sums
// into slot nt + it.
__device__ __forceinline__ void grad_head(
    const Frag& f, const float (&d)[16], const float (&s)[16], float (&ds)[16],
    const float* c_i, const float* c_j, float (*red)[33], float* __restrict__ part,
    int i0, int j0, int q, int h, int hi, int it, int jt, int nt, long long bcn, long long bc)
{
    const int tid = threadIdx.x;
    // Row sums: 4 columns-pairs per thread, 8 contributors per row
    // (4 lanes x 2 column warps); column sums: 32 per column.
    float rsum[2] = {0.0f, 0.0f}, csum[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) csum[c] = 0.0f;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int ii = f.row(e), jj = f.col(e);
        const int i = i0 + ii, j = j0 + jj;
        if (i < q && j <= i) {
            const float ev = __expf(c_i[ii] - c_j[jj]) * d[e];
            ds[e] += ev;
            const float gg = s[e] * ev;
            rsum[(e >> 1) & 1] += gg;
            csum[2 * (e >> 2) + (e & 1)] += gg;
        }
    }
    const int w = tid >> 5;
    red[f.rb + f.g][(w >> 2) * 4 + f.t] = rsum[0];
    red[f.rb + f.g + 8][(w >> 2) * 4 + f.t] = rsum[1];
    __syncthreads();
    if (tid < DG_T && i0 + tid < q) {
        float t = 0.0f;
        for (int k2 = 0; k2 < 8; ++k2) t += red[tid][k2];
        part[(((long long)jt * bcn + bc) * q + i0 + tid) * h + hi] = t;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        const int jj = f.cb + 8 * (c >> 1) + 2 * f.t + (c & 1);
        red[jj][(w & 3) * 8 + f.g] = csum[c];
    }
    __syncthreads();
    if (tid < DG_T && j0 + tid < q) {
        float t = 0.0f;
        for (int k2 = 0; k2 < 32; ++k2) t += red[tid][k2];
        part[(((long long)(nt + it) * bcn + bc) * q + j0 + tid) * h + hi] = -t;
    }
}

// For one 64 x 64 tile (it, jt) of one (batch-chunk, group), with
//   G_h[i, j] = exp(cs_h[i] - cs_h[j]) (dy_h[i] . x_h[j])   (j <= i):
//   dS[i, j] = sum over the group's heads of G_h[i, j];
//   dcs_h[i] += sum_j S[i, j] G_h[i, j],  dcs_h[j] -= sum_i S[i, j] G_h[i, j].
// The dcs sums go to part [2 nt, bc, q, h] (zeroed): row sums in slot jt,
// column sums in slot nt + it, added in a fixed order after (reproducible:
// no atomics). grid (nt * nt * hs * bc * g): the group's heads in `hs` splits,
// each writing its own dS partial [hs, bc, g, q, q]; tiles above the
// diagonal write zeros.
// PIPE: each (head, 32 columns) stage of dy and x is copied in (cp.async)
// while the previous one multiplies (needs p a multiple of 4); otherwise
// loaded through registers between two barriers.
template <bool TC, bool PIPE>
__device__ __forceinline__ void diag_grad(
    const float* __restrict__ S, const float* __restrict__ cs, const float* __restrict__ x,
    const float* __restrict__ dy, float* __restrict__ dS, float* __restrict__ part,
    int q, int h, int g, int p, int nt, long long bcn, int hs)
{
    __shared__ __align__(16) float As[PIPE ? 2 : 1][DG_T][DG_KP];
    __shared__ __align__(16) float Bs[PIPE ? 2 : 1][DG_T][DG_KP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[DG_T];
    __shared__ float red[DG_T][33];
    const int tid = threadIdx.x;
    const Frag f;
    // A (chunk, group, split)'s tiles run side by side (its rows stay in L2).
    const int tile = (int)(blockIdx.x % (unsigned)(nt * nt));
    const int jt = tile % nt, it = tile / nt;
    const int split = (int)((blockIdx.x / (unsigned)(nt * nt)) % (unsigned)hs);
    const long long bcg = blockIdx.x / ((unsigned)(nt * nt) * (unsigned)hs);
    const int gi = (int)(bcg % g);
    const long long bc = bcg / g;
    const int i0 = it * DG_T, j0 = jt * DG_T;
    const int hg = h / g, per = hg / hs;
    float* dSm = dS + ((split * bcn + bc) * g + gi) * (long long)q * q;
    if (jt > it) {
        for (int e = tid; e < DG_T * DG_T; e += 256) {
            const int i = i0 + (e >> 6), j = j0 + (e & 63);
            if (i < q && j < q) dSm[(long long)i * q + j] = 0.0f;
        }
        return;
    }
    const float* Sm = S + (bc * g + gi) * (long long)q * q;
    float s[16], ds[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int i = i0 + f.row(e), j = j0 + f.col(e);
        s[e] = (i < q && j <= i) ? Sm[(long long)i * q + j] : 0.0f;
        ds[e] = 0.0f;
    }
    const long long rs = (long long)h * p;
    const int kst = (p + DG_K - 1) / DG_K, stages = per * kst;
    // Stage st: head split * per + st / kst, columns (st % kst) * 32 ..
    auto issue = [&](int st, int buf) {
        const int hi = gi * hg + split * per + st / kst, k0 = (st % kst) * DG_K;
        const float* xm = x + bc * q * rs + (long long)hi * p;
        const float* dym = dy + bc * q * rs + (long long)hi * p;
        if (PIPE) {
            for (int e = tid; e < DG_T * 8; e += 256) {
                const int rr = e >> 3, c4 = (e & 7) * 4, pc = k0 + c4;
                const bool oa = i0 + rr < q && pc < p, ob = j0 + rr < q && pc < p;
                cp16(&As[buf][rr][c4], oa ? dym + (long long)(i0 + rr) * rs + pc : dym, oa);
                cp16(&Bs[buf][rr][c4], ob ? xm + (long long)(j0 + rr) * rs + pc : xm, ob);
            }
            cp_commit();
        } else {
            for (int e = tid; e < DG_T * DG_K; e += 256) {
                const int rr = e >> 5, kk = e & 31, pc = k0 + kk;
                As[0][rr][kk] = (i0 + rr < q && pc < p) ? dym[(long long)(i0 + rr) * rs + pc] : 0.0f;
                Bs[0][rr][kk] = (j0 + rr < q && pc < p) ? xm[(long long)(j0 + rr) * rs + pc] : 0.0f;
            }
        }
    };
    if (PIPE) issue(0, 0);
    for (int k = 0; k < per; ++k) {
        const int hi = gi * hg + split * per + k;
        const float* cm = cs + bc * q * (long long)h + hi;
        __syncthreads();  // the previous head's c_i, c_j and red are consumed
        if (tid < DG_T) c_i[tid] = i0 + tid < q ? cm[(long long)(i0 + tid) * h] : 0.0f;
        else if (tid < 2 * DG_T) c_j[tid - DG_T] = j0 + tid - DG_T < q ? cm[(long long)(j0 + tid - DG_T) * h] : 0.0f;
        float d[16];
#pragma unroll
        for (int e = 0; e < 16; ++e) d[e] = 0.0f;
        for (int kk = 0; kk < kst; ++kk) {
            const int st = k * kst + kk, buf = PIPE ? st & 1 : 0;
            if (PIPE) {
                if (st + 1 < stages) {
                    issue(st + 1, buf ^ 1);
                    cp_wait<1>();
                } else {
                    cp_wait<0>();
                }
            } else {
                if (kk > 0) __syncthreads();  // the previous stage is consumed
                issue(st, 0);
            }
            __syncthreads();
            tile_mma<TC>(d, f, DG_K,
                         [&](int i, int c) { return As[buf][i][c]; },
                         [&](int c, int j) { return Bs[buf][j][c]; });
            if (PIPE) __syncthreads();  // this buffer consumed before it is refilled
        }
        grad_head(f, d, s, ds, c_i, c_j, red, part, i0, j0, q, h, hi, it, jt, nt, bcn, bc);
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int i = i0 + f.row(e), j = j0 + f.col(e);
        if (i < q && j < q) dSm[(long long)i * q + j] = ds[e];
    }
}

#define GRAD_ENTRY(name, TC, PIPE)                                                       \
    extern "C" __global__ void __launch_bounds__(256, 3) name(                           \
        const float* S, const float* cs, const float* x, const float* dy, float* dS,     \
        float* part, int q, int h, int g, int p, int nt, long long bcn, int hs)          \
    {                                                                                    \
        diag_grad<TC, PIPE>(S, cs, x, dy, dS, part, q, h, g, p, nt, bcn, hs);            \
    }
GRAD_ENTRY(ssd_diag_grad, false, false)
GRAD_ENTRY(ssd_diag_grad_tc, true, false)
GRAD_ENTRY(ssd_diag_grad_p, false, true)
GRAD_ENTRY(ssd_diag_grad_tc_p, true, true)
"#;

fn diag_src() -> String {
    format!("{}{}{}", nvrtc::PRELUDE, nvrtc::MMA, SSD_DIAG)
}

/// `(b * nc, q, h, p, g)` of the SSD diagonal op's operands.
fn diag_dims(s: &T, cs: &T, x: &T) -> (usize, usize, usize, usize, usize) {
    let (ss, cd, xs) = (s.meta.shape(), cs.meta.shape(), x.meta.shape());
    assert!(
        ss.len() == 5 && cd.len() == 4 && xs.len() == 5,
        "SSD diagonal: scores [b, nc, g, q, q], cs [b, nc, q, h], x [b, nc, q, h, p]"
    );
    let (b, nc, q, h, p, g) = (xs[0], xs[1], xs[2], xs[3], xs[4], ss[2]);
    assert_eq!(&cd[..], &[b, nc, q, h], "SSD diagonal: cs shape");
    assert_eq!(&ss[..], &[b, nc, g, q, q], "SSD diagonal: scores shape");
    assert!(g > 0 && h % g == 0, "SSD diagonal: {h} heads in {g} groups");
    (b * nc, q, h, p, g)
}

/// `y [b, nc, q, h, p]` (f32) from scores, `cs` and `x` (see [`SSD_DIAG`]).
pub fn ssd_diag_fwd(s: T, cs: T, x: T, tf32: bool) -> T {
    let (bcn, q, h, p, g) = diag_dims(&s, &cs, &x);
    let (s, cs, x) = (
        same_dtype(s, DType::F32),
        same_dtype(cs, DType::F32),
        same_dtype(x, DType::F32),
    );
    let out = empty(&x, x.meta.shape().to_vec(), DType::F32);
    if bcn * q * h * p > 0 {
        let kernel = if tf32 {
            "ssd_diag_fwd_tc"
        } else {
            "ssd_diag_fwd"
        };
        diag_apply(&s, &cs, &x, &out, kernel, (bcn, q, h, p, g));
    }
    drop((s, cs, x));
    out
}

fn diag_apply(
    s: &T,
    cs: &T,
    v: &T,
    out: &T,
    kernel: &str,
    dims: (usize, usize, usize, usize, usize),
) {
    let (bcn, q, h, p, g) = dims;
    let device = v.device.index;
    // 16-byte rows of v and S: the pipelined kernel.
    let kernel = if p % 4 == 0 && q % 4 == 0 {
        format!("{kernel}_p")
    } else {
        kernel.to_string()
    };
    let f = nvrtc::function(device, "ssd_diag", &diag_src(), &kernel);
    enqueue(
        [out, s, cs, v],
        move |[mut o_p, mut s_p, mut c_p, mut v_p], stream| {
            let (mut q32, mut h32, mut g32, mut p32) = (q as i32, h as i32, g as i32, p as i32);
            let mut params = kernel_args!(s_p, c_p, v_p, o_p, q32, h32, g32, p32);
            let grid = ((q.div_ceil(64) * bcn * h) as u32, p.div_ceil(64) as u32, 1);
            // SAFETY: the kernel's signature; contiguous f32 operands of the checked shapes.
            unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
        },
    );
}

/// `(dscores, dcs, dx)` of [`ssd_diag_fwd`] for the upstream `dy`.
pub fn ssd_diag_bwd(dy: T, s: T, cs: T, x: T, tf32: bool) -> (T, T, T) {
    let (bcn, q, h, p, g) = diag_dims(&s, &cs, &x);
    let f32 = |t| same_dtype(t, DType::F32);
    let (dy, s, cs, x) = (f32(dy), f32(s), f32(cs), f32(x));
    let dx = empty(&x, x.meta.shape().to_vec(), DType::F32);
    // The group's heads in `hs` parallel splits (partial dS summed after).
    let hg = h / g;
    let hs = [8, 4, 2, 1].into_iter().find(|s| hg % s == 0).unwrap_or(1);
    let ds = empty(&x, vec![hs * bcn * g * q * q], DType::F32);
    let nt = q.div_ceil(64);
    // Flat: a multi-dim allocation may pad its rows (h = 3), the kernel writes flat indices.
    let part = zeros_f32(&x, vec![2 * nt * bcn * q * h]);
    if bcn * q * h * p > 0 {
        let (dx_kernel, grad_kernel) = if tf32 {
            ("ssd_diag_dx_tc", "ssd_diag_grad_tc")
        } else {
            ("ssd_diag_dx", "ssd_diag_grad")
        };
        diag_apply(&s, &cs, &dy, &dx, dx_kernel, (bcn, q, h, p, g));
        let device = x.device.index;
        let grad_kernel = if p % 4 == 0 {
            format!("{grad_kernel}_p")
        } else {
            grad_kernel.to_string()
        };
        let f = nvrtc::function(device, "ssd_diag", &diag_src(), &grad_kernel);
        enqueue(
            [&ds, &s, &cs, &x, &dy, &part],
            move |[mut ds_p, mut s_p, mut c_p, mut x_p, mut dy_p, mut part_p], stream| {
                let (mut q32, mut h32, mut g32, mut p32, mut nt32, mut bcn64, mut hs32) = (
                    q as i32, h as i32, g as i32, p as i32, nt as i32, bcn as i64, hs as i32,
                );
                let mut params = kernel_args!(
                    s_p, c_p, x_p, dy_p, ds_p, part_p, q32, h32, g32, p32, nt32, bcn64, hs32
                );
                let grid = ((nt * nt * hs * bcn * g) as u32, 1, 1);
                // SAFETY: the kernel's signature; `part` holds `2 nt` slots of `cs`'s size.
                unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
            },
        );
    }
    let part = Cb::float_reshape(part, [2 * nt, bcn * q * h].into());
    let dcs = Cb::float_sum_dim(part, 0);
    let dcs = Cb::float_reshape(dcs, cs.meta.shape().clone());
    let ds = if hs == 1 {
        ds
    } else {
        Cb::float_sum_dim(Cb::float_reshape(ds, [hs, bcn * g * q * q].into()), 0)
    };
    let ds = Cb::float_reshape(ds, s.meta.shape().clone());
    drop((dy, s, x));
    (ds, dcs, dx)
}
