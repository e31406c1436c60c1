/* Attention with many small heads for the OpenVINO runner (see rmt_deploy/runners/small_attention.py).

   q, k, v and out are (batch, seq, heads * dim) float32, the layout of the exported 3-D ONNX
   Attention nodes, so no transposes surround the call; mask is an additive (mask_heads, seq, seq)
   bias, head h taking mask h % mask_heads (mask_heads divides heads). One task per (batch, head): its keys are transposed into a scratch
   block so scores vectorise over keys, its values gathered contiguous so outputs vectorise over the
   head dimension; two query rows go together for independent FMA chains. Tasks run on oneTBB, the
   thread pool OpenVINO itself runs on: called from inside an inference its idle workers take them
   (a second pool would fight them for the cores). Built with -march=native (AVX-512F) against the
   oneTBB that ships with OpenVINO; the caller falls back to OpenVINO's own kernel where it does not
   build. */
#include <immintrin.h>
#include <tbb/parallel_for.h>

#include <cmath>
#include <cstddef>

#define MAX_SEQ 256
#define MAX_DIM 64

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

/* Rows i and i + 1 together: twice the independent FMA chains of one row (latency-bound otherwise). */
static inline __attribute__((always_inline)) void head_rows(const job_t *j, const float *qb, const float *kt,
                                                            const float *vv, const float *mb, float *ob,
                                                            const int nv) {
    const int L = j->seq, D = j->dim, C = j->heads * j->dim;
    const __mmask16 tail = (L % 16) ? (__mmask16)((1u << (L % 16)) - 1) : (__mmask16)0xFFFF;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), scale = _mm512_set1_ps(j->scale);
    float p[2][MAX_SEQ] __attribute__((aligned(64)));
    for (int i = 0; i < L; i += 2) {
        const int rows = i + 1 < L ? 2 : 1;
        const float *q0 = qb + (size_t)i * C, *q1 = qb + (size_t)(i + rows - 1) * C;
        const float *m0 = mb + (size_t)i * L, *m1 = mb + (size_t)(i + rows - 1) * L;
        __m512 s0[16], s1[16];
        for (int v = 0; v < nv; ++v) {
            s0[v] = v < nv - 1 ? _mm512_loadu_ps(m0 + 16 * v) : _mm512_mask_loadu_ps(neg_inf, tail, m0 + 16 * v);
            s1[v] = v < nv - 1 ? _mm512_loadu_ps(m1 + 16 * v) : _mm512_mask_loadu_ps(neg_inf, tail, m1 + 16 * v);
        }
        for (int d = 0; d < D; ++d) {
            const __m512 a = _mm512_mul_ps(_mm512_set1_ps(q0[d]), scale), b = _mm512_mul_ps(_mm512_set1_ps(q1[d]), scale);
            const float *kd = kt + d * nv * 16;
            for (int v = 0; v < nv; ++v) {
                const __m512 kv = _mm512_load_ps(kd + 16 * v);
                s0[v] = _mm512_fmadd_ps(a, kv, s0[v]);
                s1[v] = _mm512_fmadd_ps(b, kv, s1[v]);
            }
        }
        __m512 x0 = s0[0], x1 = s1[0];
        for (int v = 1; v < nv; ++v) { x0 = _mm512_max_ps(x0, s0[v]); x1 = _mm512_max_ps(x1, s1[v]); }
        const __m512 mx0 = _mm512_set1_ps(_mm512_reduce_max_ps(x0)), mx1 = _mm512_set1_ps(_mm512_reduce_max_ps(x1));
        __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
        for (int v = 0; v < nv; ++v) {
            const __m512 e0 = exp512(_mm512_sub_ps(s0[v], mx0)), e1 = exp512(_mm512_sub_ps(s1[v], mx1));
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
            _mm512_store_ps(p[0] + 16 * v, e0);
            _mm512_store_ps(p[1] + 16 * v, e1);
        }
        const __m512 inv0 = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum0));
        const __m512 inv1 = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum1));
        for (int dv = 0; dv < D; dv += 16) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
            int n = 0;
            for (; n + 2 <= L; n += 2) {
                const __m512 v0 = _mm512_load_ps(vv + (size_t)n * D + dv), v1 = _mm512_load_ps(vv + (size_t)(n + 1) * D + dv);
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[0][n]), v0, a0);
                b0 = _mm512_fmadd_ps(_mm512_set1_ps(p[1][n]), v0, b0);
                a1 = _mm512_fmadd_ps(_mm512_set1_ps(p[0][n + 1]), v1, a1);
                b1 = _mm512_fmadd_ps(_mm512_set1_ps(p[1][n + 1]), v1, b1);
            }
            if (n < L) {
                const __m512 v0 = _mm512_load_ps(vv + (size_t)n * D + dv);
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(p[0][n]), v0, a0);
                b0 = _mm512_fmadd_ps(_mm512_set1_ps(p[1][n]), v0, b0);
            }
            _mm512_storeu_ps(ob + (size_t)i * C + dv, _mm512_mul_ps(_mm512_add_ps(a0, a1), inv0));
            if (rows == 2) _mm512_storeu_ps(ob + (size_t)(i + 1) * C + dv, _mm512_mul_ps(_mm512_add_ps(b0, b1), inv1));
        }
    }
}

#define CASE(N) case N: head_rows(j, qb, kt, vv, mb, ob, N); break;

static void run(const job_t *j, long first, long last) {
    const int L = j->seq, D = j->dim, C = j->heads * j->dim, nv = (L + 15) / 16;
    float kt[MAX_DIM * MAX_SEQ] __attribute__((aligned(64)));
    float vv[MAX_SEQ * MAX_DIM] __attribute__((aligned(64)));
    for (long t = first; t < last; ++t) {
        const int b = (int)(t / j->heads), h = (int)(t % j->heads);
        const size_t base = (size_t)b * L * C + (size_t)h * D;
        const float *kb = j->k + base, *vb = j->v + base;
        for (int d = 0; d < D; ++d)
            for (int n = L; n < nv * 16; ++n) kt[d * nv * 16 + n] = 0.f;
        for (int n = 0; n < L; ++n) {
            for (int d = 0; d < D; ++d) kt[d * nv * 16 + n] = kb[(size_t)n * C + d];
            for (int d = 0; d < D; d += 16) _mm512_store_ps(vv + n * D + d, _mm512_loadu_ps(vb + (size_t)n * C + d));
        }
        const float *qb = j->q + base, *mb = j->mask + (size_t)(h % j->mask_heads) * L * L;
        float *ob = j->out + base;
        switch (nv) { CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
                      CASE(9) CASE(10) CASE(11) CASE(12) CASE(13) CASE(14) CASE(15) CASE(16) }
    }
}

extern "C" int rmt_attention(const float *q, const float *k, const float *v, const float *mask, float *out,
                             int batch, int seq, int heads, int dim, int mask_heads, float scale) {
    if (seq < 1 || seq > MAX_SEQ || dim % 16 || dim > MAX_DIM || mask_heads < 1 || heads % mask_heads) return -1;
    const job_t job{q, k, v, mask, out, seq, heads, dim, mask_heads, scale};
    tbb::parallel_for(tbb::blocked_range<long>(0, (long)batch * heads, 16),
                      [&](const tbb::blocked_range<long> &r) { run(&job, r.begin(), r.end()); });
    return 0;
}
