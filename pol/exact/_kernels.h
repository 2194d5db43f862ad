/* The exported kernels of _kernels.c: what pol/exact/native.py calls through ctypes (its SIGNATURES table declares
 * the same functions; tests/exact/test_native.py holds the two together). Pointers are to contiguous CPU memory;
 * see _kernels.c for what each computes and returns. */
#ifndef POL_EXACT_KERNELS_H
#define POL_EXACT_KERNELS_H

#include <stdint.h>

/* coefficient tables, from pol/exact/polys.py */
typedef struct {
    const double *exp_c;   /* 1/i!, i = 0..EXP_DEGREE */
    const double *expm1_c; /* 0, 1/1!, ..., 1/EXPM1_DEGREE! */
    const double *log_c;   /* 1/(2i+1), i < LOG_TERMS */
    const double *erf_t;   /* (ERF_DEGREE + 1, ERF_CENTRES) row-major */
} tables_t;

/* the AdamW step's scalars (pol/optim.py), already rounded to float32 */
typedef struct {
    float decay;                 /* 1 - lr * weight_decay */
    int32_t has_decay;
    float w1, w1c;               /* lerp weight 1 - beta1, and 1 - weight */
    int32_t w1_small;            /* |w1| < 0.5: start + diff * w1, else end - diff * w1c */
    float beta2, w2;             /* v * beta2 + (g * g) * w2 */
    int32_t w2_one;
    float bias2_sqrt, eps, value; /* p + (m / (sqrt(v) / bias2_sqrt + eps)) * value */
    int32_t value_one;
} adamw_t;

/* exact sums (pol/exact/reduce.py) */
int sum_rows_f32(const float *x, int64_t outer, int64_t R, int64_t s_outer, int64_t s_inner, float *out);
int sum_slots_f32(const float *x, const int64_t *target, int64_t n, int64_t nslots, float *out);

/* exact products (pol/exact/matmul.py) */
int64_t split_rows_f32(const float *a, int64_t rows, int64_t K, double *left, int32_t *e);
int64_t split_cols_f32(const float *b, int64_t batch, int64_t K, int64_t N, double *right, int32_t *e, float *colmax);
void combine_f32(const double *v, int64_t batch, int64_t M, int64_t N, const int32_t *ea, const int32_t *eb, float *out);
int64_t split_rows_i8(const float *a, int64_t rows, int64_t K, int8_t *left, int32_t *e);
int64_t split_cols_i8(const float *b, int64_t batch, int64_t K, int64_t N, int8_t *right, int32_t *e, float *colmax);
void combine_i8(const int32_t *diag, int64_t batch, int64_t M, int64_t N, const int32_t *ea, const int32_t *eb, float *out,
                int64_t narrow);
int64_t gemm_f64_exact(const double *left, const double *right, double *v, int64_t batch, int64_t M, int64_t KK,
                       int64_t N);
int64_t product_i8_vnni(const int8_t *left, const int8_t *right, int64_t M, int64_t K, int64_t N, const int32_t *ea,
                        const int32_t *eb, float *out, int64_t z0, int64_t z1, int64_t i0, int64_t i1, int64_t narrow);

/* transcendentals (pol/exact/elementwise.py) */
void kernel_constants(int64_t *out);
void exp_f32(const float *x, float *out, int64_t n, const tables_t *t);
void expm1_f32(const float *x, float *out, int64_t n, const tables_t *t);
void log_f32(const float *x, float *out, int64_t n, const tables_t *t);
void log1p_f32(const float *x, float *out, int64_t n, const tables_t *t);
void tanh_f32(const float *x, float *out, int64_t n, const tables_t *t);
void sigmoid_f32(const float *x, float *out, int64_t n, const tables_t *t);
void erf_f32(const float *x, float *out, int64_t n, const tables_t *t);
void sqrt_f32(const float *x, float *out, int64_t n, const tables_t *t);
void rsqrt_f32(const float *x, float *out, int64_t n, const tables_t *t);

/* the optimizer step (pol/optim.py) */
void adamw_f32(float *p, const float *g, float *m, float *v, int64_t n, const adamw_t *h);

/* row kernels of the handlers (pol/exact/norms.py, softmax.py, activations.py) */
void layer_norm_f32(const float *x, const float *w, const float *b, int64_t rows, int64_t n, float eps, float *out,
                    float *mean, float *rstd, float *scratch);
void layer_norm_bwd_f32(const float *go, const float *x, const float *mean, const float *rstd, const float *w,
                        int64_t rows, int64_t n, float *dx, float *goxhat, float *scratch);
int64_t softmax_f32(const float *x, int64_t rows, int64_t n, float *out, const tables_t *t);
void softmax_bwd_f32(const float *g, const float *o, int64_t rows, int64_t n, float *out);
int64_t log_softmax_f32(const float *x, int64_t rows, int64_t n, float *out, const tables_t *t);
void log_softmax_bwd_f32(const float *g, const float *o, int64_t rows, int64_t n, float *out, const tables_t *t);
void gelu_f32(const float *x, float *out, int64_t n, float alpha, const tables_t *t);
void gelu_bwd_f32(const float *g, const float *x, float *out, int64_t n, float alpha, float beta, const tables_t *t);

#endif
