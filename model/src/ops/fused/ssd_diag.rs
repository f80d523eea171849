//! The SSD's intra-chunk (diagonal-block) product and its gradients.

use burn::tensor::DType;
use burn::tensor::ops::FloatTensorOps;
use burn_cubecl::kernel::into_contiguous;

use super::{Cb, empty, same_dtype, zeros_f32};
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, enqueue_opt, launch};

/// The SSD's intra-chunk product without its `[q, q]` matrix per head
/// (mamba_ssm's `chunk_scan` diagonal blocks): 64 x 64 output tiles, the
/// masked decay built tile by tile in shared memory.
const SSD_DIAG: &str = r#"
// Per (batch-chunk, head), with S [bc, g, q, q], cs and dt [bc, q, h], x,
// y and dy [bc, q, h, p] (rows of h * p), M[i, j] = exp(cs[i] - cs[j]) S[i, j]:
//   forward:   y[i] = sum_{j <= i} M[i, j] dt[j] x[j]    (x in its own dtype)
//   transpose: g[i] = sum_{j >= i} M[j, i] dy[j],  dx[i] = dt[i] g[i],
//              ddt[i] = x[i] . g[i]
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
    // wide: the warp covers all 64 columns (32 accumulators, two-head blocks).
    __device__ Frag(bool wide = false) {
        const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
        rb = (w & 3) * 16; cb = wide ? 0 : (w >> 2) * 32; g = lane >> 2; t = lane & 3;
    }
    // Accumulator element e (s = e / 4, k = e % 4) -> tile row and column.
    __device__ int row(int e) const { return rb + g + ((e & 2) ? 8 : 0); }
    __device__ int col(int e) const { return cb + 8 * (e >> 2) + 2 * t + (e & 1); }
};

// acc += A[rows, 0..kn) B[0..kn), cols) over one shared tile, with
// A(i, k) and B(k, j) read through the accessors. BX: B's values are bf16
// (exact in TF32: no rounding instruction between the load and the mma).
template <bool TC, bool BX = false, typename FA, typename FB>
__device__ __forceinline__ void tile_mma(float (&acc)[16], const Frag& f, int kn, FA A, FB B) {
    auto b_bits = [](float v) { return BX ? __float_as_uint(v) : tf32_bits(v); };
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
                mma_tf32(acc + 4 * s, a, b_bits(B(k + f.t, j)), b_bits(B(k + f.t + 4, j)));
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

// x's element type in a shared tile: `XPad<V>::KP` pads a 32-column row to a
// 16-byte multiple with conflict-free fragment reads (f32 36, bf16 40).
template <typename V> struct XPad { static const int KP = 36; };
template <> struct XPad<bf16_t> { static const int KP = 40; };

// o[i], o[i + 1] = a, b (b only when `both`); one 8- or 4-byte store when
// `paired` (i even, the row even-aligned).
__device__ __forceinline__ void st_pair(float* o, long long i, float a, float b, bool both, bool paired) {
    if (both && paired) *reinterpret_cast<float2*>(o + i) = make_float2(a, b);
    else { o[i] = a; if (both) o[i + 1] = b; }
}
__device__ __forceinline__ void st_pair(bf16_t* o, long long i, float a, float b, bool both, bool paired) {
    if (both && paired) *reinterpret_cast<unsigned*>(o + i) = pack2(a, b);
    else { o[i] = f32_to_bf16(a); if (both) o[i + 1] = f32_to_bf16(b); }
}

// One block's (batch-chunk, head, row tile, column tile) of diag_apply:
// grid (i tiles * bc * h, p tiles). A (chunk, head)'s row tiles run side by
// side (its v rows stay in L2), the longest (most column tiles) first.
template <bool TRANS>
struct ApplyTile {
    int i0, p0, j_begin, j_end;
    long long rs;  // row stride of y, dy, dx [bc, q, h, p] (h * p)
    long long ro;  // this (chunk, head) in [bc, q, h]: cs[ro + i h]
    long long t0;  // its first token: row t0 + i, columns c0 .. c0 + p
    int c0;
    long long nrows;  // bc * q * h
    const float* Sm;
    // hpb heads per block (1 or 2): the block's first head.
    __device__ __forceinline__ ApplyTile(const float* S, int q, int h, int g, int p, int hpb = 1) {
        const int nt = (q + DG_T - 1) / DG_T, hb = h / hpb;
        const int r = (int)(blockIdx.x % (unsigned)nt);
        const int it = TRANS ? r : nt - 1 - r;
        const int hi = (int)((blockIdx.x / (unsigned)nt) % (unsigned)hb) * hpb;
        const long long bc = blockIdx.x / ((unsigned)nt * (unsigned)hb);
        nrows = (long long)(gridDim.x / ((unsigned)nt * (unsigned)hb)) * q * h;
        p0 = blockIdx.y * DG_T;
        i0 = it * DG_T;
        const int gi = hi / (h / g);
        Sm = S + (bc * g + gi) * (long long)q * q;
        rs = (long long)h * p;
        ro = bc * q * (long long)h + hi;
        t0 = bc * q;
        c0 = hi * p;
        j_begin = TRANS ? i0 : 0;
        j_end = TRANS ? q : min(q, i0 + DG_T);
    }
    // The same tile for the next head (`k` heads on).
    __device__ __forceinline__ ApplyTile head(int k, int p) const {
        ApplyTile a = *this;
        a.ro += k;
        a.c0 += k * p;
        return a;
    }
    // The accumulator tile times `scale(i)` per row, plus `add` (same
    // layout as `out`) where given, written out (column pairs as one store
    // where p is even).
    template <int NE, typename O, typename F>
    __device__ __forceinline__ void store(const float (&acc)[NE], const Frag& f, O* out, int q,
                                          int p, F scale, const O* add = nullptr) const {
        O* om = out + t0 * rs + c0;
        const O* am = add ? add + t0 * rs + c0 : nullptr;
#pragma unroll
        for (int e = 0; e < NE; e += 2) {
            const int i = i0 + f.row(e), pc = p0 + f.col(e);
            if (i >= q || pc >= p) continue;
            const float sc = scale(e);
            const long long o = (long long)i * rs + pc;
            const bool both = pc + 1 < p;
            float v0 = acc[e] * sc, v1 = acc[e + 1] * sc;
            if (am) {
                v0 += ld(am, o);
                if (both) v1 += ld(am, o + 1);
            }
            st_pair(om, o, v0, v1, both, (p & 1) == 0);
        }
    }
};

// The product over one (chunk, head, row tile, column tile) into `acc`:
//   forward (v = x, V its dtype): acc[i] = sum_{j <= i} exp(cs[i] - cs[j]) S[i, j] dt[j] x[j]
//   TRANS (v = dy, f32):          acc[i] = sum_{j >= i} exp(cs[j] - cs[i]) S[j, i] dy[j]
// (`x dt` is never materialised: dt scales M's columns.)
template <bool TRANS, bool TC, typename V>
__device__ __forceinline__ void diag_apply(const ApplyTile<TRANS>& a, const float* __restrict__ cs,
                                           const float* __restrict__ dt, const V* __restrict__ v,
                                           long long ldv, int q, int h, int p, float (&acc)[16])
{
    __shared__ float Ms[DG_T][DG_KP];
    __shared__ V Vs[DG_K][DG_VP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[DG_K];
    __shared__ float d_j[DG_K];
    const int tid = threadIdx.x;
    const Frag f;
    const int i0 = a.i0, p0 = a.p0;
    const float *Sm = a.Sm, *cm = cs + a.ro, *dm = dt + a.ro;
    const V* vm = v + a.t0 * ldv + a.c0;
    if (tid < DG_T) c_i[tid] = i0 + tid < q ? cm[(long long)(i0 + tid) * h] : 0.0f;
    for (int j0 = a.j_begin; j0 < a.j_end; j0 += DG_K) {
        __syncthreads();  // the previous tile is consumed (and c_i written)
        if (tid < DG_K) {
            c_j[tid] = j0 + tid < q ? cm[(long long)(j0 + tid) * h] : 0.0f;
            if (!TRANS) d_j[tid] = j0 + tid < q ? dm[(long long)(j0 + tid) * h] : 0.0f;
        }
        for (int e = tid; e < DG_K * DG_T; e += 256) {
            const int jj = e / DG_T, pp = e - jj * DG_T;
            const int j = j0 + jj, pc = p0 + pp;
            Vs[jj][pp] = (j < q && pc < p) ? vm[(long long)j * ldv + pc] : V(0);
        }
        __syncthreads();
        for (int e = tid; e < DG_T * DG_K; e += 256) {
            // Coalesced reads of S: along j forward, along i transposed.
            const int ii = TRANS ? e % DG_T : e / DG_K;
            const int jj = TRANS ? e / DG_T : e % DG_K;
            const int i = i0 + ii, j = j0 + jj;
            float m = 0.0f;
            if (i < q && j < q) {
                if (!TRANS && j <= i) m = __expf(c_i[ii] - c_j[jj]) * d_j[jj] * Sm[(long long)i * q + j];
                if (TRANS && j >= i) m = __expf(c_j[jj] - c_i[ii]) * Sm[(long long)j * q + i];
            }
            Ms[ii][jj] = m;
        }
        __syncthreads();
        tile_mma<TC, sizeof(V) == 2>(acc, f, DG_K,
                     [&](int i, int k) { return Ms[i][k]; },
                     [&](int k, int j) { return ld(&Vs[k][0], j); });
    }
}

#define DG_SP 68  // transposed S tile [32][64] rows, padded (16-byte aligned)

// Copies stage j0 .. j0 + 32 of v, S, cs (and dt) into one buffer (cp.async,
// one commit group) for NH heads from a's: v rows [NH * 32] (head k's at
// 32 k), c_j and d_j [NH * 32]; S (the group's, shared) as [64][SKP]
// (S[i0 + ii, j0 + jj]) forward, [32][DG_SP] (S[j0 + jj, i0 + ii])
// transposed. Each thread's copies are worked out once (32-bit offsets
// from the stage's first row, and the stage limit below which each is in
// bounds): recomputing them per stage took more instructions than the
// products.
template <bool TRANS, int SKP, int NH, typename V>
struct Stager {
    static constexpr int VE = 16 / sizeof(V), CH = DG_T / VE;  // elements, copies per 64-column row
    static constexpr int VN = NH * DG_K * CH / 256, SN = 2;    // copies per thread (S: 512)
    int vg[VN], vs[VN], vl[VN], sg[SN], ss[SN], sl[SN], cg, cl;
    const V* vm;
    const float *Sm, *cm, *dm;
    long long ldv;
    int q, h;
    __device__ __forceinline__ Stager(const ApplyTile<TRANS>& a, const float* cs, const float* dt,
                                      const V* v, long long ldv_, int q_, int h_, int p)
        : vm(v + a.t0 * ldv_ + a.c0), cm(cs + a.ro), dm(dt + a.ro), ldv(ldv_), q(q_), h(h_) {
        const int tid = threadIdx.x;
        Sm = TRANS ? a.Sm + a.i0 : a.Sm + (long long)a.i0 * q;
#pragma unroll
        for (int u = 0; u < VN; ++u) {
            const int e = tid + 256 * u, k = e / (DG_K * CH), r = e % (DG_K * CH);
            const int jj = r / CH, c = (r % CH) * VE, pc = a.p0 + c;
            vg[u] = k * p + jj * (int)ldv + pc;
            vs[u] = (k * DG_K + jj) * DG_VP + c;
            vl[u] = pc < p ? q - jj : -1;
        }
#pragma unroll
        for (int u = 0; u < SN; ++u) {
            const int e = tid + 256 * u;
            if (!TRANS) {
                const int ii = e >> 3, c4 = (e & 7) * 4;
                sg[u] = ii * q + c4;
                ss[u] = ii * SKP + c4;
                sl[u] = a.i0 + ii < q ? q - c4 : -1;
            } else {
                const int jj = e >> 4, c4 = (e & 15) * 4;
                sg[u] = jj * q + c4;
                ss[u] = jj * DG_SP + c4;
                sl[u] = a.i0 + c4 < q ? q - jj : -1;
            }
        }
        cg = tid / DG_K + (tid % DG_K) * h;
        cl = tid < NH * DG_K ? q - tid % DG_K : -1;
    }
    __device__ __forceinline__ void issue(int j0, V (*Vs)[DG_VP], float* Sr, float* c_j,
                                          float* d_j) const {
        const V* vb = vm + (long long)j0 * ldv;
#pragma unroll
        for (int u = 0; u < VN; ++u) {
            const bool ok = j0 < vl[u];
            cp16(&Vs[0][0] + vs[u], ok ? vb + vg[u] : vm, ok);
        }
        const float* sb = TRANS ? Sm + (long long)j0 * q : Sm + j0;
#pragma unroll
        for (int u = 0; u < SN; ++u) {
            const bool ok = j0 < sl[u];
            cp16(Sr + ss[u], ok ? sb + sg[u] : Sm, ok);
        }
        if (threadIdx.x < NH * DG_K) {
            const bool ok = j0 < cl;
            const long long o = (long long)j0 * h + cg;
            cp4(c_j + threadIdx.x, ok ? cm + o : cm, ok);
            if (!TRANS) cp4(d_j + threadIdx.x, ok ? dm + o : dm, ok);
        }
        cp_commit();
    }
};

// diag_apply with the next 32-row tile of v, S, cs (and dt) copied in
// (cp.async) while this one multiplies: the loop was bound by two dependent
// global round trips per tile. Needs q a multiple of 4 and p of a 16-byte
// access (4 f32, 8 bf16).
template <bool TRANS, bool TC, typename V>
__device__ __forceinline__ void diag_apply_staged(const ApplyTile<TRANS>& a,
                                                  const float* __restrict__ cs,
                                                  const float* __restrict__ dt,
                                                  const V* __restrict__ v, long long ldv, int q,
                                                  int h, int p, float (&acc)[16])
{
    __shared__ __align__(16) V Vs[2][DG_K][DG_VP];
    __shared__ __align__(16) float Sr[2][DG_T * DG_KP];  // [64][36] or [32][68]
    __shared__ float Ms[DG_T][DG_KP];
    __shared__ float c_i[DG_T];
    __shared__ float c_j[2][DG_K];
    __shared__ float d_j[2][DG_K];
    const int tid = threadIdx.x;
    const Frag f;
    const int i0 = a.i0, j_begin = a.j_begin;
    const float* cm = cs + a.ro;
    if (tid < DG_T) c_i[tid] = i0 + tid < q ? cm[(long long)(i0 + tid) * h] : 0.0f;
    const int tiles = (a.j_end - j_begin + DG_K - 1) / DG_K;
    const Stager<TRANS, DG_KP, 1, V> st(a, cs, dt, v, ldv, q, h, p);
    auto issue = [&](int t, int buf) {
        st.issue(j_begin + t * DG_K, Vs[buf], Sr[buf], c_j[buf], d_j[buf]);
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
                    m = __expf(c_i[ii] - c_j[buf][jj]) * d_j[buf][jj] * Sr[buf][ii * DG_KP + jj];
                if (TRANS && j >= i)
                    m = __expf(c_j[buf][jj] - c_i[ii]) * Sr[buf][jj * DG_SP + ii];
            }
            Ms[ii][jj] = m;
        }
        __syncthreads();
        tile_mma<TC, sizeof(V) == 2>(acc, f, DG_K,
                     [&](int i, int k) { return Ms[i][k]; },
                     [&](int k, int j) { return ld(&Vs[buf][k][0], j); });
        __syncthreads();  // Ms and this buffer consumed before they are refilled
    }
}

// The staged product for bf16 v on tensor cores, as mamba_ssm's chunk_scan
// runs it: each thread builds its own elements of M straight into the bf16
// A fragments of mma.m16n8k16 (M rounded to bf16, v exact), v's fragments
// come through ldmatrix.trans, one barrier per stage (no shared M tile).
// NH heads per block (1, or 2 of one group): with two, warp w computes head
// w / 4's rows (w % 4) * 16 .. + 16 over all 64 columns (Frag(true), 32
// accumulators), so each element of M is built once and each S tile
// serves both heads; with one, the two column warps of a row block both
// build its M fragments. `a` is the block's first head.
#define DG_FKP 40  // forward S tile rows: conflict-free 8-byte fragment reads
template <bool TRANS, int NH>
__device__ __forceinline__ void diag_apply_mma(const ApplyTile<TRANS>& a,
                                               const float* __restrict__ cs,
                                               const float* __restrict__ dt,
                                               const bf16_t* __restrict__ v, long long ldv,
                                               int q, int h, int p, float (&acc)[16 * NH])
{
    __shared__ __align__(16) bf16_t Vs[2][NH * DG_K][DG_VP];
    __shared__ __align__(16) float Sr[2][DG_T * DG_FKP];  // [64][40] or [32][68]
    __shared__ float c_j[2][NH * DG_K];
    __shared__ float d_j[2][NH * DG_K];
    const int lane = threadIdx.x & 31, hw = NH == 2 ? threadIdx.x >> 7 : 0;  // the warp's head
    const Frag f(NH == 2);
    const int j_begin = a.j_begin;
    const float* cm = cs + a.ro + hw;
    // This thread's two rows (tile rows ri[r] = rb + g + 8 r).
    int ri[2];
    float ci[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // in log2 units (exp as ex2)
        ri[r] = f.rb + f.g + 8 * r;
        const int i = a.i0 + ri[r];
        ci[r] = i < q ? cm[(long long)i * h] * LOG2E : 0.0f;
    }
    // ldmatrix.trans row addresses: lane l reads k row (l & 7) + 8 ((l >> 3) & 1),
    // columns cb + 8 (l >> 4) (+ 16 per column pair).
    const int lk = hw * DG_K + (lane & 7) + 8 * ((lane >> 3) & 1), ln = f.cb + 8 * (lane >> 4);
    const int tiles = (a.j_end - j_begin + DG_K - 1) / DG_K;
    const Stager<TRANS, DG_FKP, NH, bf16_t> st(a, cs, dt, v, ldv, q, h, p);
    st.issue(j_begin, Vs[0], Sr[0], c_j[0], d_j[0]);
    for (int t = 0; t < tiles; ++t) {
        const int buf = t & 1, j0 = j_begin + t * DG_K;
        cp_wait<0>();
        __syncthreads();  // stage t landed for every thread; stage t - 1 consumed
        if (t + 1 < tiles) st.issue(j0 + DG_K, Vs[buf ^ 1], Sr[buf ^ 1], c_j[buf ^ 1], d_j[buf ^ 1]);
        const float* S = Sr[buf];
        const float *cj = c_j[buf] + hw * DG_K, *dj = d_j[buf] + hw * DG_K;
#pragma unroll
        for (int kk = 0; kk < DG_K; kk += 16) {
            // A fragment: rows ri[0], ri[1]; columns kk + 2t + {0, 1} (+ 8).
            unsigned af[4];
#pragma unroll
            for (int hc = 0; hc < 2; ++hc) {
                const int jj = kk + 2 * f.t + 8 * hc, j = j0 + jj;
                const float cj0 = cj[jj], cj1 = cj[jj + 1];
                const float dj0 = TRANS ? 1.0f : dj[jj], dj1 = TRANS ? 1.0f : dj[jj + 1];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    // Computed everywhere, then selected (no branches; a
                    // masked exponent may overflow, its product is dropped).
                    const int i = a.i0 + ri[r];
                    float m0, m1;
                    if (TRANS) {
                        const float s0 = S[jj * DG_SP + ri[r]], s1 = S[(jj + 1) * DG_SP + ri[r]];
                        const float e0 = ex2(fmaf(cj0, LOG2E, -ci[r])) * s0;
                        const float e1 = ex2(fmaf(cj1, LOG2E, -ci[r])) * s1;
                        m0 = (j >= i && j < q) ? e0 : 0.0f;
                        m1 = (j + 1 >= i && j + 1 < q) ? e1 : 0.0f;
                    } else {
                        const float2 sv = *reinterpret_cast<const float2*>(S + ri[r] * DG_FKP + jj);
                        const float e0 = ex2(fmaf(cj0, -LOG2E, ci[r])) * dj0 * sv.x;
                        const float e1 = ex2(fmaf(cj1, -LOG2E, ci[r])) * dj1 * sv.y;
                        m0 = (j <= i && i < q) ? e0 : 0.0f;
                        m1 = (j + 1 <= i && i < q) ? e1 : 0.0f;
                    }
                    af[r + 2 * hc] = pack2(m0, m1);
                }
            }
#pragma unroll
            for (int s = 0; s < 2 * NH; ++s) {
                unsigned b[4];
                ldsm4t(b, &Vs[buf][kk + lk][ln + 16 * s]);
                mma16816(acc + 8 * s, af, b[0], b[1]);
                mma16816(acc + 8 * s + 4, af, b[2], b[3]);
            }
        }
    }
}

// The staged product: bf16 v on tensor cores through diag_apply_mma.
template <bool TRANS, bool TC, typename V>
__device__ __forceinline__ void diag_apply_pipe(const ApplyTile<TRANS>& a,
                                                const float* __restrict__ cs,
                                                const float* __restrict__ dt,
                                                const V* __restrict__ v, long long ldv, int q,
                                                int h, int p, float (&acc)[16])
{
    if constexpr (TC && sizeof(V) == 2)
        diag_apply_mma<TRANS, 1>(a, cs, dt, v, ldv, q, h, p, acc);
    else
        diag_apply_staged<TRANS, TC, V>(a, cs, dt, v, ldv, q, h, p, acc);
}

// The transposed product's epilogue: dx = dt[i] acc (+ dx_add; x's dtype) and
// ddt[i] = sum_c x[i, c] acc[i, c] over this block's columns, into
// part[blockIdx.y, bc, i, h] (p tiles summed after; one tile: ddt itself).
template <typename X, int NE>
__device__ __forceinline__ void dx_epilogue(const ApplyTile<true>& a, const Frag& f,
                                            const float (&acc)[NE], const float* __restrict__ dt,
                                            const X* __restrict__ x, long long ldx,
                                            X* __restrict__ dx, const X* __restrict__ dx_add,
                                            float* __restrict__ part, int q, int h, int p)
{
    __shared__ float red[DG_T][2];
    const int tid = threadIdx.x, w = tid >> 5;
    const float* dm = dt + a.ro;
    const X* xm = x + a.t0 * ldx + a.c0;
    float dtr[2], rsum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = a.i0 + f.rb + f.g + 8 * r;
        dtr[r] = i < q ? dm[(long long)i * h] : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < NE; ++e) {
        const int i = a.i0 + f.row(e), pc = a.p0 + f.col(e);
        if (i < q && pc < p) rsum[(e >> 1) & 1] += ld(xm, (long long)i * ldx + pc) * acc[e];
    }
    a.store(acc, f, dx, q, p, [&](int e) { return dtr[(e >> 1) & 1]; }, dx_add);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        rsum[r] += __shfl_xor_sync(0xffffffffu, rsum[r], 1);
        rsum[r] += __shfl_xor_sync(0xffffffffu, rsum[r], 2);
    }
    if constexpr (NE == 32) {  // the warp covers the rows' 64 columns
        if (f.t == 0)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int i = a.i0 + f.rb + f.g + 8 * r;
                if (i < q) part[blockIdx.y * a.nrows + a.ro + (long long)i * h] = rsum[r];
            }
        return;
    }
    if (f.t == 0) {
        red[f.rb + f.g][w >> 2] = rsum[0];
        red[f.rb + f.g + 8][w >> 2] = rsum[1];
    }
    __syncthreads();
    if (tid < DG_T && a.i0 + tid < q)
        part[blockIdx.y * a.nrows + a.ro + (long long)(a.i0 + tid) * h] = red[tid][0] + red[tid][1];
}

// Register caps from ncu on the H100 (1B shapes): the forward at 78
// registers ran 3 blocks per SM, at 64 four (-30%); the transpose needs 48.
// APPLY: diag_apply or diag_apply_pipe; X: x's dtype.
#define DIAG_FWD(name, APPLY, TC, X, MINB)                                                   \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(                            \
        const float* S, const float* cs, const float* dt, const X* x, long long ldx, float* out, \
        int q, int h, int g, int p)                                                          \
    {                                                                                        \
        const ApplyTile<false> a(S, q, h, g, p);                                             \
        float acc[16] = {};                                                                  \
        APPLY<false, TC, X>(a, cs, dt, x, ldx, q, h, p, acc);                                \
        a.store(acc, Frag(), out, q, p, [](int) { return 1.0f; });                            \
    }
#define DIAG_DX(name, APPLY, TC, X, DY, MINB)                                                \
    extern "C" __global__ void __launch_bounds__(256, MINB) name(                            \
        const float* S, const float* cs, const float* dt, const X* x, long long ldx,          \
        const DY* dy, X* dx, const X* dx_add, float* ddt_part, int q, int h, int g, int p)   \
    {                                                                                        \
        const ApplyTile<true> a(S, q, h, g, p);                                              \
        float acc[16] = {};                                                                  \
        APPLY<true, TC, DY>(a, cs, dt, dy, a.rs, q, h, p, acc);                              \
        dx_epilogue<X>(a, Frag(), acc, dt, x, ldx, dx, dx_add, ddt_part, q, h, p);           \
    }
// Gradient kernels are named for x's dtype, then dy's where it differs
// from f32 (a bf16 model's dy is the bf16 output gradient as it is).
#define DIAG_DX_ALL(SUF, X, DY)                                              \
    DIAG_DX(ssd_diag_dx_##SUF, diag_apply, false, X, DY, 4)                  \
    DIAG_DX(ssd_diag_dx_tc_##SUF, diag_apply, true, X, DY, 4)                \
    DIAG_DX(ssd_diag_dx_p_##SUF, diag_apply_pipe, false, X, DY, 4)           \
    DIAG_DX(ssd_diag_dx_tc_p_##SUF, diag_apply_pipe, true, X, DY, 4)
#define DIAG_APPLY_ALL(SUF, X)                                               \
    DIAG_FWD(ssd_diag_fwd_##SUF, diag_apply, false, X, 4)                    \
    DIAG_FWD(ssd_diag_fwd_tc_##SUF, diag_apply, true, X, 4)                  \
    DIAG_FWD(ssd_diag_fwd_p_##SUF, diag_apply_pipe, false, X, 4)             \
    DIAG_FWD(ssd_diag_fwd_tc_p_##SUF, diag_apply_pipe, true, X, 4)           \
    DIAG_DX_ALL(SUF, X, float)
DIAG_APPLY_ALL(f32, float)
DIAG_APPLY_ALL(bf16, bf16_t)
DIAG_DX_ALL(bf16_bf16, bf16_t, bf16_t)

// Two heads per block (diag_apply_mma<_, 2>; bf16 x and dy, heads per group
// even): 85 registers for the 32 accumulators, 3 blocks per SM.
extern "C" __global__ void __launch_bounds__(256, 3) ssd_diag_fwd_tc_p2_bf16(
    const float* S, const float* cs, const float* dt, const bf16_t* x, long long ldx,
    float* out, int q, int h, int g, int p)
{
    const ApplyTile<false> a(S, q, h, g, p, 2);
    float acc[32] = {};
    diag_apply_mma<false, 2>(a, cs, dt, x, ldx, q, h, p, acc);
    a.head(threadIdx.x >> 7, p).store(acc, Frag(true), out, q, p, [](int) { return 1.0f; });
}
extern "C" __global__ void __launch_bounds__(256, 3) ssd_diag_dx_tc_p2_bf16_bf16(
    const float* S, const float* cs, const float* dt, const bf16_t* x, long long ldx,
    const bf16_t* dy, bf16_t* dx, const bf16_t* dx_add, float* ddt_part, int q, int h, int g,
    int p)
{
    const ApplyTile<true> a(S, q, h, g, p, 2);
    float acc[32] = {};
    diag_apply_mma<true, 2>(a, cs, dt, dy, a.rs, q, h, p, acc);
    dx_epilogue<bf16_t>(a.head(threadIdx.x >> 7, p), Frag(true), acc, dt, x, ldx, dx, dx_add,
                        ddt_part, q, h, p);
}

// One head's share of a (batch-chunk, group) tile's gradients, from its
// d = dy x^T tile: dS into `ds`; dcs row sums into part slot jt, column sums
// into slot nt + it.
__device__ __forceinline__ void grad_head(
    const Frag& f, const float (&d)[16], const float (&s)[16], float (&ds)[16],
    const float* c_i, const float* c_j, const float* d_j, float (*red)[6],
    float* __restrict__ part, int i0, int j0, int q, int h, int hi, int it, int jt, int nt,
    long long bcn, long long bc)
{
    const int tid = threadIdx.x;
    // Row sums: 8 contributors per row (4 lanes of a quad x 2 column
    // warps); column sums: 32 per column (8 quads x 4 row warps). Lanes
    // first (shuffles, a fixed tree), then the warps through `red`:
    // red[row][0..2) row partials, red[col][2..6) column partials.
    float rsum[2] = {0.0f, 0.0f}, csum[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) csum[c] = 0.0f;
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int ii = f.row(e), jj = f.col(e);
        const int i = i0 + ii, j = j0 + jj;
        // Computed everywhere, then selected (no branches; a masked
        // exponent may overflow, its product is dropped; s is 0 there).
        const float e0 = ex2((c_i[ii] - c_j[jj]) * LOG2E) * d_j[jj] * d[e];
        const float ev = (i < q && j <= i) ? e0 : 0.0f;
        ds[e] += ev;
        const float gg = s[e] * ev;
        rsum[(e >> 1) & 1] += gg;
        csum[2 * (e >> 2) + (e & 1)] += gg;
    }
    const unsigned all = 0xffffffffu;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        rsum[r] += __shfl_xor_sync(all, rsum[r], 1);
        rsum[r] += __shfl_xor_sync(all, rsum[r], 2);
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) {
        csum[c] += __shfl_xor_sync(all, csum[c], 4);
        csum[c] += __shfl_xor_sync(all, csum[c], 8);
        csum[c] += __shfl_xor_sync(all, csum[c], 16);
    }
    const int w = tid >> 5;
    if (f.t == 0) {
        red[f.rb + f.g][w >> 2] = rsum[0];
        red[f.rb + f.g + 8][w >> 2] = rsum[1];
    }
    if (f.g == 0)
#pragma unroll
        for (int c = 0; c < 8; ++c)
            red[f.cb + 8 * (c >> 1) + 2 * f.t + (c & 1)][2 + (w & 3)] = csum[c];
    __syncthreads();
    if (tid < DG_T) {
        if (i0 + tid < q)
            part[(((long long)jt * bcn + bc) * q + i0 + tid) * h + hi] = red[tid][0] + red[tid][1];
    } else if (tid < 2 * DG_T) {
        const int jj = tid - DG_T;
        if (j0 + jj < q)
            part[(((long long)(nt + it) * bcn + bc) * q + j0 + jj) * h + hi] =
                -(((red[jj][2] + red[jj][3]) + red[jj][4]) + red[jj][5]);
    }
}

// d += dy x^T over one 32-column stage with both in bf16: mma.m16n8k16 with
// ldmatrix fragments (exact products, as the TF32 form, at twice its rate).
// As [64 rows i][c], Bs [64 rows j][c], rows of XPad<bf16_t>::KP.
__device__ __forceinline__ void grad_mma(float (&d)[16], const Frag& f,
                                         const bf16_t (*As)[XPad<bf16_t>::KP],
                                         const bf16_t (*Bs)[XPad<bf16_t>::KP])
{
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < DG_K; k += 16) {
        unsigned a[4];
        ldsm4(a, &As[f.rb + (lane & 15)][k + 8 * (lane >> 4)]);
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            unsigned b[4];
            ldsm4(b, &Bs[f.cb + 16 * s + (lane & 7) + 8 * (lane >> 4)][k + 8 * ((lane >> 3) & 1)]);
            mma16816(d + 8 * s, a, b[0], b[1]);
            mma16816(d + 8 * s + 4, a, b[2], b[3]);
        }
    }
}

// For one 64 x 64 tile (it, jt) of one (batch-chunk, group), with
//   G_h[i, j] = exp(cs_h[i] - cs_h[j]) dt_h[j] (dy_h[i] . x_h[j])   (j <= i):
//   dS[i, j] = sum over the group's heads of G_h[i, j];
//   dcs_h[i] += sum_j S[i, j] G_h[i, j],  dcs_h[j] -= sum_i S[i, j] G_h[i, j].
// The dcs sums go to part [2 nt, bc, q, h] (zeroed): row sums in slot jt,
// column sums in slot nt + it, added in a fixed order after (reproducible:
// no atomics). grid (nt * nt * hs * bc * g): the group's heads in `hs` splits,
// each writing its own dS partial [hs, bc, g, q, q]; tiles above the
// diagonal write zeros.
// PIPE: each (head, 32 columns) stage of dy and x is copied in (cp.async)
// while the previous one multiplies, a head's decays with its first stage
// (double-buffered: a synchronous load per head stalled the whole block at
// the next barrier); needs p a multiple of a 16-byte access of x.
// Otherwise loaded through registers between two barriers.
template <bool TC, bool PIPE, typename X, typename DY>
__device__ __forceinline__ void diag_grad(
    const float* __restrict__ S, const float* __restrict__ cs, const float* __restrict__ dt,
    const X* __restrict__ x, long long ldx, const DY* __restrict__ dy,
    float* __restrict__ dS, float* __restrict__ part, int q, int h, int g, int p, int nt,
    long long bcn, int hs)
{
    const int XE = 16 / sizeof(X), YE = 16 / sizeof(DY);  // elements per 16-byte copy
    __shared__ __align__(16) DY As[PIPE ? 2 : 1][DG_T][XPad<DY>::KP];
    __shared__ __align__(16) X Bs[PIPE ? 2 : 1][DG_T][XPad<X>::KP];
    __shared__ float c_i[PIPE ? 2 : 1][DG_T];
    __shared__ float c_j[PIPE ? 2 : 1][DG_T];
    __shared__ float d_j[PIPE ? 2 : 1][DG_T];
    __shared__ float red[DG_T][6];
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
    const int kst = (p + DG_K - 1) / DG_K;
    const int h0 = gi * hg + split * per;  // this block's first head
    // Head h0 + k's decays: c_i, c_j (cs at rows i0.., j0..) and d_j (dt).
    auto load_cs = [&](int k, int buf, bool async) {
        const long long ro = bc * q * (long long)h + h0 + k;
        if (tid < DG_T) {
            const int i = i0 + tid;
            if (async) cp4(&c_i[buf][tid], i < q ? cs + ro + (long long)i * h : cs, i < q);
            else c_i[buf][tid] = i < q ? cs[ro + (long long)i * h] : 0.0f;
        } else if (tid < 2 * DG_T) {
            const int jj = tid - DG_T, j = j0 + jj;
            if (async) {
                cp4(&c_j[buf][jj], j < q ? cs + ro + (long long)j * h : cs, j < q);
                cp4(&d_j[buf][jj], j < q ? dt + ro + (long long)j * h : dt, j < q);
            } else {
                c_j[buf][jj] = j < q ? cs[ro + (long long)j * h] : 0.0f;
                d_j[buf][jj] = j < q ? dt[ro + (long long)j * h] : 0.0f;
            }
        }
    };
    // Stage (head h0 + k, columns k0 = kk * 32 ..) of dy and x into buffer buf.
    auto issue = [&](int k, int kk, int buf) {
        const int k0 = kk * DG_K;
        const X* xm = x + bc * q * ldx + (long long)(h0 + k) * p + k0;
        const DY* dym = dy + bc * q * rs + (long long)(h0 + k) * p + k0;
        if (PIPE) {
            constexpr int AC = DG_K / YE, BC = DG_K / XE;  // 16-byte copies per row
#pragma unroll
            for (int u = 0; u < DG_T * AC / 256; ++u) {
                const int e = tid + 256 * u, rr = e / AC, c = (e % AC) * YE;
                const bool oa = i0 + rr < q && k0 + c < p;
                cp16(&As[buf][rr][c], oa ? dym + (long long)(i0 + rr) * rs + c : dy, oa);
            }
#pragma unroll
            for (int u = 0; u < DG_T * BC / 256; ++u) {
                const int e = tid + 256 * u, rr = e / BC, c = (e % BC) * XE;
                const bool ob = j0 + rr < q && k0 + c < p;
                cp16(&Bs[buf][rr][c], ob ? xm + (long long)(j0 + rr) * ldx + c : x, ob);
            }
            if (kk == 0) load_cs(k, k & 1, true);
            cp_commit();
        } else {
            for (int e = tid; e < DG_T * DG_K; e += 256) {
                const int rr = e >> 5, c = e & 31;
                As[0][rr][c] = (i0 + rr < q && k0 + c < p) ? dym[(long long)(i0 + rr) * rs + c] : DY(0);
                Bs[0][rr][c] = (j0 + rr < q && k0 + c < p) ? xm[(long long)(j0 + rr) * ldx + c] : X(0);
            }
        }
    };
    if (PIPE) issue(0, 0, 0);
    int buf = 0;
    for (int k = 0; k < per; ++k) {
        if (!PIPE) {
            __syncthreads();  // the previous head's c_i, c_j, d_j and red are consumed
            load_cs(k, 0, false);
        }
        float d[16];
#pragma unroll
        for (int e = 0; e < 16; ++e) d[e] = 0.0f;
        for (int kk = 0; kk < kst; ++kk) {
            if (PIPE) {
                // The next stage (the next head's first after this head's last).
                const bool last = kk + 1 == kst;
                if (!last || k + 1 < per) {
                    issue(last ? k + 1 : k, last ? 0 : kk + 1, buf ^ 1);
                    cp_wait<1>();
                } else {
                    cp_wait<0>();
                }
            } else {
                if (kk > 0) __syncthreads();  // the previous stage is consumed
                issue(k, kk, 0);
            }
            __syncthreads();
            if constexpr (TC && sizeof(X) == 2 && sizeof(DY) == 2)
                grad_mma(d, f, As[buf], Bs[buf]);
            else
                tile_mma<TC, sizeof(X) == 2>(d, f, DG_K,
                             [&](int i, int c) { return ld(&As[buf][i][0], c); },
                             [&](int c, int j) { return ld(&Bs[buf][j][0], c); });
            if (PIPE) {
                __syncthreads();  // this buffer consumed before it is refilled
                buf ^= 1;
            }
        }
        const int cb = PIPE ? k & 1 : 0;
        grad_head(f, d, s, ds, c_i[cb], c_j[cb], d_j[cb], red, part, i0, j0, q, h, h0 + k, it, jt,
                  nt, bcn, bc);
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        const int i = i0 + f.row(e), j = j0 + f.col(e);
        if (i < q && j < q) dSm[(long long)i * q + j] = ds[e];
    }
}

// 2 blocks per SM (128 registers, 48 bytes spilled); 3 (80 registers, 128
// bytes spilled) ran as fast on the H200.
#define GRAD_ENTRY(name, TC, PIPE, X, DY)                                                    \
    extern "C" __global__ void __launch_bounds__(256, 2) name(                               \
        const float* S, const float* cs, const float* dt, const X* x, long long ldx,         \
        const DY* dy, float* dS, float* part, int q, int h, int g, int p, int nt,            \
        long long bcn, int hs)                                                               \
    {                                                                                        \
        diag_grad<TC, PIPE, X, DY>(S, cs, dt, x, ldx, dy, dS, part, q, h, g, p, nt, bcn, hs); \
    }
#define GRAD_ALL(SUF, X, DY)                                  \
    GRAD_ENTRY(ssd_diag_grad_##SUF, false, false, X, DY)      \
    GRAD_ENTRY(ssd_diag_grad_tc_##SUF, true, false, X, DY)    \
    GRAD_ENTRY(ssd_diag_grad_p_##SUF, false, true, X, DY)     \
    GRAD_ENTRY(ssd_diag_grad_tc_p_##SUF, true, true, X, DY)
GRAD_ALL(f32, float, float)
GRAD_ALL(bf16, bf16_t, float)
GRAD_ALL(bf16_bf16, bf16_t, bf16_t)
"#;

fn diag_src() -> String {
    format!("{}{}{}", nvrtc::PRELUDE, nvrtc::MMA, SSD_DIAG)
}

/// `(b * nc, q, h, p, g)` of the SSD diagonal op's operands.
fn diag_dims(s: &T, cs: &T, dt: &T, x: &T) -> (usize, usize, usize, usize, usize) {
    let (ss, cd, xs) = (s.meta.shape(), cs.meta.shape(), x.meta.shape());
    assert!(
        ss.len() == 5 && cd.len() == 4 && xs.len() == 5,
        "SSD diagonal: scores [b, nc, g, q, q], cs [b, nc, q, h], x [b, nc, q, h, p]"
    );
    let (b, nc, q, h, p, g) = (xs[0], xs[1], xs[2], xs[3], xs[4], ss[2]);
    assert_eq!(&cd[..], &[b, nc, q, h], "SSD diagonal: cs shape");
    assert_eq!(dt.meta.shape(), cd, "SSD diagonal: dt shape");
    assert_eq!(&ss[..], &[b, nc, g, q, q], "SSD diagonal: scores shape");
    assert!(g > 0 && h % g == 0, "SSD diagonal: {h} heads in {g} groups");
    (b * nc, q, h, p, g)
}

/// The kernel `base` for these operands: `_tc` for TF32 products, `_p` for
/// the pipelined one where `pipe`, then x's dtype.
fn kernel_name(base: &str, tf32: bool, pipe: bool, x: DType) -> String {
    let tc = if tf32 { "_tc" } else { "" };
    let p = if pipe { "_p" } else { "" };
    format!("{base}{tc}{p}_{}", super::suffix(x))
}

/// The two-heads-per-block kernels apply: bf16 operands on tensor cores,
/// pipelined, an even number of heads per group.
fn head_pairs(tf32: bool, pipe: bool, x: DType, h: usize, g: usize) -> bool {
    tf32 && pipe && x == DType::BF16 && (h / g).is_multiple_of(2)
}

/// Rows of `x` (`p` per head, tokens `ldx` apart) copied in 16-byte pieces.
fn x_rows16(p: usize, ldx: usize, x: DType) -> bool {
    let v = 16 / x.size();
    p.is_multiple_of(v) && ldx.is_multiple_of(v)
}

/// `y [b, nc, q, h, p]` (f32) from scores, `cs`, `dt` (f32) and `x` (f32 or
/// bf16, read as it is) (see [`SSD_DIAG`]).
pub fn ssd_diag_fwd(s: T, cs: T, dt: T, x: T, tf32: bool) -> T {
    let (bcn, q, h, p, g) = diag_dims(&s, &cs, &dt, &x);
    let f32 = |t| same_dtype(t, DType::F32);
    let (s, cs, dt) = (f32(s), f32(cs), f32(dt));
    let out = empty(&x, x.meta.shape().to_vec(), DType::F32);
    // A column slice of the conv output is read in place.
    let (x, ldx) = super::token_rows(x, 1);
    if bcn * q * h * p > 0 {
        let pipe = q.is_multiple_of(4) && x_rows16(p, ldx, x.dtype);
        let pairs = head_pairs(tf32, pipe, x.dtype, h, g);
        let kernel = if pairs {
            "ssd_diag_fwd_tc_p2_bf16".to_string()
        } else {
            kernel_name("ssd_diag_fwd", tf32, pipe, x.dtype)
        };
        let hpb = if pairs { 2 } else { 1 };
        let device = x.device.index;
        let f = nvrtc::function(device, "ssd_diag", &diag_src(), &kernel);
        enqueue(
            [&out, &s, &cs, &dt, &x],
            move |[mut o_p, mut s_p, mut c_p, mut d_p, mut x_p], stream| {
                let (mut q32, mut h32, mut g32, mut p32) = (q as i32, h as i32, g as i32, p as i32);
                let mut ldx64 = ldx as i64;
                let mut params = kernel_args!(s_p, c_p, d_p, x_p, ldx64, o_p, q32, h32, g32, p32);
                let grid = (
                    (q.div_ceil(64) * bcn * h / hpb) as u32,
                    p.div_ceil(64) as u32,
                    1,
                );
                // SAFETY: the kernel's signature; contiguous operands of the checked shapes.
                unsafe { launch(device, f, grid, (256, 1, 1), 0, stream, &mut params) };
            },
        );
    }
    drop((s, cs, dt, x));
    out
}

/// `(dscores, dcs, ddt, dx)` of [`ssd_diag_fwd`] for the upstream `dy`
/// (f32, or x's dtype as it is: a bf16 model's output gradient, exact);
/// `dx` in `x`'s dtype, plus `acc` (x's gradient from its other consumers)
/// when given.
pub fn ssd_diag_bwd(dy: T, s: T, cs: T, dt: T, x: T, tf32: bool, acc: Option<T>) -> (T, T, T, T) {
    let (bcn, q, h, p, g) = diag_dims(&s, &cs, &dt, &x);
    let f32 = |t| same_dtype(t, DType::F32);
    let xdt = x.dtype;
    let dy = if dy.dtype == xdt {
        into_contiguous(dy)
    } else {
        f32(dy)
    };
    let (s, cs, dt) = (f32(s), f32(cs), f32(dt));
    let acc = acc.map(|a| same_dtype(a, xdt));
    if let Some(a) = &acc {
        assert_eq!(a.meta.shape(), x.meta.shape(), "SSD diagonal: x's gradient");
    }
    // Kernels named for x's dtype, then dy's where it is not f32.
    let dy_sfx = match dy.dtype {
        DType::F32 => String::new(),
        d => format!("_{}", super::suffix(d)),
    };
    // dy's rows (h * p) copied in 16-byte pieces as x's are.
    let dy16 = x_rows16(p, h * p, dy.dtype);
    let dx = empty(&x, x.meta.shape().to_vec(), xdt);
    let (x, ldx) = super::token_rows(x, 1);
    let pt = p.div_ceil(64);
    // ddt per 64-column tile of p, summed after (one tile: ddt itself).
    let ddt = if p > 0 {
        empty(&x, vec![pt * bcn * q * h], DType::F32)
    } else {
        zeros_f32(&x, vec![bcn * q * h])
    };
    // The group's heads in `hs` parallel splits (partial dS summed after).
    let hg = h / g;
    let hs = [8, 4, 2, 1].into_iter().find(|s| hg % s == 0).unwrap_or(1);
    let ds = empty(&x, vec![hs * bcn * g * q * q], DType::F32);
    let nt = q.div_ceil(64);
    // Flat: a multi-dim allocation may pad its rows (h = 3), the kernel writes flat indices.
    let part = zeros_f32(&x, vec![2 * nt * bcn * q * h]);
    if bcn * q * h * p > 0 {
        let device = x.device.index;
        let src = diag_src();
        let dx_pipe = q.is_multiple_of(4) && dy16;
        let pairs = head_pairs(tf32, dx_pipe, xdt, h, g) && dy.dtype == xdt;
        let dx_kernel = if pairs {
            "ssd_diag_dx_tc_p2_bf16_bf16".to_string()
        } else {
            kernel_name("ssd_diag_dx", tf32, dx_pipe, xdt) + &dy_sfx
        };
        let hpb = if pairs { 2 } else { 1 };
        let f_dx = nvrtc::function(device, "ssd_diag", &src, &dx_kernel);
        let f_grad = nvrtc::function(
            device,
            "ssd_diag",
            &src,
            &(kernel_name("ssd_diag_grad", tf32, x_rows16(p, ldx, xdt) && dy16, xdt) + &dy_sfx),
        );
        enqueue_opt(
            [
                Some(&dx),
                Some(&ddt),
                Some(&ds),
                Some(&part),
                Some(&s),
                Some(&cs),
                Some(&dt),
                Some(&x),
                Some(&dy),
                acc.as_ref(),
            ],
            move |[
                mut dx_p,
                mut ddt_p,
                mut ds_p,
                mut part_p,
                mut s_p,
                mut c_p,
                mut d_p,
                mut x_p,
                mut dy_p,
                mut acc_p,
            ],
                  stream| {
                let (mut q32, mut h32, mut g32, mut p32, mut nt32, mut bcn64, mut hs32) = (
                    q as i32, h as i32, g as i32, p as i32, nt as i32, bcn as i64, hs as i32,
                );
                let mut ldx64 = ldx as i64;
                let mut dx_params = kernel_args!(
                    s_p, c_p, d_p, x_p, ldx64, dy_p, dx_p, acc_p, ddt_p, q32, h32, g32, p32
                );
                let dx_grid = ((nt * bcn * h / hpb) as u32, pt as u32, 1);
                let mut grad_params = kernel_args!(
                    s_p, c_p, d_p, x_p, ldx64, dy_p, ds_p, part_p, q32, h32, g32, p32, nt32, bcn64,
                    hs32
                );
                let grad_grid = ((nt * nt * hs * bcn * g) as u32, 1, 1);
                // SAFETY: the kernels' signatures; contiguous operands of the checked
                // shapes, `ddt` `pt` slots and `part` `2 nt` slots of `cs`'s size.
                unsafe {
                    launch(
                        device,
                        f_dx,
                        dx_grid,
                        (256, 1, 1),
                        0,
                        stream,
                        &mut dx_params,
                    );
                    launch(
                        device,
                        f_grad,
                        grad_grid,
                        (256, 1, 1),
                        0,
                        stream,
                        &mut grad_params,
                    );
                }
            },
        );
    }
    let rows = bcn * q * h;
    let part = Cb::float_reshape(part, [2 * nt, rows].into());
    let dcs = Cb::float_reshape(Cb::float_sum_dim(part, 0), cs.meta.shape().clone());
    let ddt = if pt == 1 {
        ddt
    } else {
        Cb::float_sum_dim(Cb::float_reshape(ddt, [pt, rows].into()), 0)
    };
    let ddt = Cb::float_reshape(ddt, cs.meta.shape().clone());
    let ds = if hs == 1 {
        ds
    } else {
        Cb::float_sum_dim(Cb::float_reshape(ds, [hs, bcn * g * q * q].into()), 0)
    };
    let ds = Cb::float_reshape(ds, s.meta.shape().clone());
    drop((dy, s, dt, x, acc));
    (ds, dcs, ddt, dx)
}
