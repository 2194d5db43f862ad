/* Fused CPU kernels of the exact primitives (pol/exact/native.py builds and loads this file).
 *
 * Every function here computes the SAME bits as the torch implementation beside it in pol/exact (the definition):
 * integer arithmetic is exact, and the float code is the torch code's sequence of IEEE operations, one rounding
 * each, in the same order. It is compiled with -ffp-contract=off and without -ffast-math, so the compiler may not
 * fuse a multiply and an add into an FMA or reorder a sum; x86-64 and AArch64 evaluate double and float in their
 * own precision (no x87 excess precision). Coefficient tables come from Python (computed there with `decimal`), so
 * both paths read the same constants. tests/exact/test_native.py holds each kernel to the torch path bit for bit.
 *
 * Return values: 0 on success; positive where an operand is not finite and the caller must take the torch path
 * (products, softmax); -1 for an index out of range (slot sums) or an unsupported shape (gemm_f64_exact); -2 when
 * out of memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#endif

/* ---------------------------------------------------------------- bits and powers of two */

static inline uint32_t f32_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float f32_from(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline uint64_t f64_bits(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
static inline double f64_from(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }
static inline double pow2(int64_t e) { return f64_from((uint64_t)(e + 1023) << 52); } /* e in [-1022, 1023] */
static inline int f32_nonfinite(uint32_t u) { return ((u >> 23) & 0xFF) == 0xFF; }
static inline double rne(double x) { return __builtin_rint(x); } /* round half to even (default rounding mode) */

/* smallest e with |x| < 2**e, 0 for x == 0; x finite (subnormals included), as frexp_exponent_f32 */
static inline int32_t exponent_above(float ax) {
    if (ax == 0.0f) return 0;
    uint64_t b = f64_bits((double)ax);
    return (int32_t)((b >> 52) & 0x7FF) - 1022;
}

/* ---------------------------------------------------------------- exact sums (pol/exact/reduce.py) */
/* A float32 is m * 2**(k - 149) with a 24-bit m and k in [0, 253] (as split_f32_to_bins). The accumulator holds
 * the exact sum in NDIG signed base-2**32 digits; each addition adds below 2**55 to one digit, so digits are
 * carried every NORM_EVERY additions, long before an int64 could wrap. The sum is rounded once, to nearest even. */

#define NDIG 10
#define NORM_EVERY 128

typedef struct {
    int64_t d[NDIG];
    int64_t terms, negzero, nan, pinf, ninf, pending;
} acc_t;

static inline void acc_normalize(acc_t *a) {
    for (int i = 0; i < NDIG - 1; i++) {
        int64_t c = a->d[i] >> 32; /* floor division (arithmetic shift) */
        a->d[i] -= c * ((int64_t)1 << 32);
        a->d[i + 1] += c;
    }
    a->pending = 0;
}

static inline void acc_add(acc_t *a, float x) {
    uint32_t u = f32_bits(x);
    a->terms++;
    if (f32_nonfinite(u)) {
        if (u & 0x7FFFFF) a->nan++;
        else if (u >> 31) a->ninf++;
        else a->pinf++;
        return;
    }
    uint32_t biased = (u >> 23) & 0xFF;
    uint64_t m = u & 0x7FFFFF;
    if (biased) m |= 0x800000;
    else if (m == 0) { if (u >> 31) a->negzero++; return; }
    uint32_t k = biased ? biased - 1 : 0;
    int64_t v = (int64_t)(m << (k & 31));
    a->d[k >> 5] += (u >> 31) ? -v : v;
    if (++a->pending == NORM_EVERY) acc_normalize(a);
}

static inline int bitlen64(uint64_t x) { return x ? 64 - __builtin_clzll(x) : 0; }

static float acc_round(acc_t *a) {
    if (a->nan || (a->pinf && a->ninf)) return f32_from(0x7FC00000u);
    if (a->pinf) return f32_from(0x7F800000u);
    if (a->ninf) return f32_from(0xFF800000u);
    acc_normalize(a);
    uint32_t sign = 0;
    if (a->d[NDIG - 1] < 0) { /* magnitude of a negative sum: negate, carry again */
        sign = 0x80000000u;
        for (int i = 0; i < NDIG; i++) a->d[i] = -a->d[i];
        acc_normalize(a);
    }
    int t = NDIG - 1;
    while (t >= 0 && a->d[t] == 0) t--;
    if (t < 0) return (a->terms > 0 && a->negzero == a->terms) ? f32_from(0x80000000u) : 0.0f;
    int len = 32 * t + bitlen64((uint64_t)a->d[t]); /* bit length of the magnitude N (units of 2**-149) */
    if (len <= 24) return f32_from(sign | (uint32_t)a->d[0]); /* N < 2**24: exactly N * 2**-149 */
    /* window W = d[t] d[t-1] d[t-2] (missing digits are 0), sticky = any digit below it */
    unsigned __int128 w = (unsigned __int128)(uint64_t)a->d[t] << 64;
    if (t >= 1) w |= (unsigned __int128)(uint64_t)a->d[t - 1] << 32;
    if (t >= 2) w |= (uint64_t)a->d[t - 2];
    int sticky = 0;
    for (int i = 0; i < t - 2; i++) sticky |= a->d[i] != 0;
    int wlen = 64 + bitlen64((uint64_t)a->d[t]);
    int sw = wlen - 24;
    uint64_t q = (uint64_t)(w >> sw);
    unsigned __int128 rest = w & (((unsigned __int128)1 << sw) - 1);
    unsigned __int128 half = (unsigned __int128)1 << (sw - 1);
    if (rest > half || (rest == half && (sticky || (q & 1)))) q++;
    int s = len - 24;
    if (q == (1u << 24)) { q >>= 1; s++; }
    int biased = s + 1; /* value = q * 2**(s - 149), q in [2**23, 2**24) */
    if (biased >= 255) return f32_from(sign | 0x7F800000u);
    return f32_from(sign | ((uint32_t)biased << 23) | (uint32_t)(q - (1u << 23)));
}

/* The common case without branches: the signed value of a finite float32 (bits u) as v * 2**(32 * slot - 149),
 * with |v| < 2**55 (a zero gives v = 0). For a non-finite u the result is meaningless: callers flag such rows and
 * sum them again with acc_add. */
static inline int64_t finite_term(uint32_t u, uint32_t *slot) {
    uint32_t biased = (u >> 23) & 0xFF;
    uint32_t normal = biased != 0;
    uint64_t m = (u & 0x7FFFFF) | ((uint64_t)normal << 23);
    uint32_t k = biased - normal;
    int64_t v = (int64_t)(m << (k & 31));
    int64_t neg = -(int64_t)(u >> 31); /* 0 or -1 */
    *slot = k >> 5;
    return (v ^ neg) - neg;
}

static float row_sum(const float *row, int64_t R, int64_t s_inner) {
    acc_t a;
    memset(&a, 0, sizeof a);
    int64_t negzero = 0;
    uint32_t special = 0;
    for (int64_t r0 = 0; r0 < R; r0 += NORM_EVERY) {
        int64_t r1 = r0 + NORM_EVERY < R ? r0 + NORM_EVERY : R;
        for (int64_t r = r0; r < r1; r++) {
            uint32_t u = f32_bits(row[r * s_inner]), slot;
            int64_t v = finite_term(u, &slot);
            a.d[slot] += v;
            negzero += u == 0x80000000u;
            special |= (u & 0x7F800000u) == 0x7F800000u;
        }
        acc_normalize(&a);
    }
    if (special) { /* NaN or an infinity somewhere: the careful path decides what IEEE gives */
        memset(&a, 0, sizeof a);
        for (int64_t r = 0; r < R; r++) acc_add(&a, row[r * s_inner]);
    } else {
        a.terms = R;
        a.negzero = negzero;
    }
    return acc_round(&a);
}

/* The narrow rule of reduce._narrow_rowsum_f64: an entry with biased exponent E (1 for subnormals) is a multiple
 * of 2**(E - 150) below 2**(E - 126); if a row's nonzero entries span at most 29 - bitlen(R - 1) binades, every
 * partial sum is an integer number of the row's smallest unit below 2**53 of them, so a float64 sum in ANY order
 * (here 8 vector lanes) is exact, and one conversion rounds it once. Returns 0 when the rule does not hold. */
static inline void narrow_term(float x, uint32_t *emax, uint32_t *emin, uint32_t *special, int64_t *negzero, double *sum) {
    uint32_t u = f32_bits(x);
    uint32_t b = (u >> 23) & 0xFF;
    uint32_t e = b ? b : 1;
    int nonzero = (u & 0x7FFFFFFFu) != 0;
    uint32_t hi = nonzero ? e : 0, lo = nonzero ? e : 255;
    *emax = hi > *emax ? hi : *emax;
    *emin = lo < *emin ? lo : *emin;
    *special |= b == 0xFF;
    *negzero += u == 0x80000000u;
    *sum = *sum + (double)x; /* used only where the narrow rule makes it exact */
}

static inline int narrow_budget(int64_t R) { return 29 - (R > 1 ? 64 - __builtin_clzll((uint64_t)(R - 1)) : 0); }

static inline float narrow_result(uint32_t emax, uint32_t emin, uint32_t special, int64_t negzero, double sum, int64_t R,
                                  int *ok) {
    *ok = !special && (int)emax - (int)emin <= narrow_budget(R);
    return sum != 0 ? (float)sum : (negzero == R ? -0.0f : 0.0f);
}

typedef uint32_t v8u __attribute__((vector_size(32))); /* eight lanes in GCC vector types */
typedef int32_t v8i __attribute__((vector_size(32)));
typedef int8_t v8b __attribute__((vector_size(8)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

static inline v8u v8u_select(v8u mask, v8u a, v8u b) { return (a & mask) | (b & ~mask); }

/* Eight lanes in GCC vector types (lowered to whatever SIMD the target has), so the row loop vectorises on every
 * x86-64 level: per lane the largest and smallest biased exponent of the nonzero entries, a NaN/inf flag, the count
 * of -0.0 entries and the float64 sum. Rows of 2**32 or more entries (lane counts could wrap) take row_sum. */
static int narrow_row_sum(const float *row, int64_t R, float *out) {
    if (R >= ((int64_t)1 << 32)) return 0;
    const v8u zero = {0}, ff = zero + 0xFFu;
    v8u emax = zero, emin = ff, special = zero, negzero = zero;
    v8d sum = {0};
    int64_t r = 0;
    for (; r + 8 <= R; r += 8) {
        v8u u;
        v8f f;
        memcpy(&u, row + r, sizeof u);
        memcpy(&f, row + r, sizeof f);
        v8u b = (u >> 23) & 0xFFu;
        v8u e = b - (v8u)(b == zero);              /* subnormals count as biased exponent 1 */
        v8u nonzero = (v8u)((u & 0x7FFFFFFFu) != zero);
        v8u hi = e & nonzero, lo = v8u_select(nonzero, e, ff);
        emax = v8u_select((v8u)(hi > emax), hi, emax);
        emin = v8u_select((v8u)(lo < emin), lo, emin);
        special |= (v8u)(b == ff);
        negzero -= (v8u)(u == (zero + 0x80000000u)); /* a true comparison is all ones: -(-1) counts one */
        sum += __builtin_convertvector(f, v8d);
    }
    uint32_t emax0 = 0, emin0 = 255, special0 = 0;
    int64_t negzero0 = 0;
    double sum0 = 0;
    for (; r < R; r++) narrow_term(row[r], &emax0, &emin0, &special0, &negzero0, &sum0);
    for (int l = 0; l < 8; l++) {
        emax0 = emax[l] > emax0 ? emax[l] : emax0;
        emin0 = emin[l] < emin0 ? emin[l] : emin0;
        special0 |= special[l];
        negzero0 += negzero[l];
        sum0 = sum0 + sum[l];
    }
    int ok;
    *out = narrow_result(emax0, emin0, special0, negzero0, sum0, R, &ok);
    return ok;
}

/* out[i] = exact sum of x[i * s_outer + r * s_inner] over r < R, rounded once */
int sum_rows_f32(const float *x, int64_t outer, int64_t R, int64_t s_outer, int64_t s_inner, float *out) {
    if (outer < 8) { /* few rows: one at a time (vector lanes along the row where it is contiguous) */
        for (int64_t i = 0; i < outer; i++)
            if (s_inner != 1 || !narrow_row_sum(x + i * s_outer, R, &out[i])) out[i] = row_sum(x + i * s_outer, R, s_inner);
        return 0;
    }
    /* many rows: r outer, rows inner (vector lanes across rows), the narrow rule per row */
    uint32_t *emax = calloc((size_t)outer, sizeof(uint32_t)), *emin = malloc((size_t)outer * sizeof(uint32_t));
    uint32_t *special = calloc((size_t)outer, sizeof(uint32_t));
    int64_t *negzero = calloc((size_t)outer, sizeof(int64_t));
    double *sum = calloc((size_t)outer, sizeof(double));
    int rc = 0;
    if (!emax || !emin || !special || !negzero || !sum) {
        rc = -2;
        goto done;
    }
    for (int64_t i = 0; i < outer; i++) emin[i] = 255;
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * s_inner;
        for (int64_t i = 0; i < outer; i++) narrow_term(xr[i * s_outer], &emax[i], &emin[i], &special[i], &negzero[i], &sum[i]);
    }
    for (int64_t i = 0; i < outer; i++) {
        int ok;
        out[i] = narrow_result(emax[i], emin[i], special[i], negzero[i], sum[i], R, &ok);
        if (!ok) out[i] = row_sum(x + i * s_outer, R, s_inner);
    }
done:
    free(emax);
    free(emin);
    free(special);
    free(negzero);
    free(sum);
    return rc;
}

/* out[t] = exact sum of x[i] over target[i] == t, rounded once; -1 if a target is outside [0, nslots). First the
 * narrow rule per slot (one float64 sum each, exact where the slot's terms span few binades); only the slots where
 * it does not hold are summed again in a superaccumulator. A slot without terms is +0. */
int sum_slots_f32(const float *x, const int64_t *target, int64_t n, int64_t nslots, float *out) {
    for (int64_t i = 0; i < n; i++)
        if (target[i] < 0 || target[i] >= nslots) return -1;
    size_t m = (size_t)(nslots > 0 ? nslots : 1);
    uint32_t *emax = calloc(m, sizeof(uint32_t)), *emin = malloc(m * sizeof(uint32_t)), *special = calloc(m, sizeof(uint32_t));
    int64_t *negzero = calloc(m, sizeof(int64_t)), *count = calloc(m, sizeof(int64_t));
    double *sum = calloc(m, sizeof(double));
    acc_t *acc = NULL;
    int rc = 0, wide = 0;
    if (!emax || !emin || !special || !negzero || !count || !sum) {
        rc = -2;
        goto done;
    }
    for (int64_t t = 0; t < nslots; t++) emin[t] = 255;
    for (int64_t i = 0; i < n; i++) {
        int64_t t = target[i];
        narrow_term(x[i], &emax[t], &emin[t], &special[t], &negzero[t], &sum[t]);
        count[t]++;
    }
    for (int64_t t = 0; t < nslots; t++) {
        int ok = 1;
        out[t] = count[t] ? narrow_result(emax[t], emin[t], special[t], negzero[t], sum[t], count[t], &ok) : 0.0f;
        special[t] = !ok; /* from here on: this slot needs the superaccumulator */
        wide |= !ok;
    }
    if (wide) {
        acc = calloc(m, sizeof(acc_t));
        if (!acc) {
            rc = -2;
            goto done;
        }
        for (int64_t i = 0; i < n; i++)
            if (special[target[i]]) acc_add(&acc[target[i]], x[i]);
        for (int64_t t = 0; t < nslots; t++)
            if (special[t]) out[t] = acc_round(&acc[t]);
    }
done:
    free(emax);
    free(emin);
    free(special);
    free(negzero);
    free(count);
    free(sum);
    free(acc);
    return rc;
}

/* ---------------------------------------------------------------- exact products (pol/exact/matmul.py) */
/* With y = a * 2**(27 - e) (exact) and the definition's balanced 7-bit digits A_0..A_3:
 *   hi = A_0 * 2**7 + A_1 = rne(y / 2**14),  lo = A_2 * 2**7 + A_3 = rne(y - hi * 2**14),
 *   A_2 = rne((y - hi * 2**14) / 2**7),       Q = hi * 2**14 + lo = rne(y)
 * and the kept limb pairs (s + t <= 4) give V = sum_k hi_a Q_b + lo_a hi_b + A2_a A2_b: one float64 GEMM of
 * [hi | lo | A2] (M, 3K) by [Q; hi; A2] (3K, N) whose partial sums are integers below K * 2**40.001 <= 2**53. */

/* e = smallest exponent above every |x| of a row (K contiguous floats); returns 1 if one is not finite. The
 * magnitudes are compared as integers (for non-negative floats the bit patterns order as the values do, and
 * every non-finite one lies above every finite one), which vectorises. */
static int64_t row_exponent(const float *row, int64_t K, int32_t *e) {
    const uint32_t *u = (const uint32_t *)row;
    uint32_t mx = 0;
    for (int64_t k = 0; k < K; k++) {
        uint32_t ab = u[k] & 0x7FFFFFFFu;
        mx = ab > mx ? ab : mx;
    }
    *e = exponent_above(f32_from(mx));
    return mx >= 0x7F800000u;
}

/* the same per column of a (K, N) matrix, read in memory order; `colmax` is scratch of N floats */
static int64_t col_exponents(const float *b, int64_t K, int64_t N, float *colmax, int32_t *e) {
    uint32_t *mx = (uint32_t *)colmax;
    const uint32_t *u = (const uint32_t *)b;
    for (int64_t j = 0; j < N; j++) mx[j] = 0;
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < N; j++) {
            uint32_t ab = u[k * N + j] & 0x7FFFFFFFu;
            mx[j] = ab > mx[j] ? ab : mx[j];
        }
    int64_t bad = 0;
    for (int64_t j = 0; j < N; j++) {
        bad |= mx[j] >= 0x7F800000u;
        e[j] = exponent_above(f32_from(mx[j]));
    }
    return bad;
}

/* column exponents (col_exponents) and the column scales 2**(27 - e) the splits multiply by */
static int64_t col_scales(const float *b, int64_t K, int64_t N, float *colmax, int32_t *e, double *scale) {
    int64_t bad = col_exponents(b, K, N, colmax, e);
    for (int64_t j = 0; j < N; j++) scale[j] = pow2(27 - (bad ? 0 : e[j]));
    return bad;
}

/* rows of a (rows, K): left (rows, 3K) = [hi | lo | A2], e (rows); returns the count of non-finite entries */
int64_t split_rows_f32(const float *a, int64_t rows, int64_t K, double *left, int32_t *e) {
    for (int64_t i = 0; i < rows; i++) {
        const float *row = a + i * K;
        int64_t bad = row_exponent(row, K, &e[i]);
        if (bad) return bad;
        double scale = pow2(27 - e[i]);
        double *hi = left + i * 3 * K, *lo = hi + K, *a2 = lo + K;
        for (int64_t k = 0; k < K; k++) {
            double y = (double)row[k] * scale;
            double h = rne(y * 0x1p-14);
            double r = y - h * 0x1p14;
            hi[k] = h;
            lo[k] = rne(r);
            a2[k] = rne(r * 0x1p-7);
        }
    }
    return 0;
}

/* columns of b (batch, K, N): right (batch, 3K, N) = [Q; hi; A2], e (batch, N); `colmax` is scratch (N floats) */
int64_t split_cols_f32(const float *b, int64_t batch, int64_t K, int64_t N, double *right, int32_t *e, float *colmax) {
    double *scale = malloc((size_t)(N > 0 ? N : 1) * sizeof(double));
    if (!scale) return -2;
    int64_t bad = 0;
    for (int64_t z = 0; z < batch && !bad; z++) {
        const float *bz = b + z * K * N;
        double *q = right + z * 3 * K * N, *hi = q + K * N, *a2 = hi + K * N;
        bad = col_scales(bz, K, N, colmax, e + z * N, scale);
        for (int64_t k = 0; k < K && !bad; k++)
            for (int64_t j = 0; j < N; j++) {
                double y = (double)bz[k * N + j] * scale[j];
                double h = rne(y * 0x1p-14);
                double r = y - h * 0x1p14;
                q[k * N + j] = rne(y);
                hi[k * N + j] = h;
                a2[k * N + j] = rne(r * 0x1p-7);
            }
    }
    free(scale);
    return bad;
}

/* out (batch, M, N) = float32(V * 2**(ea - 40) * 2**eb): two exact scalings, one rounding. V is an integer, so a
 * zero is +0 whatever sign the GEMM gave it (V + 0.0). */
void combine_f32(const double *v, int64_t batch, int64_t M, int64_t N, const int32_t *ea, const int32_t *eb, float *out) {
    for (int64_t z = 0; z < batch; z++)
        for (int64_t i = 0; i < M; i++) {
            double pa = pow2((int64_t)ea[z * M + i] - 40);
            const double *vr = v + (z * M + i) * N;
            float *o = out + (z * M + i) * N;
            const int32_t *ebz = eb + z * N;
            for (int64_t j = 0; j < N; j++) o[j] = (float)(((vr[j] + 0.0) * pa) * pow2(ebz[j]));
        }
}

/* The int8 form of the same product: the definition's digits A_0..A_3 (|A_s| <= 64) for int8 GEMMs.
 * left (rows, 4K) = [A_0 | A_1 | A_2 | A_3]; right (batch, 4K, N) = [B_3; B_2; B_1; B_0] (reversed), so that the
 * limb pairs of diagonal d = s + t are one contiguous column range of left against one contiguous row range of
 * right, and the whole diagonal is ONE int8 GEMM with no copy. */

static inline void digits4(double y, int8_t *d0, int8_t *d1, int8_t *d2, int8_t *d3) {
    double a0 = rne(y * 0x1p-21);
    double r = y - a0 * 0x1p21;
    double a1 = rne(r * 0x1p-14);
    r = r - a1 * 0x1p14;
    double a2 = rne(r * 0x1p-7);
    r = r - a2 * 0x1p7;
    *d0 = (int8_t)a0;
    *d1 = (int8_t)a1;
    *d2 = (int8_t)a2;
    *d3 = (int8_t)rne(r);
}

/* digits4 on eight values in GCC vector types, so short rows vectorise too (a compiler-vectorised loop over int8
 * outputs takes 64 values per step and leaves rows of 16 or 32 to its scalar epilogue). Rounding to nearest even by
 * adding and subtracting 1.5 * 2**52 (exact for |x| < 2**51, ties to even as the sum's last bit is the integer's):
 * the same integer as rne, except that it gives +0 where rne gives -0; either is digit 0, and the remainders that
 * follow differ at most in the sign of a zero, so every digit is the same. */
static inline v8d rne_x8(v8d x) {
    const v8d magic = {0x1.8p52, 0x1.8p52, 0x1.8p52, 0x1.8p52, 0x1.8p52, 0x1.8p52, 0x1.8p52, 0x1.8p52};
    return (x + magic) - magic;
}

static inline void store_x8(int8_t *p, v8d a) {
    v8b b = __builtin_convertvector(__builtin_convertvector(a, v8i), v8b);
    memcpy(p, &b, sizeof b);
}

static inline void digits4_x8(v8d y, int8_t *d0, int8_t *d1, int8_t *d2, int8_t *d3) {
    v8d a0 = rne_x8(y * 0x1p-21);
    v8d r = y - a0 * 0x1p21;
    v8d a1 = rne_x8(r * 0x1p-14);
    r = r - a1 * 0x1p14;
    v8d a2 = rne_x8(r * 0x1p-7);
    r = r - a2 * 0x1p7;
    store_x8(d0, a0);
    store_x8(d1, a1);
    store_x8(d2, a2);
    store_x8(d3, rne_x8(r));
}

static inline v8d load_x8(const float *x) {
    v8f f;
    memcpy(&f, x, sizeof f);
    return __builtin_convertvector(f, v8d);
}

int64_t split_rows_i8(const float *a, int64_t rows, int64_t K, int8_t *left, int32_t *e) {
    for (int64_t i = 0; i < rows; i++) {
        const float *row = a + i * K;
        int64_t bad = row_exponent(row, K, &e[i]);
        if (bad) return bad;
        double scale = pow2(27 - e[i]);
        int8_t *l = left + i * 4 * K;
        int64_t k = 0, bulk = K - K % 64; /* the compiler vectorises this loop 64 values at a time */
        for (; k < bulk; k++) digits4((double)row[k] * scale, l + k, l + K + k, l + 2 * K + k, l + 3 * K + k);
        for (; k + 8 <= K; k += 8) digits4_x8(load_x8(row + k) * scale, l + k, l + K + k, l + 2 * K + k, l + 3 * K + k);
        for (; k < K; k++) digits4((double)row[k] * scale, l + k, l + K + k, l + 2 * K + k, l + 3 * K + k);
    }
    return 0;
}

/* `colmax` is scratch of N floats */
int64_t split_cols_i8(const float *b, int64_t batch, int64_t K, int64_t N, int8_t *right, int32_t *e, float *colmax) {
    double *scale = malloc((size_t)(N > 0 ? N : 1) * sizeof(double));
    if (!scale) return -2;
    int64_t bad = 0;
    for (int64_t z = 0; z < batch && !bad; z++) {
        const float *bz = b + z * K * N;
        int8_t *rz = right + z * 4 * K * N; /* blocks B_3, B_2, B_1, B_0 */
        bad = col_scales(bz, K, N, colmax, e + z * N, scale);
        for (int64_t k = 0; k < K && !bad; k++) {
            const float *brow = bz + k * N;
            int8_t *r3 = rz + 3 * K * N + k * N, *r2 = rz + 2 * K * N + k * N, *r1 = rz + K * N + k * N, *r0 = rz + k * N;
            int64_t j = 0, bulk = N - N % 64; /* as in split_rows_i8 */
            for (; j < bulk; j++) digits4((double)brow[j] * scale[j], r3 + j, r2 + j, r1 + j, r0 + j);
            for (; j + 8 <= N; j += 8) {
                v8d sc;
                memcpy(&sc, scale + j, sizeof sc);
                digits4_x8(load_x8(brow + j) * sc, r3 + j, r2 + j, r1 + j, r0 + j);
            }
            for (; j < N; j++) digits4((double)brow[j] * scale[j], r3 + j, r2 + j, r1 + j, r0 + j);
        }
    }
    free(scale);
    return bad;
}

/* int64 -> double rounded to odd: exact when it fits, else the neighbour with an odd last bit (|v| < 2**62) */
static inline double round_odd_i64(int64_t v) {
    double f = (double)v;
    int64_t back = (int64_t)f;
    if (back != v && (f64_bits(f) & 1) == 0) {
        uint64_t bits = f64_bits(f);
        /* step one ulp toward v: away from zero when |v| > |f|, toward zero otherwise */
        int away = (v > back) == (f > 0);
        f = f64_from(away ? bits + 1 : bits - 1);
    }
    return f;
}

/* V of one output of the int8 form from its five diagonal sums d = 0..4: sum_d diag[d] * 2**(7 * (4 - d)), exact */
static inline int64_t horner5(int64_t d0, int64_t d1, int64_t d2, int64_t d3, int64_t d4) {
    return ((((d0 * 128 + d1) * 128 + d2) * 128 + d3) * 128) + d4;
}

/* out (batch, M, N) = float32(V * 2**(ea - 40) * 2**eb) with V = sum_d diag[d] * 2**(7 * (4 - d)), diag
 * (batch, 5, M, N) int32. `narrow` (K <= 2**12, so |V| < 2**53): V converts to double exactly, and the loop
 * vectorises; otherwise round-to-odd keeps the one rounding. Both give the same bits where both apply. */
void combine_i8(const int32_t *diag, int64_t batch, int64_t M, int64_t N, const int32_t *ea, const int32_t *eb, float *out,
                int64_t narrow) {
    int64_t mn = M * N;
    for (int64_t z = 0; z < batch; z++) {
        const int32_t *d0 = diag + z * 5 * mn, *d1 = d0 + mn, *d2 = d1 + mn, *d3 = d2 + mn, *d4 = d3 + mn;
        const int32_t *ebz = eb + z * N;
        for (int64_t i = 0; i < M; i++) {
            double pa = pow2((int64_t)ea[z * M + i] - 40);
            float *o = out + z * mn + i * N;
            int64_t r = i * N;
            if (narrow) {
                for (int64_t j = 0; j < N; j++) {
                    int64_t v = horner5(d0[r + j], d1[r + j], d2[r + j], d3[r + j], d4[r + j]);
                    o[j] = (float)(((double)v * pa) * pow2(ebz[j]));
                }
            } else {
                for (int64_t j = 0; j < N; j++) {
                    int64_t v = horner5(d0[r + j], d1[r + j], d2[r + j], d3[r + j], d4[r + j]);
                    o[j] = (float)((round_odd_i64(v) * pa) * pow2(ebz[j]));
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- transcendentals (pol/exact/elementwise.py) */
/* Each is the torch block function's sequence of float64 operations; a NaN input returns the input itself. The
 * element functions are branch-free (selects, no early returns, no float-to-integer conversion of a value that may
 * be NaN) with fixed polynomial degrees, so the compiler can vectorise the loops; vector lanes do the same IEEE
 * operations as scalar code. native.py checks these degrees against pol/exact/elementwise.py before use. */

#define INV_LN2 1.4426950408889634
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#define SQRT2 1.4142135623730951
#define EXP_DEGREE 10
#define EXPM1_DEGREE 12
#define LOG_TERMS 8
#define ERF_DEGREE 12
#define ERF_CENTRES 9

/* the constants above, for native.py to compare with pol/exact/elementwise.py */
void kernel_constants(int64_t *out) {
    out[0] = EXP_DEGREE;
    out[1] = EXPM1_DEGREE;
    out[2] = LOG_TERMS;
    out[3] = ERF_DEGREE;
    out[4] = ERF_CENTRES;
}

static inline double clampd(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); } /* NaN stays */
static inline double absd(double x) { return x < 0 ? -x : x; } /* as torch's abs for the values used here */

#define HORNER(c, degree, x, acc)                  \
    do {                                           \
        acc = (c)[degree];                         \
        for (int i_ = (degree) - 1; i_ >= 0; i_--) { \
            acc = acc * (x);                       \
            acc = acc + (c)[i_];                   \
        }                                          \
    } while (0)

/* 2**n for an integer-valued double n in [-1022, 1023], from bits: (n + 2**52 + 1023) holds n + 1023 in its low
 * mantissa bits (both additions exact), shifted into the exponent field. Garbage, never undefined, for NaN. */
static inline double pow2d(double n) { return f64_from(f64_bits((n + 0x1p52) + 1023.0) << 52); }

/* tables_t (the coefficient tables) is declared in _kernels.h */

static inline double exp_f64(const tables_t *t, double x) {
    x = clampd(x, -700.0, 700.0);
    double n = rne(x * INV_LN2);
    double r = (x - n * LN2_HI) - n * LN2_LO;
    double p;
    HORNER(t->exp_c, EXP_DEGREE, r, p);
    return p * pow2d(n);
}

static inline double expm1_f64(const tables_t *t, double x) {
    double small;
    HORNER(t->expm1_c, EXPM1_DEGREE, x, small);
    double big = exp_f64(t, x) - 1.0;
    return absd(x) < 0.5 ? small : big;
}

static inline double log_f64(const tables_t *t, double x) { /* positive finite normal x */
    uint64_t bits = f64_bits(x);
    uint64_t ebits = (bits >> 52) & 0x7FF;
    double m = f64_from((bits & ((1ull << 52) - 1)) | (1023ull << 52));
    int big = m > SQRT2;
    m = big ? m * 0.5 : m;
    /* e = biased - 1023 (+1), as a double: exact through the 2**52 trick, no integer-to-float conversion */
    double ed = f64_from(0x4330000000000000ull | (ebits + (uint64_t)big)) - (0x1p52 + 1023.0);
    double f = m - 1.0;
    double s = f / (f + 2.0);
    double s2 = s * s;
    double poly;
    HORNER(t->log_c, LOG_TERMS - 1, s2, poly);
    return ed * LN2_HI + (ed * LN2_LO + (s + s) * poly);
}

static inline double log_special(double u, double y) {
    y = u == __builtin_inf() ? u : y;
    y = u < 0 ? __builtin_nan("") : y;
    return u == 0 ? -__builtin_inf() : y;
}

static inline int finite64(double x) { return x - x == 0; }

static inline float op_exp(const tables_t *t, float x) {
    double xd = x;
    double y = exp_f64(t, clampd(xd, -120.0, 100.0));
    y = xd < -120.0 ? 0.0 : y;
    y = xd > 100.0 ? __builtin_inf() : y;
    return x != x ? x : (float)y;
}

static inline float op_expm1(const tables_t *t, float x) {
    double xd = x;
    double y = expm1_f64(t, clampd(xd, -120.0, 100.0));
    y = xd > 100.0 ? __builtin_inf() : y;
    return x != x ? x : (float)y;
}

static inline float op_log(const tables_t *t, float x) {
    double xd = x;
    double safe = (xd > 0 && finite64(xd)) ? xd : 1.0;
    return x != x ? x : (float)log_special(xd, log_f64(t, safe));
}

static inline float op_log1p(const tables_t *t, float x) {
    double xd = x;
    double u = xd + 1.0;
    double safe = (u > 0 && finite64(u)) ? u : 1.0;
    double tiny = xd - (xd * xd) * 0.5;
    double y = absd(xd) < 0x1p-20 ? tiny : log_f64(t, safe);
    return x != x ? x : (float)log_special(u, y);
}

static inline float op_tanh(const tables_t *t, float x) {
    double xd = x;
    double a = absd(xd);
    a = a > 20.0 ? 20.0 : a;
    double tt = expm1_f64(t, a + a);
    double y = tt / (tt + 2.0);
    y = xd < 0 ? -y : y;
    y = xd == 0 ? xd : y;
    return x != x ? x : (float)y;
}

static inline float op_sigmoid(const tables_t *t, float x) {
    double xd = x;
    double y = 1.0 / (1.0 + exp_f64(t, clampd(-xd, -700.0, 700.0)));
    return x != x ? x : (float)y;
}

static inline float op_erf(const tables_t *t, float x) {
    double xd = x;
    double z = finite64(xd) ? xd : (xd > 0 ? 10.0 : -10.0);
    double ax = absd(z);
    double r = rne(ax * 2.0);
    double jd = r <= (double)(ERF_CENTRES - 1) ? r : (double)(ERF_CENTRES - 1); /* clamp; NaN -> a valid index */
    int32_t j = (int32_t)jd;
    double h = ax - jd * 0.5;
    const double *tab = t->erf_t;
    double acc = tab[ERF_DEGREE * ERF_CENTRES + j];
    for (int k = ERF_DEGREE - 1; k >= 0; k--) {
        acc = acc * h;
        acc = acc + tab[k * ERF_CENTRES + j];
    }
    double y = ax >= 4.0 ? 1.0 : acc;
    y = z < 0 ? -y : y;
    y = xd == 0 ? xd : y;
    return x != x ? x : (float)y;
}

/* IEEE sqrt: the hardware's square root instruction is correctly rounded (torch's CPU sqrt is not); a negative
 * input gives the positive quiet NaN that torch's full_like(nan) writes, a NaN input is returned */
static inline float op_sqrt(const tables_t *t, float x) {
    (void)t;
    float s = __builtin_sqrtf(x < 0 ? 0.0f : x);
    return x != x ? x : (x < 0 ? f32_from(0x7FC00000u) : s);
}

static inline float op_rsqrt(const tables_t *t, float x) {
    float s = op_sqrt(t, x);
    double s0 = s, xd = x;
    double s1 = (s0 + xd / s0) * 0.5;
    float y = (float)(1.0 / s1);
    y = x == __builtin_inff() ? 0.0f : y;
    y = x == 0 ? 1.0f / x : y;
    return s != s ? s : y;
}

static inline float op_erf_scalar(const tables_t *t, float x) { return op_erf(t, x); }

#define UNARY(name)                                                                        \
    void name##_f32(const float *restrict x, float *restrict out, int64_t n, const tables_t *t) { \
        for (int64_t i = 0; i < n; i++) out[i] = op_##name(t, x[i]);                       \
    }
UNARY(exp)
UNARY(expm1)
UNARY(log)
UNARY(log1p)
UNARY(tanh)
UNARY(sigmoid)
UNARY(erf_scalar)
UNARY(sqrt)
UNARY(rsqrt)

/* ---------------------------------------------------------------- the AdamW update (pol/optim.py) */
/* pol.optim.apply_update's AdamW step for one float32 parameter, as exact mode routes it: each torch operator it
 * uses split into single IEEE roundings in the handlers' order (mul_ by a scalar; lerp_ as start + diff * w or
 * end - diff * (1 - w); addcmul_ as x + (t1 * t2) * value; addcdiv_ as x + (t1 / t2) * value; a value of 1 skips
 * its multiply). Scalars arrive already rounded to float32, as torch rounds a Python scalar for a float32 tensor. */
/* adamw_t (the step's scalars) is declared in _kernels.h */

void adamw_f32(float *restrict p, const float *restrict g, float *restrict m, float *restrict v, int64_t n,
               const adamw_t *h) {
    for (int64_t i = 0; i < n; i++) {
        float pi = p[i], gi = g[i], mi = m[i], vi = v[i];
        if (h->has_decay) pi = pi * h->decay;
        float diff = gi - mi;
        mi = h->w1_small ? mi + diff * h->w1 : gi - diff * h->w1c;
        vi = vi * h->beta2;
        float sq = gi * gi;
        vi = h->w2_one ? vi + sq : vi + sq * h->w2;
        float d = __builtin_sqrtf(vi);
        d = d / h->bias2_sqrt;
        d = d + h->eps;
        float q = mi / d;
        pi = h->value_one ? pi + q : pi + q * h->value;
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
    }
}

/* ---------------------------------------------------------------- layer norm (pol/exact/mode.py's handlers) */
/* The handlers' sequence per row of n: mean = S(x) / n; var = S((x - mean)^2) / n; rstd = rsqrt(var + eps) (op_rsqrt);
 * out = ((x - mean) * rstd) [* w] [+ b], where S is the exact sum rounded once and each other step one IEEE
 * rounding. `scratch` holds n floats. */

static float exact_row_sum(const float *row, int64_t n) {
    float out;
    return narrow_row_sum(row, n, &out) ? out : row_sum(row, n, 1);
}

void layer_norm_f32(const float *x, const float *w, const float *b, int64_t rows, int64_t n, float eps, float *out,
                    float *mean, float *rstd, float *scratch) {
    float nf = (float)n;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        float m = exact_row_sum(xr, n) / nf;
        for (int64_t i = 0; i < n; i++) {
            float d = xr[i] - m;
            scratch[i] = d * d;
        }
        float var = exact_row_sum(scratch, n) / nf;
        float s = op_rsqrt(0, var + eps);
        for (int64_t i = 0; i < n; i++) {
            float v = (xr[i] - m) * s;
            if (w) v = v * w[i];
            if (b) v = v + b[i];
            o[i] = v;
        }
        mean[r] = m;
        rstd[r] = s;
    }
}

/* The backward handler's row part: x_hat = (x - mean) * rstd, g = go [* w], b = S(g), c2 = S(g * x_hat),
 * dx = (rstd / n) * ((g * n - b) - x_hat * c2); and go * x_hat (for the weight's gradient, summed over rows by the
 * caller) where `goxhat` is given. `scratch` holds 2n floats; dx may be NULL. */
void layer_norm_bwd_f32(const float *go, const float *x, const float *mean, const float *rstd, const float *w,
                        int64_t rows, int64_t n, float *dx, float *goxhat, float *scratch) {
    float nf = (float)n;
    float *g = scratch, *c1 = scratch + n;
    for (int64_t r = 0; r < rows; r++) {
        const float *gor = go + r * n, *xr = x + r * n;
        float m = mean[r], s = rstd[r];
        for (int64_t i = 0; i < n; i++) {
            float xh = (xr[i] - m) * s;
            float gi = w ? gor[i] * w[i] : gor[i];
            g[i] = gi;
            c1[i] = gi * xh;
            if (goxhat) goxhat[r * n + i] = gor[i] * xh;
        }
        if (!dx) continue;
        float bsum = exact_row_sum(g, n);
        float c2 = exact_row_sum(c1, n);
        float coef = s / nf;
        for (int64_t i = 0; i < n; i++) {
            float xh = (xr[i] - m) * s;
            float inner = (g[i] * nf - bsum) - xh * c2;
            dx[r * n + i] = coef * inner;
        }
    }
}

/* max of a row (which of two equal zeros is unspecified: callers only subtract it, and x - (+0) == x - (-0) for
 * every x but a zero, whose exp is 1 either way) and whether it holds a NaN; eight lanes, vectorised */
static float row_max(const float *x, int64_t n, int *nan) {
    const v8f zero = {0};
    v8f m = zero - __builtin_inff();
    v8i bad = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f v;
        memcpy(&v, x + i, sizeof v);
        v8i gt = v > m;
        bad |= v != v;
        m = (v8f)(((v8i)v & gt) | ((v8i)m & ~gt));
    }
    float best = -__builtin_inff();
    int any = 0;
    for (int l = 0; l < 8; l++) {
        best = m[l] > best ? m[l] : best;
        any |= bad[l] != 0;
    }
    for (; i < n; i++) {
        any |= x[i] != x[i];
        best = x[i] > best ? x[i] : best;
    }
    *nan = any;
    return best;
}

/* ---------------------------------------------------------------- softmax and GELU (pol/exact/mode.py's handlers) */
/* Torch's decompositions written out per row / element, each step one IEEE rounding, exp and erf the exact ones,
 * S the exact sum. softmax: m = max(x), e = exp(x - m), out = e / S(e); returns the number of rows holding a NaN
 * (where the caller takes the torch path, whose max picks the NaN). backward: p = g * o, out = p - o * S(p). */
int64_t softmax_f32(const float *x, int64_t rows, int64_t n, float *out, const tables_t *t) {
    int64_t nan_rows = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        int nan;
        float m = row_max(xr, n, &nan);
        if (nan) {
            nan_rows++;
            continue;
        }
        for (int64_t i = 0; i < n; i++) o[i] = op_exp(t, xr[i] - m);
        float s = exact_row_sum(o, n);
        for (int64_t i = 0; i < n; i++) o[i] = o[i] / s;
    }
    return nan_rows;
}

void softmax_bwd_f32(const float *g, const float *o, int64_t rows, int64_t n, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = g + r * n, *orow = o + r * n;
        float *res = out + r * n;
        for (int64_t i = 0; i < n; i++) res[i] = gr[i] * orow[i];
        float s = exact_row_sum(res, n);
        for (int64_t i = 0; i < n; i++) res[i] = res[i] - orow[i] * s;
    }
}

/* log-softmax as torch's decomposition: m = max(x), d = x - m, out = d - log(S(exp(d))); backward: g - exp(o) * S(g).
 * The forward returns the number of rows holding a NaN or with an infinite maximum (the caller takes the torch
 * path, which decides the NaNs). */
int64_t log_softmax_f32(const float *x, int64_t rows, int64_t n, float *out, const tables_t *t) {
    int64_t odd_rows = 0;
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *o = out + r * n;
        int nan;
        float m = row_max(xr, n, &nan);
        if (nan || m == __builtin_inff() || m == -__builtin_inff()) {
            odd_rows++;
            continue;
        }
        for (int64_t i = 0; i < n; i++) o[i] = op_exp(t, xr[i] - m);
        float lse = op_log(t, exact_row_sum(o, n));
        for (int64_t i = 0; i < n; i++) o[i] = (xr[i] - m) - lse;
    }
    return odd_rows;
}

void log_softmax_bwd_f32(const float *g, const float *o, int64_t rows, int64_t n, float *out, const tables_t *t) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gr = g + r * n, *orow = o + r * n;
        float *res = out + r * n;
        float s = exact_row_sum(gr, n);
        for (int64_t i = 0; i < n; i++) res[i] = gr[i] - op_exp(t, orow[i]) * s;
    }
}

/* GELU (erf form): (x * 0.5) * (1 + erf(x * alpha)); backward: g * (0.5 * (1 + erf(x * alpha)) + x * (beta *
 * exp((x * x) * -0.5))), alpha and beta the decomposition's constants rounded to float32 (passed in). */
void erf_f32(const float *x, float *out, int64_t n, const tables_t *t);

#define GELU_CHUNK 1024 /* erf runs over a chunk at a time (its vector form), the rest lane by lane */

void gelu_f32(const float *restrict x, float *restrict out, int64_t n, float alpha, const tables_t *t) {
    float arg[GELU_CHUNK], e[GELU_CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += GELU_CHUNK) {
        int64_t m = n - i0 < GELU_CHUNK ? n - i0 : GELU_CHUNK;
        for (int64_t i = 0; i < m; i++) arg[i] = x[i0 + i] * alpha;
        erf_f32(arg, e, m, t);
        for (int64_t i = 0; i < m; i++) out[i0 + i] = (x[i0 + i] * 0.5f) * (1.0f + e[i]);
    }
}

void gelu_bwd_f32(const float *restrict g, const float *restrict x, float *restrict out, int64_t n, float alpha, float beta,
                  const tables_t *t) {
    float arg[GELU_CHUNK], e[GELU_CHUNK];
    for (int64_t i0 = 0; i0 < n; i0 += GELU_CHUNK) {
        int64_t m = n - i0 < GELU_CHUNK ? n - i0 : GELU_CHUNK;
        for (int64_t i = 0; i < m; i++) arg[i] = x[i0 + i] * alpha;
        erf_f32(arg, e, m, t);
        for (int64_t i = 0; i < m; i++) {
            float xi = x[i0 + i];
            float cdf = 0.5f * (1.0f + e[i]);
            float pdf = beta * op_exp(t, (xi * xi) * -0.5f);
            out[i0 + i] = g[i0 + i] * (cdf + xi * pdf);
        }
    }
}

/* erf over 8 lanes with AVX-512: the scalar op_erf's operations, lane by lane (IEEE multiply, add, round, min,
 * compare-select; no FMA), with the coefficient lookup done by register permutes instead of gathers: for each
 * degree, the 9 centres' coefficients sit in two registers and _mm512_permutex2var_pd picks each lane's. The
 * scalar loop handles the tail, and machines without AVX-512 run the scalar loop throughout (same bits). */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include <immintrin.h>

void erf_f32(const float *x, float *out, int64_t n, const tables_t *t) {
    __m512d lo[ERF_DEGREE + 1], hi[ERF_DEGREE + 1];
    for (int k = 0; k <= ERF_DEGREE; k++) {
        lo[k] = _mm512_loadu_pd(t->erf_t + k * ERF_CENTRES);          /* centres 0..7 */
        hi[k] = _mm512_set1_pd(t->erf_t[k * ERF_CENTRES + 8]);         /* centre 8 */
    }
    const __m512d zero = _mm512_setzero_pd(), one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5);
    const __m512d two = _mm512_set1_pd(2.0), top = _mm512_set1_pd((double)(ERF_CENTRES - 1)), four = _mm512_set1_pd(4.0);
    const __m512d ten = _mm512_set1_pd(10.0), mten = _mm512_set1_pd(-10.0), sign = _mm512_set1_pd(-0.0);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 xf = _mm256_loadu_ps(x + i);
        __m512d xd = _mm512_cvtps_pd(xf);
        __mmask8 finite = _mm512_cmp_pd_mask(_mm512_sub_pd(xd, xd), zero, _CMP_EQ_OQ);
        __mmask8 pos = _mm512_cmp_pd_mask(xd, zero, _CMP_GT_OQ);
        __m512d z = _mm512_mask_blend_pd(finite, _mm512_mask_blend_pd(pos, mten, ten), xd);
        __m512d ax = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(z, zero, _CMP_LT_OQ), z, _mm512_xor_pd(z, sign)); /* -z */
        __m512d r = _mm512_roundscale_pd(_mm512_mul_pd(ax, two), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512d jd = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(r, top, _CMP_LE_OQ), top, r); /* clamp; NaN -> top */
        __m512i j = _mm512_cvttpd_epi64(jd);
        __m512d h = _mm512_sub_pd(ax, _mm512_mul_pd(jd, half));
        __m512d acc = _mm512_permutex2var_pd(lo[ERF_DEGREE], j, hi[ERF_DEGREE]);
        for (int k = ERF_DEGREE - 1; k >= 0; k--) {
            acc = _mm512_mul_pd(acc, h);
            acc = _mm512_add_pd(acc, _mm512_permutex2var_pd(lo[k], j, hi[k]));
        }
        __m512d y = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(ax, four, _CMP_GE_OQ), acc, one);
        y = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(z, zero, _CMP_LT_OQ), y, _mm512_xor_pd(y, sign));
        y = _mm512_mask_blend_pd(_mm512_cmp_pd_mask(xd, zero, _CMP_EQ_OQ), y, xd);
        __m256 yf = _mm512_cvtpd_ps(y);
        __mmask8 nan = _mm256_cmp_ps_mask(xf, xf, _CMP_UNORD_Q);
        _mm256_storeu_ps(out + i, _mm256_mask_blend_ps(nan, yf, xf));
    }
    erf_scalar_f32(x + i, out + i, n - i, t);
}
#else
void erf_f32(const float *x, float *out, int64_t n, const tables_t *t) { erf_scalar_f32(x, out, n, t); }
#endif

/* V (batch, M, N) = left (batch, M, KK) @ right (batch, KK, N) for the float64 product form, with AVX-512 where N is
 * a multiple of 8: four rows by up to sixteen columns of accumulators in registers. Every product and partial sum
 * is an integer below 2**53, so fused multiply-adds and this summation order give exactly the integer any GEMM
 * gives. Returns -1 (the caller uses torch.bmm) without AVX-512, for other N, or when a batch entry's right
 * operand (KK x N doubles) outgrows L1. For attention's small products, where a library's batched GEMM spends more
 * time on set-up than on arithmetic (measured: 0.22 against 0.47 ms at (64,32,32)x(64,32,16), but 29 against 9 ms
 * at (128,64,64)x(128,64,64) before this limit). */
#if defined(__AVX512F__)
static inline void gemm_rows(const double *l, int64_t KK, const double *r, int64_t N, double *v, int rows, int64_t j0,
                             int nv) {
    __m512d acc[4][2];
    for (int a = 0; a < 4; a++)
        for (int b = 0; b < 2; b++) acc[a][b] = _mm512_setzero_pd();
    for (int64_t k = 0; k < KK; k++) {
        __m512d b0 = _mm512_loadu_pd(r + k * N + j0);
        __m512d b1 = nv > 1 ? _mm512_loadu_pd(r + k * N + j0 + 8) : b0;
        for (int a = 0; a < rows; a++) {
            __m512d x = _mm512_set1_pd(l[a * KK + k]);
            acc[a][0] = _mm512_fmadd_pd(x, b0, acc[a][0]);
            if (nv > 1) acc[a][1] = _mm512_fmadd_pd(x, b1, acc[a][1]);
        }
    }
    for (int a = 0; a < rows; a++) {
        _mm512_storeu_pd(v + a * N + j0, acc[a][0]);
        if (nv > 1) _mm512_storeu_pd(v + a * N + j0 + 8, acc[a][1]);
    }
}

int64_t gemm_f64_exact(const double *left, const double *right, double *v, int64_t batch, int64_t M, int64_t KK,
                       int64_t N) {
    if (N % 8 != 0 || KK * N > 4096) return -1; /* the right operand must stay in L1: no cache blocking here */
    for (int64_t z = 0; z < batch; z++) {
        const double *lz = left + z * M * KK, *rz = right + z * KK * N;
        double *vz = v + z * M * N;
        for (int64_t i = 0; i < M; i += 4) {
            int rows = M - i < 4 ? (int)(M - i) : 4;
            for (int64_t j = 0; j < N; j += 16) {
                int nv = N - j >= 16 ? 2 : 1;
                gemm_rows(lz + i * KK, KK, rz, N, vz + i * N, rows, j, nv);
            }
        }
    }
    return 0;
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The same with AVX2 (x86-64-v3), for N a multiple of 8 up to 128: full 6 x 8 tiles of accumulators in registers
 * (twelve: enough independent FMA chains to keep both FMA ports busy; fixed trip counts, so they stay in registers),
 * ragged last rows one at a time; each 8-column strip of the right operand is reused by every row block. Same
 * integers, same bits. Measured at 1 thread against torch.bmm (MKL): 0.08 against 0.18 ms at (32,32,48)x(32,48,32),
 * 0.08 against 0.12 ms at (136,192)x(192,64), 0.37 against 0.54 at (256,384)x(384,64), 2.0 against 2.5 ms at
 * (256,1536)x(1536,64); for N >= 192 slower (1.2-1.45x at N = 256), declined there. */
static inline void gemm_tile6x8(const double *l, int64_t KK, const double *r, int64_t N, double *v) {
    __m256d c00 = _mm256_setzero_pd(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256d c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < KK; k++) {
        __m256d b0 = _mm256_loadu_pd(r + k * N), b1 = _mm256_loadu_pd(r + k * N + 4), x;
        x = _mm256_broadcast_sd(l + k);
        c00 = _mm256_fmadd_pd(x, b0, c00), c01 = _mm256_fmadd_pd(x, b1, c01);
        x = _mm256_broadcast_sd(l + KK + k);
        c10 = _mm256_fmadd_pd(x, b0, c10), c11 = _mm256_fmadd_pd(x, b1, c11);
        x = _mm256_broadcast_sd(l + 2 * KK + k);
        c20 = _mm256_fmadd_pd(x, b0, c20), c21 = _mm256_fmadd_pd(x, b1, c21);
        x = _mm256_broadcast_sd(l + 3 * KK + k);
        c30 = _mm256_fmadd_pd(x, b0, c30), c31 = _mm256_fmadd_pd(x, b1, c31);
        x = _mm256_broadcast_sd(l + 4 * KK + k);
        c40 = _mm256_fmadd_pd(x, b0, c40), c41 = _mm256_fmadd_pd(x, b1, c41);
        x = _mm256_broadcast_sd(l + 5 * KK + k);
        c50 = _mm256_fmadd_pd(x, b0, c50), c51 = _mm256_fmadd_pd(x, b1, c51);
    }
    _mm256_storeu_pd(v, c00), _mm256_storeu_pd(v + 4, c01);
    _mm256_storeu_pd(v + N, c10), _mm256_storeu_pd(v + N + 4, c11);
    _mm256_storeu_pd(v + 2 * N, c20), _mm256_storeu_pd(v + 2 * N + 4, c21);
    _mm256_storeu_pd(v + 3 * N, c30), _mm256_storeu_pd(v + 3 * N + 4, c31);
    _mm256_storeu_pd(v + 4 * N, c40), _mm256_storeu_pd(v + 4 * N + 4, c41);
    _mm256_storeu_pd(v + 5 * N, c50), _mm256_storeu_pd(v + 5 * N + 4, c51);
}

static inline void gemm_row1x8(const double *l, int64_t KK, const double *r, int64_t N, double *v) {
    __m256d c0 = _mm256_setzero_pd(), c1 = c0;
    for (int64_t k = 0; k < KK; k++) {
        __m256d x = _mm256_broadcast_sd(l + k);
        c0 = _mm256_fmadd_pd(x, _mm256_loadu_pd(r + k * N), c0);
        c1 = _mm256_fmadd_pd(x, _mm256_loadu_pd(r + k * N + 4), c1);
    }
    _mm256_storeu_pd(v, c0), _mm256_storeu_pd(v + 4, c1);
}

int64_t gemm_f64_exact(const double *left, const double *right, double *v, int64_t batch, int64_t M, int64_t KK,
                       int64_t N) {
    if (N % 8 != 0 || N > 128) return -1; /* wider: the library's blocked GEMM is faster */
    for (int64_t z = 0; z < batch; z++) {
        const double *lz = left + z * M * KK, *rz = right + z * KK * N;
        double *vz = v + z * M * N;
        for (int64_t j = 0; j < N; j += 8) {
            int64_t i = 0;
            for (; i + 6 <= M; i += 6) gemm_tile6x8(lz + i * KK, KK, rz + j, N, vz + i * N + j);
            for (; i < M; i++) gemm_row1x8(lz + i * KK, KK, rz + j, N, vz + i * N + j);
        }
    }
    return 0;
}
#else
int64_t gemm_f64_exact(const double *left, const double *right, double *v, int64_t batch, int64_t M, int64_t KK,
                       int64_t N) {
    (void)left, (void)right, (void)v, (void)batch, (void)M, (void)KK, (void)N;
    return -1;
}
#endif

/* ---------------------------------------------------------------- the int8 form in one pass, with AVX-512 VNNI */
/* The same V and the same rounding as the int8 form (5 `_int_mm` calls and combine_i8), but each 4 x 16 tile of the
 * output keeps its five diagonal sums in registers: vpdpbusd multiplies unsigned bytes by signed bytes and adds
 * groups of four into int32 without saturation, so the right operand's digits go in as B_t + 64 (0..128) and each
 * diagonal then subtracts 64 * (the row's sum of the A_s digits it used). Every step is integer arithmetic: |a
 * diagonal| <= 4 pairs * K * 128 * 64 < 2**31 for K <= 2**15. `left` and `right` are split_rows_i8's and
 * split_cols_i8's layouts. Returns -1 (the caller runs the GEMMs itself) where
 * the kernels were built without VNNI or K is not a multiple of 4, -2 when out of memory. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
/* panel[t][k4][j][q] = B_t[4 k4 + q][j0 + j] + 64 for 16 columns (64 past the last column): a 4 x 16 byte
 * transpose per (t, k4), by byte and word interleaves where all 16 columns exist */
static void pack_panel(const int8_t *right, int64_t K, int64_t N, int64_t j0, int64_t nj, uint8_t *panel) {
    int64_t K4 = K / 4;
    const __m128i bias = _mm_set1_epi8(64);
    for (int t = 0; t < 4; t++) {
        const int8_t *bt = right + (3 - t) * K * N; /* blocks are B_3, B_2, B_1, B_0 */
        uint8_t *pt = panel + t * K4 * 64;
        for (int64_t k4 = 0; k4 < K4; k4++) {
            const int8_t *src = bt + 4 * k4 * N + j0;
            uint8_t *dst = pt + k4 * 64;
            if (nj == 16) {
                __m128i r0 = _mm_loadu_si128((const __m128i *)src), r1 = _mm_loadu_si128((const __m128i *)(src + N));
                __m128i r2 = _mm_loadu_si128((const __m128i *)(src + 2 * N)), r3 = _mm_loadu_si128((const __m128i *)(src + 3 * N));
                __m128i lo01 = _mm_unpacklo_epi8(r0, r1), hi01 = _mm_unpackhi_epi8(r0, r1);
                __m128i lo23 = _mm_unpacklo_epi8(r2, r3), hi23 = _mm_unpackhi_epi8(r2, r3);
                _mm_storeu_si128((__m128i *)dst, _mm_add_epi8(_mm_unpacklo_epi16(lo01, lo23), bias));
                _mm_storeu_si128((__m128i *)(dst + 16), _mm_add_epi8(_mm_unpackhi_epi16(lo01, lo23), bias));
                _mm_storeu_si128((__m128i *)(dst + 32), _mm_add_epi8(_mm_unpacklo_epi16(hi01, hi23), bias));
                _mm_storeu_si128((__m128i *)(dst + 48), _mm_add_epi8(_mm_unpackhi_epi16(hi01, hi23), bias));
            } else {
                for (int64_t j = 0; j < 16; j++)
                    for (int q = 0; q < 4; q++) dst[j * 4 + q] = j < nj ? (uint8_t)(src[q * N + j] + 64) : 64;
            }
        }
    }
}

static void tile_4x16(const int8_t *const rows[4], int64_t K, const uint8_t *panel, int32_t tile[5][4][16]) {
    int64_t K4 = K / 4;
    __m512i acc[5][4];
    for (int d = 0; d < 5; d++)
        for (int r = 0; r < 4; r++) acc[d][r] = _mm512_setzero_si512();
    for (int64_t k4 = 0; k4 < K4; k4++) {
        __m512i b[4];
        for (int t = 0; t < 4; t++) b[t] = _mm512_loadu_si512(panel + (t * K4 + k4) * 64);
        for (int r = 0; r < 4; r++)
            for (int sd = 0; sd < 4; sd++) {
                int32_t w;
                memcpy(&w, rows[r] + sd * K + 4 * k4, 4);
                __m512i a = _mm512_set1_epi32(w);
                for (int t = 0; t < 4 && sd + t <= 4; t++) acc[sd + t][r] = _mm512_dpbusd_epi32(acc[sd + t][r], b[t], a);
            }
    }
    for (int d = 0; d < 5; d++)
        for (int r = 0; r < 4; r++) _mm512_storeu_si512(tile[d][r], acc[d][r]);
}

/* one batch entry, rows [i0, i1); panel (K * 64 bytes), zero (4K bytes of 0) and corr (5 int32 per row) are scratch */
static void product_i8_vnni_one(const int8_t *left, const int8_t *right, int64_t K, int64_t N, const int32_t *ea,
                                const int32_t *eb, float *out, int64_t i0, int64_t i1, int64_t narrow, uint8_t *panel,
                                const int8_t *zero, int32_t *corr) {
    for (int64_t i = i0; i < i1; i++) { /* 64 * the digit sums each diagonal of row i used */
        int32_t rs[4];
        for (int sd = 0; sd < 4; sd++) {
            int32_t acc = 0;
            for (int64_t k = 0; k < K; k++) acc += left[i * 4 * K + sd * K + k];
            rs[sd] = acc;
        }
        for (int d = 0; d < 5; d++) {
            int32_t c = 0;
            for (int sd = 0; sd < 4; sd++)
                if (d - sd >= 0 && d - sd <= 3) c += rs[sd];
            corr[(i - i0) * 5 + d] = 64 * c;
        }
    }
    int32_t tile[5][4][16];
    for (int64_t j0 = 0; j0 < N; j0 += 16) {
        int64_t nj = N - j0 < 16 ? N - j0 : 16;
        pack_panel(right, K, N, j0, nj, panel);
        for (int64_t i = i0; i < i1; i += 4) {
            const int8_t *rows[4];
            for (int r = 0; r < 4; r++) rows[r] = i + r < i1 ? left + (i + r) * 4 * K : zero;
            tile_4x16(rows, K, panel, tile);
            for (int r = 0; r < 4 && i + r < i1; r++) {
                const int32_t *c = corr + (i + r - i0) * 5;
                double pa = pow2((int64_t)ea[i + r] - 40);
                float *o = out + (i + r) * N + j0;
                for (int64_t j = 0; j < nj; j++) {
                    int64_t v = horner5(tile[0][r][j] - c[0], tile[1][r][j] - c[1], tile[2][r][j] - c[2],
                                        tile[3][r][j] - c[3], tile[4][r][j] - c[4]);
                    o[j] = narrow ? (float)(((double)v * pa) * pow2(eb[j0 + j]))
                                  : (float)((round_odd_i64(v) * pa) * pow2(eb[j0 + j]));
                }
            }
        }
    }
}

/* batch entries [z0, z1) of (batch, M, K) @ (batch, K, N), each in rows [i0, i1) */
int64_t product_i8_vnni(const int8_t *left, const int8_t *right, int64_t M, int64_t K, int64_t N, const int32_t *ea,
                        const int32_t *eb, float *out, int64_t z0, int64_t z1, int64_t i0, int64_t i1, int64_t narrow) {
    if (K % 4 != 0 || K == 0) return -1;
    uint8_t *panel = malloc((size_t)(K * 64));
    int8_t *zero = calloc((size_t)(4 * K), 1);
    int32_t *corr = malloc((size_t)((i1 - i0 > 0 ? i1 - i0 : 1) * 5) * sizeof(int32_t));
    if (!panel || !zero || !corr) {
        free(panel), free(zero), free(corr);
        return -2;
    }
    for (int64_t z = z0; z < z1; z++)
        product_i8_vnni_one(left + z * M * 4 * K, right + z * 4 * K * N, K, N, ea + z * M, eb + z * N, out + z * M * N,
                            i0, i1, narrow, panel, zero, corr);
    free(panel), free(zero), free(corr);
    return 0;
}
#else
int64_t product_i8_vnni(const int8_t *left, const int8_t *right, int64_t M, int64_t K, int64_t N, const int32_t *ea,
                        const int32_t *eb, float *out, int64_t z0, int64_t z1, int64_t i0, int64_t i1, int64_t narrow) {
    (void)left, (void)right, (void)M, (void)K, (void)N, (void)ea, (void)eb, (void)out, (void)z0, (void)z1, (void)i0, (void)i1,
        (void)narrow;
    return -1;
}
#endif
