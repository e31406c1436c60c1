/* Attention with many small heads for the OpenVINO runner (see rmt_deploy/runners/small_attention.py).

   q, k, v and out are (batch, seq, heads * dim) float32, the layout of the exported 3-D ONNX
   Attention nodes, so no transposes surround the call; mask is an additive (mask_heads, seq, seq)
   bias, head h taking mask h % mask_heads (mask_heads divides heads). One task per (batch, head):
   its keys are gathered transposed (and pre-scaled) into a scratch block so scores vectorise over
   keys; values are read in place, outputs vectorise over the head dimension. Four query rows go
   together, so each loaded key or value vector feeds four independent FMA chains. Tasks run on
   oneTBB, the thread pool OpenVINO itself runs on: called from inside an inference its idle
   workers take them (a second pool would fight them for the cores). Built with -march=native
   (AVX-512F) against the OpenVINO and oneTBB headers and libraries that ship with OpenVINO; the
   caller falls back to OpenVINO's own kernel where it does not build. Where the compiler targets
   AVX512_BF16 the library also has a bfloat16 variant (below): bf16 q, k, v and out, float32 mask
   and softmax. */
#include <immintrin.h>
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/op/op.hpp>
#include <tbb/parallel_for.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#define MAX_SEQ 256
#define MAX_DIM 64
#define ROWS 4      /* query rows per block */
#define CHUNK 4     /* key vectors (of 16) per score block: ROWS * CHUNK accumulators */

struct job_t {
    const float *q, *k, *v, *mask;
    float *out;
    int seq, heads, dim, mask_heads;
    float scale;
};

/* e^x for x <= 0 (scores minus their row maximum): 2^n * p(r), |r| <= ln2/2, degree-6 polynomial */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Scores of ROWS query rows against key vectors [c, c + G) (16 keys each), mask added, into p;
   mx keeps each row's running maximum. */
template <int G, int D>
static inline __attribute__((always_inline)) void score_block(const float *const *qr, const float *const *mr,
                                                              const float *kt, int lp, int c, int L,
                                                              float (*p)[MAX_SEQ], __m512 *mx) {
    __m512 s[ROWS][G];
    for (int g = 0; g < G; ++g) {
        const int n = 16 * (c + g);
        const __mmask16 keep = n + 16 <= L ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - n)) - 1);
        for (int r = 0; r < ROWS; ++r)
            s[r][g] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, mr[r] + n);
    }
    for (int d = 0; d < D; ++d) {
        __m512 kv[G];
        for (int g = 0; g < G; ++g) kv[g] = _mm512_load_ps(kt + d * lp + 16 * (c + g));
        for (int r = 0; r < ROWS; ++r) {
            const __m512 a = _mm512_set1_ps(qr[r][d]);
            for (int g = 0; g < G; ++g) s[r][g] = _mm512_fmadd_ps(a, kv[g], s[r][g]);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int g = 0; g < G; ++g) {
            _mm512_store_ps(p[r] + 16 * (c + g), s[r][g]);
            mx[r] = _mm512_max_ps(mx[r], s[r][g]);
        }
}

/* Output rows = softmax(scores) v for ROWS rows: U interleaved accumulator sets over keys keep
   enough independent FMA chains in flight when D is small. */
template <int D>
static inline __attribute__((always_inline)) void weigh_values(float (*p)[MAX_SEQ], const float *vb, int C, int L,
                                                               const float *inv, float *const *orow) {
    constexpr int V = D / 16, U = ROWS * V >= 8 ? 1 : 2;
    __m512 acc[U][ROWS][V];
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < ROWS; ++r)
            for (int x = 0; x < V; ++x) acc[u][r][x] = _mm512_setzero_ps();
    int n = 0;
    for (; n + U <= L; n += U)
        for (int u = 0; u < U; ++u) {
            __m512 vn[V];
            for (int x = 0; x < V; ++x) vn[x] = _mm512_loadu_ps(vb + (size_t)(n + u) * C + 16 * x);
            for (int r = 0; r < ROWS; ++r) {
                const __m512 w = _mm512_set1_ps(p[r][n + u]);
                for (int x = 0; x < V; ++x) acc[u][r][x] = _mm512_fmadd_ps(w, vn[x], acc[u][r][x]);
            }
        }
    for (; n < L; ++n) {
        __m512 vn[V];
        for (int x = 0; x < V; ++x) vn[x] = _mm512_loadu_ps(vb + (size_t)n * C + 16 * x);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 w = _mm512_set1_ps(p[r][n]);
            for (int x = 0; x < V; ++x) acc[0][r][x] = _mm512_fmadd_ps(w, vn[x], acc[0][r][x]);
        }
    }
    for (int r = 0; r < ROWS; ++r)
        for (int x = 0; x < V; ++x) {
            __m512 a = acc[0][r][x];
            for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][r][x]);
            _mm512_storeu_ps(orow[r] + 16 * x, _mm512_mul_ps(a, _mm512_set1_ps(inv[r])));
        }
}

template <int D>
static void head(const job_t *j, const float *qb, const float *kb, const float *vb, const float *mb, float *ob,
                 float *kt) {
    const int L = j->seq, C = j->heads * D, nv = (L + 15) / 16, lp = nv * 16;
    /* keys, transposed and scaled: kt[d][n] = k[n][d] * scale, zero past the last key */
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(C));
    const __m512 scale = _mm512_set1_ps(j->scale);
    for (int c = 0; c < nv; ++c) {
        const int n = 16 * c;
        const __mmask16 keep = n + 16 <= L ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - n)) - 1);
        for (int d = 0; d < D; ++d) {
            const __m512 col = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, stride, kb + (size_t)n * C + d, 4);
            _mm512_store_ps(kt + d * lp + n, _mm512_mul_ps(col, scale));
        }
    }
    float p[ROWS][MAX_SEQ] __attribute__((aligned(64)));
    for (int i = 0; i < L; i += ROWS) {
        const float *qr[ROWS], *mr[ROWS];
        float *orow[ROWS];
        for (int r = 0; r < ROWS; ++r) {     /* past the last row: repeat it (same result, same place) */
            const int row = i + r < L ? i + r : L - 1;
            qr[r] = qb + (size_t)row * C, mr[r] = mb + (size_t)row * L, orow[r] = ob + (size_t)row * C;
        }
        __m512 mx[ROWS];
        for (int r = 0; r < ROWS; ++r) mx[r] = _mm512_set1_ps(-INFINITY);
        int c = 0;
        for (; c + CHUNK <= nv; c += CHUNK) score_block<CHUNK, D>(qr, mr, kt, lp, c, L, p, mx);
        switch (nv - c) {
            case 1: score_block<1, D>(qr, mr, kt, lp, c, L, p, mx); break;
            case 2: score_block<2, D>(qr, mr, kt, lp, c, L, p, mx); break;
            case 3: score_block<3, D>(qr, mr, kt, lp, c, L, p, mx); break;
        }
        float inv[ROWS];
        for (int r = 0; r < ROWS; ++r) {
            const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
            __m512 sum = _mm512_setzero_ps();
            for (int x = 0; x < nv; ++x) {
                const __m512 e = exp512(_mm512_sub_ps(_mm512_load_ps(p[r] + 16 * x), top));
                sum = _mm512_add_ps(sum, e);
                _mm512_store_ps(p[r] + 16 * x, e);
            }
            inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
        }
        weigh_values<D>(p, vb, C, L, inv, orow);
    }
}

static void run(const job_t *j, long first, long last) {
    float kt[MAX_DIM * MAX_SEQ] __attribute__((aligned(64)));
    const int L = j->seq, D = j->dim, C = j->heads * D;
    for (long t = first; t < last; ++t) {
        const int b = (int)(t / j->heads), h = (int)(t % j->heads);
        const size_t base = (size_t)b * L * C + (size_t)h * D;
        const float *mb = j->mask + (size_t)(h % j->mask_heads) * L * L;
        const float *qb = j->q + base, *kb = j->k + base, *vb = j->v + base;
        float *ob = j->out + base;
        switch (D) {
            case 16: head<16>(j, qb, kb, vb, mb, ob, kt); break;
            case 32: head<32>(j, qb, kb, vb, mb, ob, kt); break;
            case 48: head<48>(j, qb, kb, vb, mb, ob, kt); break;
            case 64: head<64>(j, qb, kb, vb, mb, ob, kt); break;
        }
    }
}

#ifdef __AVX512BF16__
/* The bfloat16 variant: q, k, v and out are bfloat16 (the tensors a bf16 graph already holds, so no
   conversions surround the node), mask float32. Scores and values go through AVX512_BF16 dot
   products (two products per lane and instruction, twice float32's rate) into float32 accumulators;
   softmax stays float32, and only the probabilities are rounded to bfloat16 before weighing the
   values. Keys are packed as pairs of head dimensions, values as pairs of keys: the operand layouts
   vdpbf16ps multiplies pairwise. */
typedef uint32_t __attribute__((may_alias)) word_t;     /* two bf16 values, read from uint16_t buffers */

struct job_bf16_t {
    const uint16_t *q, *k, *v;
    const float *mask;
    uint16_t *out;
    int seq, heads, dim, mask_heads;
    float scale;
};

template <int G, int D>
static inline __attribute__((always_inline)) void score_block_bf16(const word_t *const *qr, const float *const *mr,
                                                                   const uint32_t *kt, int lp, int c, int L, float scale,
                                                                   float (*p)[MAX_SEQ], __m512 *mx) {
    __m512 s[ROWS][G];
    for (int r = 0; r < ROWS; ++r)
        for (int g = 0; g < G; ++g) s[r][g] = _mm512_setzero_ps();
    for (int d = 0; d < D / 2; ++d) {
        __m512bh kv[G];
        for (int g = 0; g < G; ++g) kv[g] = (__m512bh)_mm512_load_si512(kt + d * lp + 16 * (c + g));
        for (int r = 0; r < ROWS; ++r) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qr[r][d]);
            for (int g = 0; g < G; ++g) s[r][g] = _mm512_dpbf16_ps(s[r][g], a, kv[g]);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int g = 0; g < G; ++g) {
        const int n = 16 * (c + g);
        const __mmask16 keep = n + 16 <= L ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - n)) - 1);
        for (int r = 0; r < ROWS; ++r) {
            const __m512 bias = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep, mr[r] + n);
            const __m512 v = _mm512_fmadd_ps(s[r][g], sc, bias);
            _mm512_store_ps(p[r] + n, v);
            mx[r] = _mm512_max_ps(mx[r], v);
        }
    }
}

/* Output rows for R rows from bfloat16 probabilities pw (pairs of keys per 32-bit word) and the
   values packed as pairs of keys (vt: word (m, d) = v[2m][d], v[2m + 1][d]). */
template <int R, int D>
static inline __attribute__((always_inline)) void weigh_values_bf16(const uint32_t (*pw)[MAX_SEQ / 2],
                                                                    const uint32_t *vt, int pairs, const float *inv,
                                                                    uint16_t *const *orow) {
    constexpr int V = D / 16, U = R * V >= 8 ? 1 : 2;
    __m512 acc[U][R][V];
    for (int u = 0; u < U; ++u)
        for (int r = 0; r < R; ++r)
            for (int x = 0; x < V; ++x) acc[u][r][x] = _mm512_setzero_ps();
    int m = 0;
    for (; m + U <= pairs; m += U)
        for (int u = 0; u < U; ++u) {
            __m512bh vn[V];
            for (int x = 0; x < V; ++x) vn[x] = (__m512bh)_mm512_load_si512(vt + (size_t)(m + u) * D + 16 * x);
            for (int r = 0; r < R; ++r) {
                const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[r][m + u]);
                for (int x = 0; x < V; ++x) acc[u][r][x] = _mm512_dpbf16_ps(acc[u][r][x], w, vn[x]);
            }
        }
    for (; m < pairs; ++m) {
        __m512bh vn[V];
        for (int x = 0; x < V; ++x) vn[x] = (__m512bh)_mm512_load_si512(vt + (size_t)m * D + 16 * x);
        for (int r = 0; r < R; ++r) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[r][m]);
            for (int x = 0; x < V; ++x) acc[0][r][x] = _mm512_dpbf16_ps(acc[0][r][x], w, vn[x]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int x = 0; x < V; ++x) {
            __m512 a = acc[0][r][x];
            for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[u][r][x]);
            const __m256bh o = _mm512_cvtneps_pbh(_mm512_mul_ps(a, _mm512_set1_ps(inv[r])));
            _mm256_storeu_si256((__m256i *)(orow[r] + 16 * x), (__m256i)o);
        }
}

/* Keys as pairs of head dimensions (kt: word (d, n) = k[n][2d], k[n][2d + 1], zero past the last
   key) and values as pairs of keys (zero past the last key), for one (batch, head). */
template <int D>
static inline void pack_bf16(const uint16_t *kb, const uint16_t *vb, int L, int C, int lp, uint32_t *kt, uint32_t *vt) {
    const __m512i stride = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(C / 2));
    for (int n = 0; n < lp; n += 16) {
        const __mmask16 keep = n + 16 <= L ? (__mmask16)0xFFFF : n < L ? (__mmask16)((1u << (L - n)) - 1) : 0;
        for (int d = 0; d < D / 2; ++d)
            _mm512_store_si512(kt + d * lp + n, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), keep, stride,
                                                                            (const word_t *)(kb + (size_t)n * C) + d, 4));
    }
    /* word i of a pair holds (first key, second key) of dimension i: even lanes from the first 16, odd from the next */
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int m = 0; 2 * m < L; ++m)
        for (int x = 0; x < D / 16; ++x) {
            const __m256i first = _mm256_loadu_si256((const __m256i *)(vb + (size_t)(2 * m) * C + 16 * x));
            const __m256i second = 2 * m + 1 < L ? _mm256_loadu_si256((const __m256i *)(vb + (size_t)(2 * m + 1) * C + 16 * x))
                                                 : _mm256_setzero_si256();
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
            _mm512_store_si512(vt + (size_t)m * D + 16 * x, _mm512_permutexvar_epi16(interleave, both));
        }
}

/* e^x for x <= 0 to bfloat16's precision (the probabilities are rounded to it): a degree-4 polynomial,
   relative error below 1e-4, against the float32 variant's degree 6 */
static inline __m512 exp512_bf16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
    __m512 p = _mm512_set1_ps(1.0f / 24);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Scores of ROWS rows against every key vector, in blocks of CHUNK vectors. */
template <int D>
static inline __attribute__((always_inline)) void scores_bf16(const word_t *const *qr, const float *const *mr,
                                                              const uint32_t *kt, int lp, int nv, int L, float scale,
                                                              float (*p)[MAX_SEQ], __m512 *mx) {
    int c = 0;
    for (; c + CHUNK <= nv; c += CHUNK) score_block_bf16<CHUNK, D>(qr, mr, kt, lp, c, L, scale, p, mx);
    switch (nv - c) {
        case 1: score_block_bf16<1, D>(qr, mr, kt, lp, c, L, scale, p, mx); break;
        case 2: score_block_bf16<2, D>(qr, mr, kt, lp, c, L, scale, p, mx); break;
        case 3: score_block_bf16<3, D>(qr, mr, kt, lp, c, L, scale, p, mx); break;
    }
}

/* R query rows from row i: scores (ROWS at a time), softmax in float32, probabilities to bfloat16 key
   pairs, then the values weighed for all R rows together (more rows share each loaded value pair). */
template <int R, int D>
static inline void rows_bf16(const job_bf16_t *j, int i, const uint16_t *qb, const float *mb, uint16_t *ob,
                             const uint32_t *kt, const uint32_t *vt) {
    const int L = j->seq, C = j->heads * D, nv = (L + 15) / 16, lp = nv * 16;
    float p[R][MAX_SEQ] __attribute__((aligned(64)));
    uint32_t pw[R][MAX_SEQ / 2] __attribute__((aligned(64)));
    const word_t *qr[R];
    const float *mr[R];
    uint16_t *orow[R];
    for (int r = 0; r < R; ++r) {     /* past the last row: repeat it (same result, same place) */
        const int row = i + r < L ? i + r : L - 1;
        qr[r] = (const word_t *)(qb + (size_t)row * C), mr[r] = mb + (size_t)row * L, orow[r] = ob + (size_t)row * C;
    }
    __m512 mx[R];
    for (int r = 0; r < R; ++r) mx[r] = _mm512_set1_ps(-INFINITY);
    for (int r = 0; r < R; r += ROWS) scores_bf16<D>(qr + r, mr + r, kt, lp, nv, L, j->scale, p + r, mx + r);
    float inv[R];
    for (int r = 0; r < R; ++r) {
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
        __m512 sum = _mm512_setzero_ps(), previous = _mm512_setzero_ps();
        for (int x = 0; x < nv; ++x) {
            const __m512 e = exp512_bf16(_mm512_sub_ps(_mm512_load_ps(p[r] + 16 * x), top));
            sum = _mm512_add_ps(sum, e);
            if (x % 2)      /* two blocks of 16 probabilities make 16 words of key pairs */
                _mm512_store_si512(pw[r] + 16 * (x / 2), (__m512i)_mm512_cvtne2ps_pbh(e, previous));
            previous = e;
        }
        if (nv % 2)
            _mm512_store_si512(pw[r] + 16 * (nv / 2), (__m512i)_mm512_cvtne2ps_pbh(_mm512_setzero_ps(), previous));
        inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
    }
    weigh_values_bf16<R, D>(pw, vt, (L + 1) / 2, inv, orow);
}

template <int D>
static void head_bf16(const job_bf16_t *j, const uint16_t *qb, const uint16_t *kb, const uint16_t *vb, const float *mb,
                      uint16_t *ob, uint32_t *kt, uint32_t *vt) {
    /* eight rows per block where their value accumulators fit the 32 vector registers, four at the end */
    constexpr int R = D <= 32 ? 2 * ROWS : ROWS;
    const int L = j->seq, lp = (L + 15) / 16 * 16;
    pack_bf16<D>(kb, vb, L, j->heads * D, lp, kt, vt);
    int i = 0;
    for (; L - i > ROWS; i += R) rows_bf16<R, D>(j, i, qb, mb, ob, kt, vt);
    if (i < L) rows_bf16<ROWS, D>(j, i, qb, mb, ob, kt, vt);
}

static void run_bf16(const job_bf16_t *j, long first, long last) {
    uint32_t kt[MAX_DIM / 2 * MAX_SEQ] __attribute__((aligned(64)));
    uint32_t vt[MAX_SEQ / 2 * MAX_DIM] __attribute__((aligned(64)));
    const int L = j->seq, D = j->dim, C = j->heads * D;
    for (long t = first; t < last; ++t) {
        const int b = (int)(t / j->heads), h = (int)(t % j->heads);
        const size_t base = (size_t)b * L * C + (size_t)h * D;
        const float *mb = j->mask + (size_t)(h % j->mask_heads) * L * L;
        switch (D) {
            case 16: head_bf16<16>(j, j->q + base, j->k + base, j->v + base, mb, j->out + base, kt, vt); break;
            case 32: head_bf16<32>(j, j->q + base, j->k + base, j->v + base, mb, j->out + base, kt, vt); break;
            case 48: head_bf16<48>(j, j->q + base, j->k + base, j->v + base, mb, j->out + base, kt, vt); break;
            case 64: head_bf16<64>(j, j->q + base, j->k + base, j->v + base, mb, j->out + base, kt, vt); break;
        }
    }
}
#endif

/* The kernel's limits, the one place they are stated (the Python side asks through this). */
extern "C" int rmt_attention_fits(int seq, int dim) {
    return seq >= 1 && seq <= MAX_SEQ && dim >= 16 && dim % 16 == 0 && dim <= MAX_DIM;
}

extern "C" int rmt_attention(const float *q, const float *k, const float *v, const float *mask, float *out,
                             int batch, int seq, int heads, int dim, int mask_heads, float scale) {
    if (!rmt_attention_fits(seq, dim) || mask_heads < 1 || heads % mask_heads) return -1;
    const job_t job{q, k, v, mask, out, seq, heads, dim, mask_heads, scale};
    /* grain 1: the partitioner sizes chunks to the pool (a stage-3 call at batch 1 has only 8 pairs) */
    tbb::parallel_for(tbb::blocked_range<long>(0, (long)batch * heads, 1),
                      [&](const tbb::blocked_range<long> &r) { run(&job, r.begin(), r.end()); });
    return 0;
}

/* Whether this build has the bfloat16 variant (the CPU it was built for has AVX512_BF16). */
extern "C" int rmt_attention_has_bf16(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

/* The bfloat16 variant (q, k, v, out as raw bfloat16 bits); -1 where the build has none or the shape does not fit. */
extern "C" int rmt_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *mask, uint16_t *out,
                                  int batch, int seq, int heads, int dim, int mask_heads, float scale) {
#ifdef __AVX512BF16__
    if (!rmt_attention_fits(seq, dim) || mask_heads < 1 || heads % mask_heads) return -1;
    const job_bf16_t job{q, k, v, mask, out, seq, heads, dim, mask_heads, scale};
    tbb::parallel_for(tbb::blocked_range<long>(0, (long)batch * heads, 1),
                      [&](const tbb::blocked_range<long> &r) { run_bf16(&job, r.begin(), r.end()); });
    return 0;
#else
    (void)q, (void)k, (void)v, (void)mask, (void)out, (void)batch, (void)seq, (void)heads, (void)dim, (void)mask_heads, (void)scale;
    return -1;
#endif
}

/* The kernel as an OpenVINO operation: evaluated in C++ inside the CPU plugin's own graph, with no
   Python (and no interpreter lock) between the nodes either side of it. Inputs q, k, v
   (batch, seq, heads * dim), all f32 or all bf16 (the output is of their type), and the f32
   (mask_heads, seq, seq) mask; attributes heads and scale. */

class SmallHeadAttention : public ov::op::Op {
public:
    OPENVINO_OP("SmallHeadAttention", "rmt_deploy");

    SmallHeadAttention() = default;
    SmallHeadAttention(const ov::OutputVector &args, int64_t heads, float scale) : Op(args), heads_(heads), scale_(scale) {
        constructor_validate_and_infer_types();
    }

    void validate_and_infer_types() override {
        NODE_VALIDATION_CHECK(this, get_input_size() == 4, "takes q, k, v and mask, got ", get_input_size(), " inputs");
        NODE_VALIDATION_CHECK(this, heads_ > 0, "heads must be positive, got ", heads_);
        const ov::element::Type type = get_input_element_type(0);
        NODE_VALIDATION_CHECK(this, type == ov::element::f32 || (type == ov::element::bf16 && rmt_attention_has_bf16()),
                              "q is ", type, ": the kernel takes f32", rmt_attention_has_bf16() ? " or bf16" : "");
        for (size_t i = 1; i < 3; ++i)
            NODE_VALIDATION_CHECK(this, get_input_element_type(i) == type, "input ", i, " is not ", type, " like q");
        NODE_VALIDATION_CHECK(this, get_input_element_type(3) == ov::element::f32, "the mask is not f32");
        const ov::PartialShape &q = get_input_partial_shape(0), &mask = get_input_partial_shape(3);
        if (q.is_static() && mask.is_static()) {
            const ov::Shape qs = q.to_shape(), ms = mask.to_shape();
            NODE_VALIDATION_CHECK(this, qs.size() == 3 && get_input_partial_shape(1) == q && get_input_partial_shape(2) == q,
                                  "q, k and v must share one (batch, seq, heads * dim) shape");
            NODE_VALIDATION_CHECK(this, ms.size() == 3 && ms[1] == qs[1] && ms[2] == qs[1] && ms[0] > 0 && heads_ % ms[0] == 0,
                                  "mask must be (m, seq, seq) with m dividing heads");
            NODE_VALIDATION_CHECK(this, qs[2] % heads_ == 0 && rmt_attention_fits((int)qs[1], (int)(qs[2] / heads_)),
                                  "seq ", qs[1], ", head dim ", qs[2] / heads_, " are outside the kernel's limits");
        }
        set_output_type(0, get_input_element_type(0), q);
    }

    std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector &args) const override {
        check_new_args_count(this, args);
        return std::make_shared<SmallHeadAttention>(args, heads_, scale_);
    }

    bool visit_attributes(ov::AttributeVisitor &visitor) override {
        visitor.on_attribute("heads", heads_);
        visitor.on_attribute("scale", scale_);
        return true;
    }

    bool has_evaluate() const override { return true; }

    bool evaluate(ov::TensorVector &outputs, const ov::TensorVector &inputs) const override {
        const ov::Shape shape = inputs[0].get_shape(), mask = inputs[3].get_shape();
        OPENVINO_ASSERT(shape.size() == 3 && mask.size() == 3 && shape[2] % heads_ == 0 && inputs[1].get_shape() == shape
                            && inputs[2].get_shape() == shape && mask[1] == shape[1] && mask[2] == shape[1],
                        "SmallHeadAttention: q ", shape, ", k ", inputs[1].get_shape(), ", v ", inputs[2].get_shape(),
                        ", mask ", mask, " do not fit together");
        const ov::element::Type type = inputs[0].get_element_type();
        OPENVINO_ASSERT(inputs[1].get_element_type() == type && inputs[2].get_element_type() == type
                            && outputs[0].get_element_type() == type && inputs[3].get_element_type() == ov::element::f32,
                        "SmallHeadAttention: q, k, v and the output must share one type (f32 or bf16), the mask f32");
        outputs[0].set_shape(shape);
        const int batch = (int)shape[0], seq = (int)shape[1], heads = (int)heads_, dim = (int)(shape[2] / heads_);
        if (type == ov::element::bf16)
            return rmt_attention_bf16(bits(inputs[0]), bits(inputs[1]), bits(inputs[2]), inputs[3].data<const float>(),
                                      (uint16_t *)outputs[0].data(), batch, seq, heads, dim, (int)mask[0], scale_) == 0;
        return rmt_attention(inputs[0].data<const float>(), inputs[1].data<const float>(), inputs[2].data<const float>(),
                             inputs[3].data<const float>(), outputs[0].data<float>(), batch, seq, heads, dim,
                             (int)mask[0], scale_) == 0;
    }

private:
    static const uint16_t *bits(const ov::Tensor &tensor) { return (const uint16_t *)tensor.data(); }

    int64_t heads_ = 1;
    float scale_ = 1.0f;
};

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({std::make_shared<ov::OpExtension<SmallHeadAttention>>()}));
