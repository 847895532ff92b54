/* One CPU decode step of a Llama-style decoder, all layers, in one OpenMP parallel region, and
 * the same products for prefills (meganeura/backends/cpu_fused.py builds and calls them;
 * docs/design.md, "The fused CPU decode step"). A layered step is ~1,500 torch calls, each
 * paying Python, dispatch and an OpenMP region's start; here the threads meet at 5 barriers a
 * layer, and each weight is read once for all the step's rows.
 *
 * Weights: 4-bit and 8-bit codes per group of 32 (GGUF's Q4_x, Q8_0), or 16-bit floats
 * (bfloat16, float16). Arithmetic follows the layered path (backends/torch_backend.py with
 * cpu_weights.py's forms): activations, norms, RoPE, attention and the KV cache in float32.
 * Integer forms: each product's input rounded to bfloat16 and its group scales and zeros too, as
 * torch's int4 kernel takes them, 4-bit products' outputs rounded to bfloat16; the inputs held
 * as 16-bit integers per group of 32 (product_input) so that each group's sum is exact.
 * 16-bit float weights: float32 inputs, each weight widened exactly, sums in float32. What
 * differs from the layered path: summation orders (and, for bfloat16 weights, inputs not rounded
 * to bfloat16 as oneDNN's products round them). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define GROUP 32
#define CHUNKS 8   /* a row's attention is split into this many chunks of its pages (any thread count) */

typedef struct {
    /* 4 bits: [n, k/2], GGUF's order (byte j of a group: values j, j + 16); 8 bits: int8 [n, k];
     * 16 bits: bfloat16 or (f16 set) float16 [n, k] */
    const uint8_t *q;
    /* integer forms: bf16, [n / 64, k/32, 64] (n padded to 64): 8 bits w = q * scale; 4 bits
     * w = (q - 8) * scale + zero */
    const uint16_t *scale, *zero;
    int64_t n, k, bits, f16;
} mg_matrix;

typedef struct {
    mg_matrix qkv, o, gate_up, down;
    const float *attn_norm, *mlp_norm;
    float *k_cache, *v_cache;   /* this layer's keys and values of page 0, row 0 */
} mg_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter;
    int64_t page_size, page_stride;   /* tokens a page; floats from one page's row to the next page's */
    float eps;
    const mg_layer *layer;
    mg_matrix head;
    const float *final_norm;
} mg_model;

static inline float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float from_f16(uint16_t h) {   /* exact: every float16 is a float32 */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 0x3ffu;
    float f;
    if (e == 31) {   /* infinity, NaN */
        uint32_t u = sign | 0x7f800000u | (m << 13);
        memcpy(&f, &u, 4);
        return f;
    }
    f = e ? ldexpf((float)(m | 0x400u), (int)e - 25) : ldexpf((float)m, -24);
    return sign ? -f : f;
}

static inline float bf16_round(float f) {   /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return f;   /* NaN */
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    memcpy(&f, &u, 4);
    return f;
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* e^x, 8 at a time (Cephes' expf: a degree-5 polynomial on x - n ln 2; ~1 ulp, as expf). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

/* x[i] = e^(x[i] - shift); returns their sum. */
static float exp_shifted(float *x, int64_t n, float shift) {
    int64_t i = 0;
    float sum = 0.0f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_set1_ps(shift)));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum(acc);
#endif
    for (; i < n; i++) sum += (x[i] = expf(x[i] - shift));
    return sum;
}

/* out[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u. */
static void swiglu(const float *g, const float *u, int64_t n, float *out) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#ifdef __AVX2__
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    s = hsum(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out += p * v */
static inline void axpy(float p, const float *v, float *out, int64_t n) {
    int64_t i = 0;
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(_mm256_set1_ps(p), _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
#endif
    for (; i < n; i++) out[i] += p * v[i];
}

/* A product's input row: x rounded to bf16 (as torch's int4 kernel takes it), then held as
 * 16-bit integers per group of 32, x = xq * xscale with xscale a power of two: exact for every
 * value within 2^7 of its group's largest, the others off by at most 2^-16 of that largest
 * (bf16's own rounding: up to 2^-9 of each value). xsum: each group's sum (the zeros' term). */
static void product_input(const float *x, int64_t k, int16_t *xq, float *xscale, float *xsum) {
    for (int64_t g = 0; g < k / GROUP; g++, x += GROUP, xq += GROUP) {
        float top = 0.0f, s = 0.0f;
#ifdef __AVX2__
        __m256 v[4], sum = _mm256_setzero_ps(), big = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int j = 0; j < 4; j++) {   /* bf16_round, 8 at a time */
            __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + 8 * j));
            __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
            u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
            v[j] = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
            sum = _mm256_add_ps(sum, v[j]);
            big = _mm256_max_ps(big, _mm256_andnot_ps(sign, v[j]));
        }
        s = hsum(sum);
        top = hmax(big);
#else
        float b[GROUP];
        for (int i = 0; i < GROUP; i++) {
            b[i] = bf16_round(x[i]);
            s += b[i];
            top = fabsf(b[i]) > top ? fabsf(b[i]) : top;
        }
#endif
        int e = 0;
        frexpf(top, &e);   /* top < 2^e, so |b| / 2^(e - 15) < 2^15 */
        float inv = top > 0.0f ? ldexpf(1.0f, 15 - e) : 0.0f;
        xscale[g] = top > 0.0f ? ldexpf(1.0f, e - 15) : 0.0f;
        xsum[g] = s;
#ifdef __AVX2__
        const __m256 by = _mm256_set1_ps(inv);
        for (int j = 0; j < 4; j += 2) {   /* rounded to nearest even, as lrintf */
            __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], by));
            __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(v[j + 1], by));
            _mm256_storeu_si256((__m256i *)(xq + 8 * j), _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xd8));
        }
#else
        for (int i = 0; i < GROUP; i++) xq[i] = (int16_t)lrintf(b[i] * inv);
#endif
    }
}

#if defined(__AVX512BW__)
/* A group's 32 weights as int16 in one vector: 4 bits (byte j holds values j and j + 16), or 8. */
static inline __m512i widen(const uint8_t *q, int bits) {
    if (bits == 4) {   /* the 16 bytes twice, the second copy's high nibbles */
        __m512i v = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q)));
        const __m512i by = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0x0004000400040004,
                                            0x0004000400040004, 0, 0, 0, 0);
        return _mm512_and_si512(_mm512_srlv_epi16(v, by), _mm512_set1_epi16(15));
    }
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)q));
}
#elif defined(__AVX2__)
/* One group's integer sums (8 lanes), as floats: lo and hi are the group's 32 weights as int16. */
static inline __m256 group_sum(__m256i lo, __m256i hi, const int16_t *x) {
    return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),
                                               _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 16)))));
}

/* The group's 32 weights as int16: 4 bits (byte j holds values j and j + 16), or 8. */
static inline void widen(const uint8_t *q, int bits, __m256i *lo, __m256i *hi) {
    if (bits == 4) {
        __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)q));
        *lo = _mm256_and_si256(v, _mm256_set1_epi16(15));
        *hi = _mm256_srli_epi16(v, 4);
    } else {
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)q));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + 16)));
    }
}
#endif

/* Dot products of one weight row (codes q, `bits` 4 or 8; its group scales at scale[g * 64])
 * with R input rows (R <= 4; row r's integers at xq + r * ldx, its group scales at xscale + r *
 * groups): sum_g scale[g] * xscale[g] * sum_{i in g} q_i xq_i, each group's sum exact in
 * integers. The codes are widened once for the R rows; each row's operations are the same
 * whatever R is, so a row's result does not depend on the batch. */
static inline __attribute__((always_inline)) void dot(const uint8_t *q, int bits, const uint16_t *scale,
                                                      const int16_t *xq, const float *xscale, int64_t ldx,
                                                      int64_t groups, int R, float *out) {
    const int64_t step = bits * GROUP / 8;   /* bytes a group */
#if defined(__AVX512BW__)
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        if ((g & 1) == 0)   /* the codes 4 KiB ahead: ~10% faster than the hardware's prefetch alone */
            _mm_prefetch((const char *)(q + g * step + 4096), _MM_HINT_T0);
        const __m512i w = widen(q + g * step, bits);
        const float s = from_bf16(scale[g * 64]);
        for (int r = 0; r < R; r++)   /* each lane: two products, < 2^23: exact as a float */
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(w, _mm512_loadu_si512(xq + r * ldx + g * GROUP))),
                                     _mm512_set1_ps(s * xscale[r * groups + g]), acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__)
    __m256 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m256i lo, hi;
        if ((g & 1) == 0)
            _mm_prefetch((const char *)(q + g * step + 4096), _MM_HINT_T0);
        widen(q + g * step, bits, &lo, &hi);
        const float s = from_bf16(scale[g * 64]);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(group_sum(lo, hi, xq + r * ldx + g * GROUP),
                                     _mm256_set1_ps(s * xscale[r * groups + g]), acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        float acc = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *c = q + g * step;
            const int16_t *x = xq + r * ldx + g * GROUP;
            int32_t p = 0;
            for (int i = 0; i < 16; i++)
                p += bits == 4 ? (c[i] & 15) * x[i] + (c[i] >> 4) * x[i + 16]
                               : (int8_t)c[i] * x[i] + (int8_t)c[i + 16] * x[i + 16];
            acc += (float)p * (from_bf16(scale[g * 64]) * xscale[r * groups + g]);
        }
        out[r] = acc;
    }
#endif
}

/* One vector of floats or int32 lanes at the widest width the compiler targets (LANES). */
#if defined(__AVX512BW__)
#define LANES 16
typedef __m512i ivec;
typedef __m512 fvec;
#define IZERO _mm512_setzero_si512
#define FZERO _mm512_setzero_ps
#define ILOAD(p) _mm512_loadu_si512(p)
#define FLOAD _mm512_loadu_ps
#define FSTORE _mm512_storeu_ps
#define ISET1 _mm512_set1_epi32
#define FSET1 _mm512_set1_ps
#define FMUL _mm512_mul_ps
#define FMADD _mm512_fmadd_ps
#define FSUM _mm512_reduce_add_ps
#define TOFLOAT _mm512_cvtepi32_ps
#ifdef __AVX512VNNI__
#define DPWSSD(s, a, b) _mm512_dpwssd_epi32(s, a, b)
#else
#define DPWSSD(s, a, b) _mm512_add_epi32(s, _mm512_madd_epi16(a, b))
#endif
/* 16 weights of a 16-bit row as floats (exact): bfloat16's bits shifted up, or float16 widened. */
static inline fvec widen16(const uint16_t *w, int f16) {
    __m256i v = _mm256_loadu_si256((const __m256i *)w);
    return f16 ? _mm512_cvtph_ps(v) : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#elif defined(__AVX2__)
#define LANES 8
typedef __m256i ivec;
typedef __m256 fvec;
#define IZERO _mm256_setzero_si256
#define FZERO _mm256_setzero_ps
#define ILOAD(p) _mm256_loadu_si256((const __m256i *)(p))
#define FLOAD _mm256_loadu_ps
#define FSTORE _mm256_storeu_ps
#define ISET1 _mm256_set1_epi32
#define FSET1 _mm256_set1_ps
#define FMUL _mm256_mul_ps
#define FMADD _mm256_fmadd_ps
#define FSUM hsum
#define TOFLOAT _mm256_cvtepi32_ps
#ifdef __AVXVNNI__
#define DPWSSD(s, a, b) _mm256_dpwssd_avx_epi32(s, a, b)
#else
#define DPWSSD(s, a, b) _mm256_add_epi32(s, _mm256_madd_epi16(a, b))
#endif
/* 8 weights of a 16-bit row as floats (exact). */
static inline fvec widen16(const uint16_t *w, int f16) {
    __m128i v = _mm_loadu_si128((const __m128i *)w);
    if (!f16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
#ifdef __F16C__
    return _mm256_cvtph_ps(v);
#else
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = from_f16(w[i]);
    return _mm256_loadu_ps(f);
#endif
}
#endif

/* Dot products of one 16-bit float weight row w [k] (bfloat16, or float16 with f16 set) with R
 * float32 input rows (row r at x + r * ldx): each weight widened exactly, sums in float32. */
static inline __attribute__((always_inline)) void dot16(const uint16_t *w, int f16, const float *x, int64_t ldx,
                                                        int64_t k, int R, float *out) {
    int64_t i = 0;
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#ifdef LANES
    fvec acc[4];
    for (int r = 0; r < R; r++) acc[r] = FZERO();
    for (; i + LANES <= k; i += LANES) {
        if ((i & 31) == 0) _mm_prefetch((const char *)(w + i + 2048), _MM_HINT_T0);
        const fvec wv = widen16(w + i, f16);
        for (int r = 0; r < R; r++) acc[r] = FMADD(FLOAD(x + r * ldx + i), wv, acc[r]);
    }
    for (int r = 0; r < R; r++) sum[r] = FSUM(acc[r]);
#endif
    for (int r = 0; r < R; r++) {
        for (int64_t j = i; j < k; j++) sum[r] += (f16 ? from_f16(w[j]) : from_bf16(w[j])) * x[r * ldx + j];
        out[r] = sum[r];
    }
}

/* A product's inputs for `rows` rows of k values, in the weight form's kind (prepare). */
typedef struct {
    void *q;   /* int16 per group (integer forms), or the float32 values (16-bit forms) */
    float *scale, *sum;
    int64_t rows, k;
} mg_input;

/* Row r of a product's inputs for weights w: the integer forms' groups (product_input), or x. */
static void prepare(mg_input *in, const mg_matrix *w, int64_t r, const float *x) {
    const int64_t k = in->k, groups = k / GROUP;
    if (w->bits == 16) {
        memcpy((float *)in->q + r * k, x, k * sizeof(float));
    } else {
        product_input(x, k, (int16_t *)in->q + r * k, in->scale + r * groups, in->sum + r * groups);
    }
}

/* One weight row with R input rows (from row r0 of in), R and the form constants after
 * inlining (registers, not memory). */
static inline __attribute__((always_inline)) void dot_rows(const mg_matrix *w, int64_t row, const mg_input *in,
                                                           int64_t r0, int R, float *y) {
    const int64_t k = w->k, groups = k / GROUP;
    if (w->bits == 16) {
        const uint16_t *wr = (const uint16_t *)w->q + row * k;
        if (w->f16) dot16(wr, 1, (const float *)in->q + r0 * k, k, k, R, y);
        else dot16(wr, 0, (const float *)in->q + r0 * k, k, k, R, y);
        return;
    }
    const uint16_t *scale = w->scale + (row - row % 64) * groups + row % 64;
    const int16_t *xq = (const int16_t *)in->q + r0 * k;
    const float *xs = in->scale + r0 * groups;
    if (w->bits == 4) dot(w->q + row * k / 2, 4, scale, xq, xs, k, groups, R, y);
    else dot(w->q + row * k, 8, scale, xq, xs, k, groups, R, y);
}

/* Weight rows n0..n0+count-1 (a block of 64) of one input row: y (their dot products) plus, for
 * 4 bits, the zeros' term sum_g (zero[g] - 8 scale[g]) * xsum[g] (8 rows a vector), rounded to
 * bf16 as torch's int4 kernel's output; into out, or added to it. */
static void finish(const mg_matrix *w, int64_t n0, int64_t count, const float *xsum, float *y, float *out, int add) {
    const int64_t groups = w->k / GROUP;
    int64_t i = 0;
    if (w->bits == 4) {
        const uint16_t *scale = w->scale + n0 * groups, *zero = w->zero + n0 * groups;
#ifdef __AVX2__
        for (; i + 8 <= count; i += 8) {
            __m256 z = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                __m256 zg = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(zero + g * 64 + i))), 16));
                __m256 sg = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(scale + g * 64 + i))), 16));
                z = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.0f), sg, zg), _mm256_broadcast_ss(xsum + g), z);
            }
            __m256i u = _mm256_castps_si256(_mm256_add_ps(_mm256_loadu_ps(y + i), z));   /* bf16_round, 8 at a time */
            u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
            _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u))));
        }
#endif
        for (; i < count; i++) {
            float z = 0.0f;
            for (int64_t g = 0; g < groups; g++)
                z = fmaf(fmaf(-8.0f, from_bf16(scale[g * 64 + i]), from_bf16(zero[g * 64 + i])), xsum[g], z);
            y[i] = bf16_round(y[i] + z);
        }
    }
    for (i = 0; i < count; i++) out[n0 + i] = add ? out[n0 + i] + y[i] : y[i];
}

/* This thread's share of out[rows, n] = x[rows, k] @ w.T (weight rows split evenly over the
 * team, in blocks of 64); no barrier at the end. `add`: out += instead. out's rows are ldo apart. */
static void product(const mg_matrix *w, const mg_input *in, float *out, int64_t ldo, int add) {
    const int64_t groups = w->k / GROUP, rows = in->rows;
    #pragma omp for schedule(static) nowait
    for (int64_t n0 = 0; n0 < w->n; n0 += 64) {
        const int64_t count = w->n - n0 < 64 ? w->n - n0 : 64;
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            const int R = rows - r0 >= 4 ? 4 : (int)(rows - r0);
            float y[4][64], d[4];
            for (int64_t n = n0; n < n0 + count; n++) {
                switch (R) {
                case 4: dot_rows(w, n, in, r0, 4, d); break;
                case 3: dot_rows(w, n, in, r0, 3, d); break;
                case 2: dot_rows(w, n, in, r0, 2, d); break;
                default: dot_rows(w, n, in, r0, 1, d);
                }
                for (int r = 0; r < R; r++) y[r][n - n0] = d[r];
            }
            for (int r = 0; r < R; r++)
                finish(w, n0, count, in->sum + (r0 + r) * groups, y[r], out + (r0 + r) * ldo, add);
        }
    }
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    float r = 1.0f / sqrtf(s / n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* Rotate-half RoPE of one head in place: x * cos + [-x2 | x1] * sin. */
static void rotate(float *x, const float *cos_, const float *sin_, int64_t d) {
    int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * cos_[i] - b * sin_[i];
        x[i + h] = b * cos_[i] + a * sin_[i];
    }
}

/* One row's attention over chunk c of its tokens 0..pos (CHUNKS chunks of whole pages), every
 * query head at once, so each key and value is read once: part[h] = (max score, sum of
 * e^(score - max), sum of e^(score - max) * value [d]); `merge` combines the chunks. The new
 * token's key (rotated) and value come from the row's q|k|v; the chunk holding it writes them
 * to the cache, which no chunk reads at `pos` this step. buf: heads * d + kv_dim + heads *
 * (pos + 1) floats. */
static void attend(const mg_model *m, const mg_layer *L, const float *qkv, int64_t pos, const int64_t *pages,
                   const float *cs, int64_t c, float *buf, float *part) {
    const int64_t d = m->head_dim, heads = m->heads, kv_dim = m->kv_heads * d, group = heads / m->kv_heads;
    const int64_t ps = m->page_size, n_pages = pos / ps + 1;
    const int64_t t0 = c * n_pages / CHUNKS * ps, end = (c + 1) * n_pages / CHUNKS * ps;
    const int64_t t1 = end < pos + 1 ? end : pos + 1, n = t1 - t0;
    for (int64_t h = 0; h < heads; h++) {
        float *ph = part + h * (d + 2);
        ph[0] = -INFINITY;
        ph[1] = 0.0f;
        memset(ph + 2, 0, d * sizeof(float));
    }
    if (n <= 0) return;
    float *q = buf, *k_new = q + heads * d, *scores = k_new + kv_dim;   /* scores: [heads, n] */
    const float *v_new = qkv + (heads + m->kv_heads) * d;
    memcpy(q, qkv, (heads * d + kv_dim) * sizeof(float));   /* q, then the new key */
    for (int64_t h = 0; h < heads + m->kv_heads; h++) rotate(q + h * d, cs, cs + d / 2, d);
    if (t1 == pos + 1) {
        int64_t at = pages[pos / ps] * m->page_stride + (pos % ps) * kv_dim;
        memcpy(L->k_cache + at, k_new, kv_dim * sizeof(float));
        memcpy(L->v_cache + at, v_new, kv_dim * sizeof(float));
    }
    const float scale = 1.0f / sqrtf((float)d);
    for (int64_t t = t0; t < t1; t++) {
        const float *k = t < pos ? L->k_cache + pages[t / ps] * m->page_stride + (t % ps) * kv_dim : k_new;
        for (int64_t h = 0; h < heads; h++) scores[h * n + t - t0] = dot_f32(q + h * d, k + h / group * d, d) * scale;
    }
    for (int64_t h = 0; h < heads; h++) {
        float top = -INFINITY;
        for (int64_t i = 0; i < n; i++) top = fmaxf(top, scores[h * n + i]);
        part[h * (d + 2)] = top;
        part[h * (d + 2) + 1] = exp_shifted(scores + h * n, n, top);
    }
    for (int64_t t = t0; t < t1; t++) {
        const float *v = t < pos ? L->v_cache + pages[t / ps] * m->page_stride + (t % ps) * kv_dim : v_new;
        for (int64_t h = 0; h < heads; h++) axpy(scores[h * n + t - t0], v + h / group * d, part + h * (d + 2) + 2, d);
    }
}

/* A row's attention output [heads * d] from its chunks' parts. */
static void merge(const float *part, int64_t heads, int64_t d, float *out) {
    for (int64_t h = 0; h < heads; h++) {
        float top = -INFINITY, sum = 0.0f;
        for (int c = 0; c < CHUNKS; c++) top = fmaxf(top, part[(c * heads + h) * (d + 2)]);
        memset(out + h * d, 0, d * sizeof(float));
        for (int c = 0; c < CHUNKS; c++) {
            const float *p = part + (c * heads + h) * (d + 2);
            if (p[1] == 0.0f) continue;   /* an empty chunk */
            float w = expf(p[0] - top);
            sum += w * p[1];
            axpy(w, p + 2, out + h * d, d);
        }
        for (int64_t i = 0; i < d; i++) out[h * d + i] /= sum;
    }
}

/* out = RMSNorm(x) @ w.T for the input's rows (x's rows `hidden` apart): every thread makes
 * the inputs itself (no barrier before the product), then computes its share. */
static void normed_product(const mg_model *m, const mg_matrix *w, const float *x, const float *norm, mg_input *in,
                           float *xn, float *out, int64_t ldo) {
    for (int64_t r = 0; r < in->rows; r++) {
        rms_norm(x + r * m->hidden, norm, m->hidden, m->eps, xn);
        prepare(in, w, r, xn);
    }
    product(w, in, out, ldo, 0);
}

static int64_t kmax(const mg_model *m) { return m->inter > m->hidden ? m->inter : m->hidden; }

/* Scratch, in floats: the team's shared buffers and each thread's own (cpu_fused.py sizes them). */
int64_t mg_shared_floats(const mg_model *m, int64_t rows) {
    return rows * ((m->heads + 2 * m->kv_heads) * m->head_dim + 2 * m->inter + CHUNKS * m->heads * (m->head_dim + 2));
}

int64_t mg_work_floats(const mg_model *m, int64_t rows, int64_t max_tokens) {
    return kmax(m) + rows * (kmax(m) + 2 * kmax(m) / GROUP) + (m->heads + m->kv_heads) * m->head_dim
           + m->heads * max_tokens;
}

/* One decode step: row r is token x[r] (its embedding, [rows, hidden], updated in place) at
 * position pos[r] of the sequence whose pages are table[slot[r] * table_stride ...]; its
 * logits go to logits[r * vocab ...]. cos_sin: [positions, head_dim], each position's RoPE
 * cos and sin halves (as torch_backend.rope_tables makes them, so the same bits). */
void mg_decode(const mg_model *m, int64_t rows, float *x, const int64_t *pos, const int64_t *slot,
               const int64_t *table, int64_t table_stride, const float *cos_sin, float *logits, float *shared,
               float *work, int threads) {
    const int64_t d = m->head_dim, hidden = m->hidden, inter = m->inter;
    const int64_t qkv_n = (m->heads + 2 * m->kv_heads) * d, K = kmax(m);
    int64_t max_tokens = 0;
    for (int64_t r = 0; r < rows; r++) max_tokens = pos[r] + 1 > max_tokens ? pos[r] + 1 : max_tokens;
    const int64_t part_n = CHUNKS * m->heads * (d + 2);   /* a row's attention parts */
    float *qkv = shared, *gu = qkv + rows * qkv_n, *parts = gu + rows * 2 * inter;
    #pragma omp parallel num_threads(threads)
    {
        /* each thread makes every product's inputs itself: no barrier before the products */
        float *xn = work + omp_get_thread_num() * mg_work_floats(m, rows, max_tokens);
        float *xscale = xn + K, *xsum = xscale + rows * (K / GROUP), *buf = xsum + rows * (K / GROUP);
        void *xq = buf + (m->heads + m->kv_heads) * d + m->heads * max_tokens;   /* rows * K floats */
        mg_input by_hidden = {xq, xscale, xsum, rows, hidden}, by_inter = {xq, xscale, xsum, rows, inter};
        for (int64_t l = 0; l < m->layers; l++) {
            const mg_layer *L = m->layer + l;
            normed_product(m, &L->qkv, x, L->attn_norm, &by_hidden, xn, qkv, qkv_n);
            #pragma omp barrier
            #pragma omp for schedule(static)   /* (row, chunk) pairs over the team */
            for (int64_t i = 0; i < rows * CHUNKS; i++) {
                int64_t r = i / CHUNKS, c = i % CHUNKS;
                attend(m, L, qkv + r * qkv_n, pos[r], table + slot[r] * table_stride, cos_sin + pos[r] * d, c, buf,
                       parts + r * part_n + c * m->heads * (d + 2));
            }   /* (the loop's barrier) */
            for (int64_t r = 0; r < rows; r++) {
                merge(parts + r * part_n, m->heads, d, xn);
                prepare(&by_hidden, &L->o, r, xn);
            }
            product(&L->o, &by_hidden, x, hidden, 1);
            #pragma omp barrier
            normed_product(m, &L->gate_up, x, L->mlp_norm, &by_hidden, xn, gu, 2 * inter);
            #pragma omp barrier
            for (int64_t r = 0; r < rows; r++) {
                const float *g = gu + r * 2 * inter, *u = g + inter;
                swiglu(g, u, inter, xn);
                prepare(&by_inter, &L->down, r, xn);
            }
            product(&L->down, &by_inter, x, hidden, 1);
            #pragma omp barrier
        }
        normed_product(m, &m->head, x, m->final_norm, &by_hidden, xn, logits, m->head.n);
    }
}

/* A prefill's integer products, TURN input rows at a time. The decode step's dot spends four
 * vector operations a group and row (products, convert, scale, add): compute-bound at many rows.
 * Here one vector holds one pair of a group's inputs for TURN rows, so a group's sums for all of
 * them take its 16 pairs' `vpdpwssd`s (or multiply-adds) with the weight pair broadcast, each
 * loaded input vector serving 4 weight rows, then one convert and scale. Each row's arithmetic is
 * its own lane's, whatever the other rows. Not for decode steps: one row a step would pay for a
 * block of TURN. */
#define PAIRS (GROUP / 2)

#ifdef LANES
#define TURN LANES   /* input rows a turned vector holds */

/* A group's 32 weights as 16 pairs of int16 (k order), into pairs. */
static inline void weight_pairs(const uint8_t *q, int bits, int32_t *pairs) {
#if defined(__AVX512BW__)
    _mm512_storeu_si512(pairs, widen(q, bits));
#else
    __m256i lo, hi;
    widen(q, bits, &lo, &hi);
    _mm256_storeu_si256((__m256i *)pairs, lo);
    _mm256_storeu_si256((__m256i *)(pairs + 8), hi);
#endif
}

/* Block b's TURN rows of inputs turned: t[(g * PAIRS + p) * TURN + r] = pair p (two int16) of row
 * r's group g, ts[g * TURN + r] = its group scale; rows past the inputs' are zeros. */
static void turn_inputs(const mg_input *in, int64_t b, int32_t *t, float *ts) {
    const int64_t k = in->k, groups = k / GROUP;
    for (int64_t g = 0; g < groups; g++)
        for (int r = 0; r < TURN; r++) {
            const int64_t row = b * TURN + r;
            const int32_t *pairs = (const int32_t *)((const int16_t *)in->q + row * k + g * GROUP);
            for (int p = 0; p < PAIRS; p++) t[(g * PAIRS + p) * TURN + r] = row < in->rows ? pairs[p] : 0;
            ts[g * TURN + r] = row < in->rows ? in->scale[row * groups + g] : 0.0f;
        }
}

/* W weight rows' dot products (rows n..n+W-1, W <= 4) with a turned block of TURN input rows
 * (out[j][r]). Each group's sum is exact in int32 (< 2^27; converted to float, rounded to 24
 * bits), then times scale x input scale. */
static inline __attribute__((always_inline)) void dot_turned(const mg_matrix *w, int64_t n, int W, const int32_t *t,
                                                             const float *ts, float (*out)[TURN]) {
    const int64_t groups = w->k / GROUP, step = w->bits * GROUP / 8;
    fvec acc[4];
    for (int j = 0; j < W; j++) acc[j] = FZERO();
    for (int64_t g = 0; g < groups; g++) {
        int32_t pairs[4][PAIRS];
        ivec sum[4];
        for (int j = 0; j < W; j++) {
            const uint8_t *q = w->q + (n + j) * w->k * w->bits / 8 + g * step;
            if ((g & 1) == 0) _mm_prefetch((const char *)(q + 4096), _MM_HINT_T0);
            weight_pairs(q, (int)w->bits, pairs[j]);
            sum[j] = IZERO();
        }
        for (int p = 0; p < PAIRS; p++) {
            const ivec x = ILOAD(t + (g * PAIRS + p) * TURN);
            for (int j = 0; j < W; j++) sum[j] = DPWSSD(sum[j], ISET1(pairs[j][p]), x);
        }
        const fvec xs = FLOAD(ts + g * TURN);
        for (int j = 0; j < W; j++) {
            const int64_t row = n + j;
            const float s = from_bf16(w->scale[(row - row % 64) * groups + row % 64 + g * 64]);
            acc[j] = FMADD(TOFLOAT(sum[j]), FMUL(FSET1(s), xs), acc[j]);
        }
    }
    for (int j = 0; j < W; j++) FSTORE(out[j], acc[j]);
}

/* This thread's share of out[rows, n] (+)= x @ w.T from the turned inputs (t, ts: TURN-row blocks). */
static void product_turned(const mg_matrix *w, const mg_input *in, const int32_t *t, const float *ts, float *out,
                           int add) {
    const int64_t groups = w->k / GROUP, blocks = (in->rows + TURN - 1) / TURN;
    #pragma omp for schedule(static) nowait
    for (int64_t n0 = 0; n0 < w->n; n0 += 64) {
        const int64_t count = w->n - n0 < 64 ? w->n - n0 : 64;
        for (int64_t b = 0; b < blocks; b++) {
            float yt[64][TURN], y[64];
            const int32_t *tb = t + b * groups * PAIRS * TURN;
            const float *tsb = ts + b * groups * TURN;
            for (int64_t n = n0; n < n0 + count; n += 4) {
                switch (n0 + count - n >= 4 ? 4 : (int)(n0 + count - n)) {
                case 4: dot_turned(w, n, 4, tb, tsb, yt + (n - n0)); break;
                case 3: dot_turned(w, n, 3, tb, tsb, yt + (n - n0)); break;
                case 2: dot_turned(w, n, 2, tb, tsb, yt + (n - n0)); break;
                default: dot_turned(w, n, 1, tb, tsb, yt + (n - n0));
                }
            }
            for (int64_t r = b * TURN; r < (b + 1) * TURN && r < in->rows; r++) {
                for (int64_t j = 0; j < count; j++) y[j] = yt[j][r - b * TURN];
                finish(w, n0, count, in->sum + r * groups, y, out + r * w->n, add);
            }
        }
    }
}
#endif

static int64_t padded16(int64_t rows) { return (rows + 15) / 16 * 16; }

/* Scratch for mg_product, in floats: the inputs, then (integer forms) their turned copy. */
int64_t mg_product_floats(const mg_matrix *w, int64_t rows) {
    return padded16(rows) * (w->k + 2 * (w->k / GROUP)) + padded16(rows) * (w->k / 2 + w->k / GROUP);
}

/* out[rows, n] = x[rows, k] @ w.T (out += with `add`) for a prefill's rows: the team makes the
 * rows' inputs, then splits the weight's rows. Integer forms take the turned products
 * (product_turned) where the compiler targets AVX2 or AVX-512, whatever the row count (a few
 * rows are padded to a block), so that a row's result never depends on how a prompt is cut into
 * chunks or what a cached prefix left to compute; the others the decode step's, which is
 * row-invariant too. */
void mg_product(const mg_matrix *w, int64_t rows, const float *x, float *out, int add, float *work, int threads) {
    const int64_t k = w->k, groups = k / GROUP;
    mg_input in = {work, work + rows * k, work + rows * k + rows * groups, rows, k};
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) prepare(&in, w, r, x + r * k);
#ifdef LANES
        if (w->bits != 16) {
            float *turned = work + padded16(rows) * (k + 2 * groups);
            int32_t *t = (int32_t *)turned;
            float *ts = turned + padded16(rows) * k / 2;
            #pragma omp for schedule(static)
            for (int64_t b = 0; b < padded16(rows) / TURN; b++)
                turn_inputs(&in, b, t + b * groups * PAIRS * TURN, ts + b * groups * TURN);
            product_turned(w, &in, t, ts, out, add);
        } else
#endif
            product(w, &in, out, w->n, add);
    }
}
