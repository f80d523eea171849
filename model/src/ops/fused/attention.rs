//! Flash attention (causal, grouped KV heads): bf16 operands on tensor
//! cores, f32 softmax statistics, no `[l, l]` matrix in memory.

use burn::tensor::DType;
use burn_cubecl::kernel::into_contiguous;

use super::empty;
use crate::kernel_args;
use crate::ops::nvrtc::{self, T, enqueue, launch};

/// Head dims with a compiled kernel (multiples of 16 up to 128).
pub const FLASH_HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

const FLASH: &str = r#"
// q, o, dq [b, l, hq, D] and k, v, dk, dv [b, l, hk, D] (rows of heads * D);
// lse2, delta [b, hq, l] f32. lse2 is the log-sum-exp of the scaled scores
// in base 2 (the kernels use exp2 with scale * log2(e) folded in).
// Tensor-core tiles (`nvrtc::MMA`), operands through ldmatrix from shared rows padded by 8 (conflict-free). A warp
// owns 16 rows; lane (g = lane / 4, t = lane % 4) holds rows g and g + 8,
// columns 2t and 2t + 1 of each 8-wide accumulator tile.
#define FA_PAD 8
#define NEG_INF __int_as_float(0xff800000)
#define POS_INF __int_as_float(0x7f800000)


// Rows r0 .. r0 + R of a [l, ld] matrix (from `src`, its row 0) into R
// shared rows of D + FA_PAD; rows past l read as zeros.
template <int R, int D, int NT>
__device__ __forceinline__ void load_rows(bf16_t* s, const bf16_t* src, long long ld, int r0, int l) {
    constexpr int C = D / 8;
    if constexpr (NT % C == 0 && (R * C) % NT == 0) {
        // A thread's copies are one column, NT / C rows apart: one address
        // worked out, then a stride (per-copy index math took ~28
        // instructions a copy, a sizeable share of the main loops).
        constexpr int RS = NT / C;
        const int rt = threadIdx.x / C, c = (threadIdx.x % C) * 8;
        const bf16_t* g = src + (long long)(r0 + rt) * ld + c;
        const long long step = RS * ld;
#pragma unroll
        for (int k = 0; k < R * C / NT; ++k) {
            const bool ok = r0 + rt + k * RS < l;
            cp16(s + (rt + k * RS) * (D + FA_PAD) + c, ok ? g + k * step : src, ok);
        }
    } else {
        for (int idx = threadIdx.x; idx < R * C; idx += NT) {
            const int r = idx / C, c = idx % C;
            const bool ok = r0 + r < l;
            cp16(s + r * (D + FA_PAD) + c * 8, ok ? src + (long long)(r0 + r) * ld + c * 8 : src, ok);
        }
    }
}

// Fragment addresses (lane's ldmatrix row) in a tile of rows of LD:
// A (rows m0.., cols k0..) and B read transposed (rows k0.., cols n0..).
template <int LD> __device__ __forceinline__ const bf16_t* a_addr(const bf16_t* s, int r0, int c0) {
    const int lane = threadIdx.x & 31;
    return s + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + c0 + (lane >> 4) * 8;
}
// B stored as rows n (cols k): two n-tiles (n0, n0 + 8) of one k-step.
template <int LD> __device__ __forceinline__ const bf16_t* b_addr(const bf16_t* s, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    return s + (n0 + (lane & 7) + (lane >> 4) * 8) * LD + k0 + ((lane >> 3) & 1) * 8;
}

// acc[16 x 8 N] += A(16 x 16 KS, registers) B^T, B as rows n of `s`.
template <int N, int KS, int LD>
__device__ __forceinline__ void mma_abt(float (&acc)[N][4], const unsigned (&a)[KS][4], const bf16_t* s) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int np = 0; np < N / 2; ++np) {
            unsigned b[4];
            ldsm4(b, b_addr<LD>(s, np * 16, ks * 16));
            mma16816(acc[2 * np], a[ks], b[0], b[1]);
            mma16816(acc[2 * np + 1], a[ks], b[2], b[3]);
        }
}
// acc[16 x 8 N] += P(16 x 8 M, accumulator layout, rounded to bf16) B,
// B as rows k of `s` (read transposed).
template <int N, int M, int LD>
__device__ __forceinline__ void mma_pb(float (&acc)[N][4], const float (&p)[M][4], const bf16_t* s) {
#pragma unroll
    for (int kk = 0; kk < M / 2; ++kk) {
        const unsigned a[4] = {pack2(p[2 * kk][0], p[2 * kk][1]), pack2(p[2 * kk][2], p[2 * kk][3]),
                               pack2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < N / 2; ++dp) {
            unsigned b[4];
            ldsm4t(b, a_addr<LD>(s, kk * 16, dp * 16));
            mma16816(acc[2 * dp], a, b[0], b[1]);
            mma16816(acc[2 * dp + 1], a, b[2], b[3]);
        }
    }
}
// A fragments of a warp's 16 rows (from row r0 of `s`), all of D.
template <int KS, int LD>
__device__ __forceinline__ void load_a(unsigned (&a)[KS][4], const bf16_t* s, int r0) {
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldsm4(a[ks], a_addr<LD>(s, r0, ks * 16));
}
template <int N>
__device__ __forceinline__ void zero(float (&a)[N][4]) {
#pragma unroll
    for (int n = 0; n < N; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = 0.0f;
}
// A warp's 16 x D accumulator, times `s`, to bf16 rows (row stride ld).
template <int N>
__device__ __forceinline__ void store_rows(bf16_t* out, long long ld, const float (&acc)[N][4], int r0,
                                           int l, float s0, float s1) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < N; ++n) {
        if (r0 + g < l)
            *(unsigned*)(out + (long long)(r0 + g) * ld + 8 * n + 2 * t) = pack2(acc[n][0] * s0, acc[n][1] * s0);
        if (r0 + g + 8 < l)
            *(unsigned*)(out + (long long)(r0 + g + 8) * ld + 8 * n + 2 * t) = pack2(acc[n][2] * s1, acc[n][3] * s1);
    }
}

// Block (query tile, head, batch) in a 1-D grid, the tiles with the most
// work first; 4 warps, 64 query rows, 64-key tiles.
template <int D>
__device__ __forceinline__ void flash_fwd(const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o,
                                          float* lse2, int l, int hq, int hk, float sl2) {
    constexpr int LD = D + FA_PAD, BM = 64, BN = 64, KS = D / 16;
    __shared__ __align__(16) bf16_t Ks[BN * LD];
    __shared__ __align__(16) bf16_t Vs[BN * LD];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int nt = (l + BM - 1) / BM, nbh = gridDim.x / nt;
    const int it = nt - 1 - blockIdx.x / nbh, bh = blockIdx.x % nbh;
    const int bi = bh / hq, hi = bh % hq, kh = hi / (hq / hk);
    const long long qld = (long long)hq * D, kld = (long long)hk * D;
    const bf16_t* qb = q + (long long)bi * l * qld + (long long)hi * D;
    const bf16_t* kb = k + (long long)bi * l * kld + (long long)kh * D;
    const bf16_t* vb = v + (long long)bi * l * kld + (long long)kh * D;
    const int i0 = it * BM, r0 = i0 + w * 16 + g, r1 = r0 + 8;

    // The warp's query rows stay in registers (staged through Ks).
    load_rows<BM, D, 128>(Ks, qb, qld, i0, l);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    unsigned qf[KS][4];
    load_a<KS, LD>(qf, Ks, w * 16);
    __syncthreads();
    // K and V in separate groups: each lands while the other is used.
    load_rows<BN, D, 128>(Ks, kb, kld, 0, l);
    cp_commit();
    load_rows<BN, D, 128>(Vs, vb, kld, 0, l);
    cp_commit();

    float acc[D / 8][4];
    zero(acc);
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    for (int jt = 0; jt <= it; ++jt) {
        cp_wait<1>();  // K(jt)
        __syncthreads();
        float s[BN / 8][4];
        zero(s);
        mma_abt<BN / 8, KS, LD>(s, qf, Ks);
        __syncthreads();
        if (jt < it) load_rows<BN, D, 128>(Ks, kb, kld, (jt + 1) * BN, l);
        cp_commit();
        // Online softmax (base 2); only the diagonal tile needs the mask.
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = jt * BN + 8 * n + 2 * t + (e & 1);
                float x = s[n][e] * sl2;
                if (jt == it && j > ((e & 2) ? r1 : r0)) x = NEG_INF;
                s[n][e] = x;
                if (e & 2) mx1 = fmaxf(mx1, x); else mx0 = fmaxf(mx0, x);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float a0 = ex2(m0 - mx0), a1 = ex2(m1 - mx1);
        m0 = mx0;
        m1 = mx1;
        float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = ex2(s[n][e] - ((e & 2) ? m1 : m0));
                s[n][e] = p;
                if (e & 2) rs1 += p; else rs0 += p;
            }
        l0 = l0 * a0 + rs0;
        l1 = l1 * a1 + rs1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            acc[n][0] *= a0; acc[n][1] *= a0;
            acc[n][2] *= a1; acc[n][3] *= a1;
        }
        cp_wait<1>();  // V(jt)
        __syncthreads();
        mma_pb<D / 8, BN / 8, LD>(acc, s, Vs);
        __syncthreads();
        if (jt < it) load_rows<BN, D, 128>(Vs, vb, kld, (jt + 1) * BN, l);
        cp_commit();
    }
    cp_wait<0>();
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    store_rows(o + (long long)bi * l * qld + (long long)hi * D, qld, acc, i0 + w * 16, l, 1.0f / l0, 1.0f / l1);
    float* lr = lse2 + ((long long)bi * hq + hi) * l;
    if (t == 0 && r0 < l) lr[r0] = m0 + log2f(l0);
    if (t == 0 && r1 < l) lr[r1] = m1 + log2f(l1);
}

// delta[b, h, i] = sum_d dO * O (f32), one warp per (b, i, h) row.
template <int D>
__device__ __forceinline__ void flash_delta(const bf16_t* dout, const bf16_t* o, float* delta, long long rows,
                                            int l, int hq) {
    const int lane = threadIdx.x & 31;
    const long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= rows) return;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += bf16_to_f32(dout[r * D + d]) * bf16_to_f32(o[r * D + d]);
    for (int x = 16; x > 0; x >>= 1) s += __shfl_xor_sync(0xffffffffu, s, x);
    const long long bl = r / hq, bi = bl / l;
    const int h = (int)(r % hq), i = (int)(bl % l);
    if (lane == 0) delta[(bi * hq + h) * l + i] = s;
}

// dq: block (query tile, head, batch) as in the forward; 32-key tiles of
// K and V double-buffered; the warp's Q and dO rows in registers.
template <int D>
__device__ __forceinline__ void flash_dq(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                                         const float* lse2, const float* delta, bf16_t* dq, int l, int hq,
                                         int hk, float sl2, float scale) {
    constexpr int LD = D + FA_PAD, BM = 64, BN = 32, KS = D / 16;
    __shared__ __align__(16) bf16_t sm[4 * BN * LD];  // == 2 * BM rows: Q and dO staging
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int nt = (l + BM - 1) / BM, nbh = gridDim.x / nt;
    const int it = nt - 1 - blockIdx.x / nbh, bh = blockIdx.x % nbh;
    const int bi = bh / hq, hi = bh % hq, kh = hi / (hq / hk);
    const long long qld = (long long)hq * D, kld = (long long)hk * D;
    const long long qoff = (long long)bi * l * qld + (long long)hi * D;
    const bf16_t* kb = k + (long long)bi * l * kld + (long long)kh * D;
    const bf16_t* vb = v + (long long)bi * l * kld + (long long)kh * D;
    const int i0 = it * BM, r0 = i0 + w * 16 + g, r1 = r0 + 8;

    load_rows<BM, D, 128>(sm, q + qoff, qld, i0, l);
    load_rows<BM, D, 128>(sm + BM * LD, dout + qoff, qld, i0, l);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    unsigned qf[KS][4], df[KS][4];
    load_a<KS, LD>(qf, sm, w * 16);
    load_a<KS, LD>(df, sm + BM * LD, w * 16);
    __syncthreads();
    const float* lr = lse2 + ((long long)bi * hq + hi) * l;
    const float* dr = delta + ((long long)bi * hq + hi) * l;
    const float L0 = r0 < l ? lr[r0] : 0.0f, L1 = r1 < l ? lr[r1] : 0.0f;
    const float D0 = r0 < l ? dr[r0] : 0.0f, D1 = r1 < l ? dr[r1] : 0.0f;

    float acc[D / 8][4];
    zero(acc);
    const int ntk = (min(i0 + BM, l) + BN - 1) / BN;
    load_rows<BN, D, 128>(sm, kb, kld, 0, l);
    load_rows<BN, D, 128>(sm + BN * LD, vb, kld, 0, l);
    cp_commit();
    for (int jt = 0; jt < ntk; ++jt) {
        bf16_t* Ks = sm + (jt & 1) * 2 * BN * LD;
        bf16_t* Vs = Ks + BN * LD;
        if (jt + 1 < ntk) {
            bf16_t* Kn = sm + ((jt + 1) & 1) * 2 * BN * LD;
            load_rows<BN, D, 128>(Kn, kb, kld, (jt + 1) * BN, l);
            load_rows<BN, D, 128>(Kn + BN * LD, vb, kld, (jt + 1) * BN, l);
        }
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        float s[BN / 8][4], dp[BN / 8][4];
        zero(s);
        zero(dp);
        mma_abt<BN / 8, KS, LD>(s, qf, Ks);
        mma_abt<BN / 8, KS, LD>(dp, df, Vs);
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = jt * BN + 8 * n + 2 * t + (e & 1);
                const bool hi_row = e & 2;
                const float p = j <= (hi_row ? r1 : r0) ? ex2(s[n][e] * sl2 - (hi_row ? L1 : L0)) : 0.0f;
                s[n][e] = p * (dp[n][e] - (hi_row ? D1 : D0));
            }
        mma_pb<D / 8, BN / 8, LD>(acc, s, Ks);
        __syncthreads();
    }
    store_rows(dq + qoff, qld, acc, i0 + w * 16, l, scale, scale);
}

// dk, dv per query head (f32 partials [b, l, hq, D], summed over a KV
// head's query heads by flash_kv_sum): block (key tile, head, batch), the
// tiles with the most work first; 4 warps, 64 keys, 32-query tiles of Q
// and dO double-buffered in dynamic shared memory.
template <int D>
__device__ __forceinline__ void flash_dkv(const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout,
                                          const float* lse2, const float* delta, float* dk, float* dv, int l,
                                          int hq, int hk, float sl2, float scale) {
    constexpr int LD = D + FA_PAD, BN = 64, BQ = 32, KS = D / 16;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16_t* Ks = (bf16_t*)fa_smem;
    bf16_t* Vs = Ks + BN * LD;
    bf16_t* QD = Vs + BN * LD;                        // 2 stages of Q, dO rows
    float* LS = (float*)(QD + 2 * 2 * BQ * LD);       // 2 stages of lse2, delta
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int nt = (l + BN - 1) / BN, nbh = gridDim.x / nt;
    const int jt = blockIdx.x / nbh, bh = blockIdx.x % nbh;
    const int bi = bh / hq, hi = bh % hq, kh = hi / (hq / hk);
    const long long qld = (long long)hq * D, kld = (long long)hk * D;
    const long long qoff = (long long)bi * l * qld + (long long)hi * D;
    const bf16_t* qb = q + qoff;
    const bf16_t* db = dout + qoff;
    const float* lr = lse2 + ((long long)bi * hq + hi) * l;
    const float* dr = delta + ((long long)bi * hq + hi) * l;
    const int j0 = jt * BN, kw = j0 + w * 16;

    load_rows<BN, D, 128>(Ks, k + (long long)bi * l * kld + (long long)kh * D, kld, j0, l);
    load_rows<BN, D, 128>(Vs, v + (long long)bi * l * kld + (long long)kh * D, kld, j0, l);
    auto stage = [&](int qt) {
        bf16_t* s = QD + (qt & 1) * 2 * BQ * LD;
        float* ls = LS + (qt & 1) * 2 * BQ;
        load_rows<BQ, D, 128>(s, qb, qld, qt * BQ, l);
        load_rows<BQ, D, 128>(s + BQ * LD, db, qld, qt * BQ, l);
        if (threadIdx.x < BQ) {
            const int i = qt * BQ + threadIdx.x;
            ls[threadIdx.x] = i < l ? lr[i] : POS_INF;  // exp2(x - inf) = 0
            ls[BQ + threadIdx.x] = i < l ? dr[i] : 0.0f;
        }
    };
    const int q_first = j0 / BQ, q_end = (l + BQ - 1) / BQ;
    stage(q_first);
    cp_commit();
    float ak[D / 8][4], av[D / 8][4];
    zero(ak);
    zero(av);
    for (int qt = q_first; qt < q_end; ++qt) {
        if (qt + 1 < q_end) stage(qt + 1);
        cp_commit();
        cp_wait<1>();
        __syncthreads();
        const bf16_t* Qs = QD + (qt & 1) * 2 * BQ * LD;
        const bf16_t* Ds = Qs + BQ * LD;
        const float* ls = LS + (qt & 1) * 2 * BQ;
        // S^T and dP^T: the warp's keys against the tile's queries.
        float s[BQ / 8][4], dp[BQ / 8][4];
        zero(s);
        zero(dp);
        {
            unsigned a[KS][4];
            load_a<KS, LD>(a, Ks, w * 16);
            mma_abt<BQ / 8, KS, LD>(s, a, Qs);
            load_a<KS, LD>(a, Vs, w * 16);
            mma_abt<BQ / 8, KS, LD>(dp, a, Ds);
        }
#pragma unroll
        for (int n = 0; n < BQ / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ci = 8 * n + 2 * t + (e & 1), i = qt * BQ + ci;
                const int j = kw + g + ((e & 2) ? 8 : 0);
                const float p = i >= j ? ex2(s[n][e] * sl2 - ls[ci]) : 0.0f;
                s[n][e] = p;
                dp[n][e] = p * (dp[n][e] - ls[BQ + ci]);
            }
        mma_pb<D / 8, BQ / 8, LD>(av, s, Ds);
        mma_pb<D / 8, BQ / 8, LD>(ak, dp, Qs);
        __syncthreads();
    }
    cp_wait<0>();
    // f32 partials, the warp's 16 keys.
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; e += 2) {
            const int j = kw + g + (e ? 8 : 0);
            if (j >= l) continue;
            const long long at = ((long long)bi * l + j) * qld + (long long)hi * D + 8 * n + 2 * t;
            *(float2*)(dk + at) = make_float2(ak[n][e] * scale, ak[n][e + 1] * scale);
            *(float2*)(dv + at) = make_float2(av[n][e], av[n][e + 1]);
        }
}

// out[b, l, hk, D] = sum over the hq / hk query heads of KV head h of
// part[b, l, hq, D], in order, rounded to bf16.
extern "C" __global__ void flash_kv_sum(const float* __restrict__ part, bf16_t* __restrict__ out, long long n,
                                        int hk, int rep, int d) {
    for (long long x = blockIdx.x * (long long)blockDim.x + threadIdx.x; x < n;
         x += (long long)gridDim.x * blockDim.x) {
        const long long row = x / d;  // (b, l, kv head)
        const int c = (int)(x % d), h = (int)(row % hk);
        const float* p = part + ((row / hk) * hk * rep + (long long)h * rep) * d + c;
        float s = 0.0f;
        for (int r = 0; r < rep; ++r) s += p[(long long)r * d];
        out[x] = f32_to_bf16(s);
    }
}

#define FLASH_KERNELS(D)                                                                              \
extern "C" __global__ void __launch_bounds__(128) flash_fwd_##D(                                      \
    const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse2, int l, int hq, int hk,  \
    float sl2) {                                                                                      \
    flash_fwd<D>(q, k, v, o, lse2, l, hq, hk, sl2);                                                   \
}                                                                                                     \
extern "C" __global__ void flash_delta_##D(const bf16_t* dout, const bf16_t* o, float* delta,         \
                                           long long rows, int l, int hq) {                           \
    flash_delta<D>(dout, o, delta, rows, l, hq);                                                      \
}                                                                                                     \
extern "C" __global__ void __launch_bounds__(128) flash_dq_##D(                                       \
    const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse2,         \
    const float* delta, bf16_t* dq, int l, int hq, int hk, float sl2, float scale) {                  \
    flash_dq<D>(q, k, v, dout, lse2, delta, dq, l, hq, hk, sl2, scale);                               \
}                                                                                                     \
extern "C" __global__ void __launch_bounds__(128) flash_dkv_##D(                                      \
    const bf16_t* q, const bf16_t* k, const bf16_t* v, const bf16_t* dout, const float* lse2,         \
    const float* delta, float* dk, float* dv, int l, int hq, int hk, float sl2, float scale) {        \
    flash_dkv<D>(q, k, v, dout, lse2, delta, dk, dv, l, hq, hk, sl2, scale);                          \
}
FLASH_KERNELS(16)
FLASH_KERNELS(32)
FLASH_KERNELS(64)
FLASH_KERNELS(128)
"#;

fn flash_src() -> String {
    format!("{}{}{}", nvrtc::PRELUDE, nvrtc::MMA, FLASH)
}

/// `[b, l, heads, d]` of `t`, contiguous bf16.
fn dims(t: &T, what: &str) -> [usize; 4] {
    let s = t.meta.shape();
    assert!(
        s.len() == 4 && t.dtype == DType::BF16,
        "flash attention: {what} must be bf16 [b, l, heads, head_dim]"
    );
    [s[0], s[1], s[2], s[3]]
}

/// Dynamic shared memory of the dk/dv kernel (above the 48 KB default).
fn dkv_smem(d: usize) -> u32 {
    let ld = d + 8;
    ((64 * 2 + 2 * 2 * 32) * ld * 2 + 2 * 2 * 32 * 4) as u32
}

/// `(o [b, l, hq, d], lse2 [b, hq, l])` of causal attention with
/// `scale` on the scores: `q [b, l, hq, d]`, `k`, `v [b, l, hk, d]`, bf16.
pub fn flash_attention_fwd(q: T, k: T, v: T, scale: f64) -> (T, T) {
    let (q, k, v) = (into_contiguous(q), into_contiguous(k), into_contiguous(v));
    let [b, l, hq, d] = dims(&q, "q");
    let [_, _, hk, _] = dims(&k, "k");
    assert_eq!(dims(&v, "v"), [b, l, hk, d], "flash attention: v's shape");
    assert!(FLASH_HEAD_DIMS.contains(&d) && hk > 0 && hq % hk == 0);
    let o = empty(&q, vec![b, l, hq, d], DType::BF16);
    let lse = empty(&q, vec![b, hq, l], DType::F32);
    if b * l * hq == 0 {
        return (o, lse);
    }
    let device = q.device.index;
    let f = nvrtc::function(device, "flash", &flash_src(), &format!("flash_fwd_{d}"));
    let blocks = (l.div_ceil(64) * b * hq) as u32;
    enqueue(
        [&o, &lse, &q, &k, &v],
        move |[mut o_p, mut lse_p, mut q_p, mut k_p, mut v_p], stream| {
            let (mut l32, mut hq32, mut hk32) = (l as i32, hq as i32, hk as i32);
            let mut sl2 = (scale * std::f64::consts::LOG2_E) as f32;
            let mut params = kernel_args!(q_p, k_p, v_p, o_p, lse_p, l32, hq32, hk32, sl2);
            // SAFETY: the kernel's signature; shapes checked above.
            unsafe {
                launch(
                    device,
                    f,
                    (blocks, 1, 1),
                    (128, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            };
        },
    );
    drop((q, k, v));
    (o, lse)
}

/// `(dq, dk, dv)` from `dout` and the forward's inputs, output and `lse2`.
/// Deterministic: dq per query tile, dk and dv per query head, then summed
/// over each KV head's query heads in order (no atomics).
pub fn flash_attention_bwd(dout: T, q: T, k: T, v: T, o: T, lse: T, scale: f64) -> (T, T, T) {
    let (q, k, v, o) = (
        into_contiguous(q),
        into_contiguous(k),
        into_contiguous(v),
        into_contiguous(o),
    );
    let dout = into_contiguous(if dout.dtype == DType::BF16 {
        dout
    } else {
        burn_cubecl::kernel::cast(dout, DType::BF16)
    });
    let [b, l, hq, d] = dims(&q, "q");
    let [_, _, hk, _] = dims(&k, "k");
    assert_eq!(dims(&dout, "dout"), [b, l, hq, d]);
    let lse = into_contiguous(lse);
    let dq = empty(&q, vec![b, l, hq, d], DType::BF16);
    let (dk, dv) = (
        empty(&q, vec![b, l, hk, d], DType::BF16),
        empty(&q, vec![b, l, hk, d], DType::BF16),
    );
    if b * l * hq == 0 {
        return (dq, dk, dv);
    }
    let delta = empty(&q, vec![b, hq, l], DType::F32);
    let dk_part = empty(&q, vec![b, l, hq, d], DType::F32);
    let dv_part = empty(&q, vec![b, l, hq, d], DType::F32);
    let device = q.device.index;
    let src = flash_src();
    let f_delta = nvrtc::function(device, "flash", &src, &format!("flash_delta_{d}"));
    let f_dq = nvrtc::function(device, "flash", &src, &format!("flash_dq_{d}"));
    let f_dkv = nvrtc::function(device, "flash", &src, &format!("flash_dkv_{d}"));
    let f_sum = nvrtc::function(device, "flash", &src, "flash_kv_sum");
    let smem = dkv_smem(d);
    nvrtc::set_max_dynamic_smem(device, f_dkv, smem);
    let rows = b * l * hq;
    // 64-row tiles of queries (dq) and of keys (dk, dv), per head and batch.
    let blocks = (l.div_ceil(64) * b * hq) as u32;
    enqueue(
        [
            &dq, &dk, &dv, &delta, &dk_part, &dv_part, &dout, &q, &k, &v, &o, &lse,
        ],
        move |[
            mut dq_p,
            dk_p,
            dv_p,
            mut delta_p,
            mut dkp_p,
            mut dvp_p,
            mut do_p,
            mut q_p,
            mut k_p,
            mut v_p,
            mut o_p,
            mut lse_p,
        ],
              stream| {
            let (mut l32, mut hq32, mut hk32) = (l as i32, hq as i32, hk as i32);
            let mut sl2 = (scale * std::f64::consts::LOG2_E) as f32;
            let mut sc = scale as f32;
            let mut rows64 = rows as i64;
            let mut params = kernel_args!(do_p, o_p, delta_p, rows64, l32, hq32);
            // SAFETY (all four launches): the kernels' signatures; every
            // buffer has the shape allocated or checked above.
            unsafe {
                launch(
                    device,
                    f_delta,
                    (rows.div_ceil(8) as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            };
            let mut params = kernel_args!(
                q_p, k_p, v_p, do_p, lse_p, delta_p, dq_p, l32, hq32, hk32, sl2, sc
            );
            unsafe {
                launch(
                    device,
                    f_dq,
                    (blocks, 1, 1),
                    (128, 1, 1),
                    0,
                    stream,
                    &mut params,
                )
            };
            let mut params = kernel_args!(
                q_p, k_p, v_p, do_p, lse_p, delta_p, dkp_p, dvp_p, l32, hq32, hk32, sl2, sc
            );
            unsafe {
                launch(
                    device,
                    f_dkv,
                    (blocks, 1, 1),
                    (128, 1, 1),
                    smem,
                    stream,
                    &mut params,
                )
            };
            let n = b * l * hk * d;
            let (mut n64, mut rep, mut d32) = (n as i64, (hq / hk) as i32, d as i32);
            for (mut part, mut out) in [(dkp_p, dk_p), (dvp_p, dv_p)] {
                let mut params = kernel_args!(part, out, n64, hk32, rep, d32);
                unsafe {
                    launch(
                        device,
                        f_sum,
                        nvrtc::grid_for(n, 256),
                        (256, 1, 1),
                        0,
                        stream,
                        &mut params,
                    )
                };
            }
        },
    );
    drop((dout, q, k, v, o, lse, delta, dk_part, dv_part));
    (dq, dk, dv)
}
