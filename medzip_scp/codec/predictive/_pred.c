/*
 * medzip predictive lossless coder, core (see __init__.py for the design).
 *
 * Everything on the probability path is integer arithmetic: the same input gives the same bytes
 * on every machine and compiler.  Encoder and decoder share one modelling routine (code_image),
 * so they cannot drift apart: the only difference is whether each binary decision is written or
 * read.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>  /* isfinite only: no libm function is called */

#define PAD 3
#define MAXNN 24
#define MAXK 64
#define NQ 48          /* error-energy levels */
#define NQB 12         /* coarse levels used where contexts are multiplied */
#define CLS_LUT 4096   /* activities below this find their class in a table */

/* ------------------------------------------------------------------ binary arithmetic coder */

typedef struct {
    uint32_t x1, x2, x;
    uint8_t *buf;
    int64_t pos, cap;
    int dec;
    int overflow;
} Coder;

static inline void out_byte(Coder *c, uint8_t b) {
    if (c->pos < c->cap) c->buf[c->pos] = b; else c->overflow = 1;
    c->pos++;
}
static inline uint8_t in_byte(Coder *c) {
    uint8_t b = c->pos < c->cap ? c->buf[c->pos] : 0;
    c->pos++;
    return b;
}

/* p1 = P(bit == 1) in (0, 65536) */
static inline int code_raw(Coder *c, uint32_t p1, int bit) {
    uint32_t xmid = c->x1 + (uint32_t)(((uint64_t)(c->x2 - c->x1) * p1) >> 16);
    if (c->dec) bit = c->x <= xmid;
    if (bit) c->x2 = xmid; else c->x1 = xmid + 1;
    while (((c->x1 ^ c->x2) & 0xff000000u) == 0) {
        if (c->dec) c->x = (c->x << 8) | in_byte(c);
        else out_byte(c, (uint8_t)(c->x2 >> 24));
        c->x1 <<= 8;
        c->x2 = (c->x2 << 8) | 255;
    }
    return bit;
}

/* ------------------------------------------------------------------ adaptive probabilities */

/* state: high 16 bits probability of a one (scaled to 65536), low bits a hit counter. */
static void init_mix_tables(void);
static int RECIP[1024];  /* 65536 / (n + 2); |d| <= 65535, so d * RECIP[n] fits an int */
static int tables_ready = 0;
static void init_tables(void) {
    if (tables_ready) return;
    for (int i = 0; i < 1024; i++) RECIP[i] = 65536 / (i + 2);
    init_mix_tables();
    tables_ready = 1;
}

typedef struct { uint16_t p; uint16_t n; } Prob;

static inline void prob_init(Prob *t, int n) {
    for (int i = 0; i < n; i++) { t[i].p = 32768; t[i].n = 0; }
}

static inline int code_bit(Coder *c, Prob *s, int limit, int bit) {
    uint32_t p = s->p;
    if (p < 32) p = 32; else if (p > 65536 - 32) p = 65536 - 32;
    bit = code_raw(c, p, bit);
    int target = bit ? 65535 : 0;
    int d = target - (int)s->p;
    s->p = (uint16_t)((int)s->p + (int)((d * RECIP[s->n]) >> 16));
    if (s->n < limit) s->n++;
    return bit;
}

/* ---------------------------------------------- logistic mixing (format version 2 and later) */

static int SQT[33] = {1, 2, 3, 6, 10, 16, 27, 45, 73, 120, 194, 310, 488, 747, 1101, 1546, 2047,
                      2549, 2994, 3348, 3607, 3785, 3901, 3975, 4022, 4050, 4068, 4079, 4085,
                      4089, 4092, 4093, 4094};
static int STRETCH[4096];

/* 1/(1+exp(-d/256)) scaled to 12 bits; d in 1/256 units (interpolated; SQUASH tabulates it) */
static int squash_interp(int d) {
    if (d > 2047) return 4095;
    if (d < -2047) return 1;
    int w = d & 127;
    int i = (d + 2048) / 128;  /* d >= -2047: non-negative numerator, plain division */
    return (SQT[i] * (128 - w) + SQT[i + 1] * w + 64) >> 7;
}

static int SQUASH[4095];  /* squash_interp(d) at SQUASH[d + 2047], d in [-2047, 2047] */

static inline int squash(int d) {
    if (d > 2047) return 4095;
    if (d < -2047) return 1;
    return SQUASH[d + 2047];
}

static void init_mix_tables(void) {
    for (int d = -2047; d <= 2047; d++) SQUASH[d + 2047] = squash_interp(d);
    int pi = 0;
    for (int x = -2047; x <= 2047; x++) {
        int v = squash(x);
        for (int j = pi; j <= v; j++) STRETCH[j] = x;
        pi = v + 1;
    }
    for (int j = pi; j < 4096; j++) STRETCH[j] = 2047;
}

#define NI 4  /* inputs: three models and a bias */
typedef struct { int32_t w[NI]; } Mixer;

static inline void mixer_init(Mixer *m, int n) {
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < NI - 1; j++) m[i].w[j] = 22000;
        m[i].w[NI - 1] = 0;
    }
}

static inline void prob_update(Prob *s, int limit, int bit) {
    int target = bit ? 65535 : 0;
    int d = target - (int)s->p;
    s->p = (uint16_t)((int)s->p + (int)((d * RECIP[s->n]) >> 16));
    if (s->n < limit) s->n++;
}

/* code one decision with the mixed prediction of three adaptive models (the mixer's inputs
 * are the three stretched probabilities and a constant bias input of 256) */
static inline int code_mix(Coder *c, Prob *a, Prob *b, Prob *d, Mixer *mx, int limit, int bit) {
    const int s0 = STRETCH[a->p >> 4], s1 = STRETCH[b->p >> 4], s2 = STRETCH[d->p >> 4];
    int32_t *w = mx->w;
    const int64_t dot = (int64_t)w[0] * s0 + (int64_t)w[1] * s1 + (int64_t)w[2] * s2 +
                        (int64_t)w[3] * 256;
    int pr = squash((int)(dot >> 16));
    uint32_t p16 = (uint32_t)pr * 16 + 8;
    if (p16 < 32) p16 = 32; else if (p16 > 65536 - 32) p16 = 65536 - 32;
    bit = code_raw(c, p16, bit);
    int err = ((bit << 12) - pr) * 6;
    w[0] += (s0 * err + 0x2000) >> 14;
    w[1] += (s1 * err + 0x2000) >> 14;
    w[2] += (s2 * err + 0x2000) >> 14;
    w[3] += (256 * err + 0x2000) >> 14;
    prob_update(a, limit, bit);
    prob_update(b, limit, bit);
    prob_update(d, limit, bit);
    return bit;
}

/* ------------------------------------------------------------------ helpers */

static inline int iabs(int v) { return v < 0 ? -v : v; }

/* number of significant bits of v (0 for 0) */
static inline int bitlen(uint32_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return v ? 32 - __builtin_clz(v) : 0;
#else
    int n = 0;
    while (v) { n++; v >>= 1; }
    return n;
#endif
}

/* log-scale quantiser: two levels per octave */
static inline int qlog(uint32_t e) {
    if (e == 0) return 0;
    int b = bitlen(e);
    int half = b >= 2 ? (int)((e >> (b - 2)) & 1) : 0;
    return 2 * b - 1 + half;
}

/* neighbour offsets (dy, dx), causal; first entries are the most important */
static const int OFF[MAXNN][2] = {
    {0, -1}, {-1, 0}, {-1, -1}, {-1, 1}, {0, -2}, {-2, 0}, {-1, -2}, {-2, -1}, {-2, 1}, {-1, 2},
    {0, -3}, {-3, 0}, {-2, -2}, {-2, 2}, {-1, -3}, {-1, 3}, {-3, -1}, {-3, 1}, {-3, -2}, {-3, 2},
    {-2, -3}, {-2, 3}, {-3, -3}, {-3, 3}};

/* padded-layout image: row stride S = W + 2*PAD, rows -PAD..H-1 */
typedef struct {
    int H, W, S;
    int32_t *v;     /* pixel values, padded */
    int32_t *e;     /* signed residuals of the final prediction, padded (0 outside) */
} Img;

static inline int32_t *PX(Img *im, int y, int x) { return im->v + (int64_t)(y + PAD) * im->S + x + PAD; }
static inline int32_t *EX(Img *im, int y, int x) { return im->e + (int64_t)(y + PAD) * im->S + x + PAD; }

static int img_alloc(Img *im, int H, int W) {
    im->H = H; im->W = W; im->S = W + 2 * PAD;
    size_t n = (size_t)(H + PAD) * im->S;
    im->v = (int32_t *)calloc(n, sizeof(int32_t));
    im->e = (int32_t *)calloc(n, sizeof(int32_t));
    if (!im->v || !im->e) { free(im->v); free(im->e); return -1; }
    return 0;
}
static void img_free(Img *im) { free(im->v); free(im->e); }

/* after pixel (y,0) is known: replicate into the left pad of row y */
static inline void pad_left(Img *im, int y) {
    int32_t v = *PX(im, y, 0);
    for (int k = 1; k <= PAD; k++) *PX(im, y, -k) = v;
}
/* after row y is complete: right pad; after row 0: top pad rows */
static inline void pad_row_done(Img *im, int y) {
    int32_t v = *PX(im, y, im->W - 1);
    for (int k = 0; k < PAD; k++) *PX(im, y, im->W + k) = v;
    if (y == 0)
        for (int k = 1; k <= PAD; k++) memcpy(PX(im, -k, -PAD), PX(im, 0, -PAD), sizeof(int32_t) * im->S);
}

static inline int activity(const int32_t *p, int S) {
    int W = p[-1], WW = p[-2], N = p[-S], NW = p[-S - 1], NE = p[-S + 1], NN = p[-2 * S],
        NNE = p[-2 * S + 1];
    return iabs(W - NW) + iabs(N - NW) + iabs(N - NE) + iabs(W - WW) + iabs(N - NN) + iabs(NE - NNE);
}

/* ------------------------------------------------------------------ model */

typedef struct {
    int ver;
    int nn, K, shift;
    const int32_t *thr;    /* K-1 ascending thresholds on activity */
    const int32_t *coef;   /* K * nn fixed-point coefficients (2^-shift) */
} Params;

typedef struct { int32_t sum, cnt; } Bias;

/* the state of one predictor class (contexts that are multiplied by the class) */
typedef struct {
    Bias bias[64][NQB];  /* texture pattern x coarse energy */
    Prob zero3[NQB][3];
    Prob big3[20][NQB];
    Prob mant3[20][2];
    Prob sign3[4][4];
} ClassModel;

typedef struct {
    Prob zero[NQ][4];
    Prob big[NQ][20];
    Prob mant[20][NQB][4];
    Prob low[20][20];
    Prob sign[3][3][NQB];
    /* version 2: second and third models and the mixers */
    Prob zero2[12][12][3];
    Prob big2[20][12][12];
    Prob mant2[20][2][12][12];
    Prob sign2[3][3][3][3];
    Mixer mzero[NQ];
    Mixer mbig[20][NQB];
    Mixer mmant[20][4];
    Mixer msign[NQB];
    ClassModel cm[];  /* K of them: memory and set-up grow with the classes a frame uses */
} Model;

/* The model's size with n class models. */
static size_t model_size(int n) { return sizeof(Model) + (size_t)n * sizeof(ClassModel); }

/* A fresh model with n class models (n = P->K, or MAXK for a model that continues). */
static Model *model_new(int n) {
    Model *m = (Model *)malloc(model_size(n));
    if (!m) return NULL;
    prob_init(&m->zero[0][0], sizeof(m->zero) / sizeof(Prob));
    prob_init(&m->big[0][0], sizeof(m->big) / sizeof(Prob));
    prob_init(&m->mant[0][0][0], sizeof(m->mant) / sizeof(Prob));
    prob_init(&m->low[0][0], sizeof(m->low) / sizeof(Prob));
    prob_init(&m->sign[0][0][0], sizeof(m->sign) / sizeof(Prob));
    prob_init(&m->zero2[0][0][0], sizeof(m->zero2) / sizeof(Prob));
    prob_init(&m->big2[0][0][0], sizeof(m->big2) / sizeof(Prob));
    prob_init(&m->mant2[0][0][0][0], sizeof(m->mant2) / sizeof(Prob));
    prob_init(&m->sign2[0][0][0][0], sizeof(m->sign2) / sizeof(Prob));
    mixer_init(&m->mzero[0], sizeof(m->mzero) / sizeof(Mixer));
    mixer_init(&m->mbig[0][0], sizeof(m->mbig) / sizeof(Mixer));
    mixer_init(&m->mmant[0][0], sizeof(m->mmant) / sizeof(Mixer));
    mixer_init(&m->msign[0], sizeof(m->msign) / sizeof(Mixer));
    for (int k = 0; k < n; k++) {
        ClassModel *cm = &m->cm[k];
        memset(cm->bias, 0, sizeof(cm->bias));
        prob_init(&cm->zero3[0][0], sizeof(cm->zero3) / sizeof(Prob));
        prob_init(&cm->big3[0][0], sizeof(cm->big3) / sizeof(Prob));
        prob_init(&cm->mant3[0][0], sizeof(cm->mant3) / sizeof(Prob));
        prob_init(&cm->sign3[0][0], sizeof(cm->sign3) / sizeof(Prob));
    }
    return m;
}

/* The model a frame is coded with: fresh, or (version 3) a copy of the state the previous frame
 * of the same object left, so that a multi-frame object's later frames start adapted. */
static Model *model_for(const Params *P, const uint8_t *state_in, int carry) {
    if (!carry) return model_new(P->K);
    if (!state_in) return model_new(MAXK);
    Model *m = (Model *)malloc(model_size(MAXK));
    if (m) memcpy(m, state_in, model_size(MAXK));
    return m;
}

static int code_image(Img *im, int bits, const Params *P, Coder *c, const int32_t *src, Model *m) {
    const int H = im->H, W = im->W, S = im->S;
    const int maxv = (1 << bits) - 1;
    int off[MAXNN];
    for (int i = 0; i < P->nn; i++) off[i] = OFF[i][0] * S + OFF[i][1];
    /* class of each small activity value, as the threshold scan below finds it (with one or
     * two classes the scan is as cheap as the table) */
    uint8_t cls_of[CLS_LUT];
    const int nlut = P->K <= 2 ? 0 : 6 * maxv + 1 < CLS_LUT ? 6 * maxv + 1 : CLS_LUT;
    for (int a = 0, k = 0; a < nlut; a++) {
        while (k < P->K - 1 && a > P->thr[k]) k++;
        cls_of[a] = (uint8_t)k;
    }
    const int v2 = P->ver >= 2;
    const int LIM = P->ver >= 2 ? 1000 : 255;
    const int sh = P->shift;

    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) {
            int32_t *p = PX(im, y, x);
            int32_t *e = EX(im, y, x);
            int pred16;           /* prediction in 1/16 units */
            int cls = 0, tex = 0, act = 0, corr = 0;
            int full = (y > 0 && x > 0);
            if (!full) {
                int v = (y == 0 && x == 0) ? (1 << (bits - 1)) : (y == 0 ? p[-1] : p[-S]);
                pred16 = v * 16;
            } else {
                int a = act = activity(p, S);
                if (a < nlut) cls = cls_of[a];
                else while (cls < P->K - 1 && a > P->thr[cls]) cls++;
                const int32_t *cf = P->coef + cls * P->nn;
                int64_t acc = 0;
                for (int i = 0; i < P->nn; i++) acc += (int64_t)cf[i] * p[off[i]];
                pred16 = (int)((acc + ((int64_t)1 << (sh - 5))) >> (sh - 4));
                int lo = -16 * 8, hi = (maxv + 8) * 16;
                if (pred16 < lo) pred16 = lo; else if (pred16 > hi) pred16 = hi;
            }
            /* error energy context */
            int E = 3 * iabs(e[-1]) + 3 * iabs(e[-S]) + 2 * iabs(e[-S - 1]) + 2 * iabs(e[-S + 1]) +
                    iabs(e[-2]) + iabs(e[-2 * S]) + iabs(e[-S - 2]) + iabs(e[-S + 2]);
            E += act / 2;  /* act is 0 where !full */
            int q = qlog((uint32_t)E);
            if (q >= NQ) q = NQ - 1;
            int qb = q / 4;
            if (qb >= NQB) qb = NQB - 1;
            /* bias cancellation */
            if (full) {
                int pv = pred16 >> 4;
                tex = (p[-1] > pv) | ((p[-S] > pv) << 1) | ((p[-S - 1] > pv) << 2) |
                      ((p[-S + 1] > pv) << 3) | ((p[-2] > pv) << 4) | ((p[-2 * S] > pv) << 5);
                int32_t bs = m->cm[cls].bias[tex][qb].sum, bc = m->cm[cls].bias[tex][qb].cnt;
                if (bc > 0) {
                    corr = bs >= 0 ? (bs + bc / 2) / bc : -((-bs + bc / 2) / bc);
                    pred16 += corr;
                }
            }
            int pred = (pred16 + 8) >> 4;
            if (pred < 0) pred = 0; else if (pred > maxv) pred = maxv;

            /* residual */
            int val = c->dec ? 0 : src[(int64_t)y * W + x];
            int r = val - pred;
            int mag = iabs(r);
            int sg = r < 0;
            int ez = (e[-1] > 0) - (e[-1] < 0) + 1, nz = (e[-S] > 0) - (e[-S] < 0) + 1;
            int zc = (pred == 0) ? 1 : (pred == maxv ? 2 : 0);
            /* version 2 side contexts: the two nearest residuals, the class and local texture */
            int qw = qlog((uint32_t)iabs(e[-1])), qn = qlog((uint32_t)iabs(e[-S]));
            if (qw > 11) qw = 11;
            if (qn > 11) qn = 11;
            int qd = qlog((uint32_t)(iabs(e[-S - 1]) + iabs(e[-S + 1]) + iabs(e[-2]) + iabs(e[-2 * S])));
            int qd3 = qd / 2 > NQB - 1 ? NQB - 1 : qd / 2;
            int isz;
            if (v2) isz = code_mix(c, &m->zero[q][zc], &m->zero2[qw][qn][zc], &m->cm[cls].zero3[qd3][zc],
                                   &m->mzero[q], LIM, mag == 0);
            else isz = code_bit(c, &m->zero[q][zc], LIM, mag == 0);
            int M = 0;
            if (!isz) {
                int maxk = bits + 1;  /* magnitude < 2^bits */
                int k = 1;            /* M in [2^(k-1), 2^k) */
                while (k < maxk - 1 && k < 19) {
                    int bit = mag >= (1 << k);
                    if (v2) bit = code_mix(c, &m->big[q][k], &m->big2[k][qw][qn], &m->cm[cls].big3[k][qd3],
                                           &m->mbig[k][qb], LIM, bit);
                    else bit = code_bit(c, &m->big[q][k], LIM, bit);
                    if (!bit) break;
                    k++;
                }
                M = 1;
                for (int b = k - 2; b >= 0; b--) {
                    int bit = (mag >> b) & 1;
                    int pos = k - 2 - b;
                    if (pos < 2) {
                        if (v2) bit = code_mix(c, &m->mant[k][qb][pos * 2 + (M & 1)],
                                               &m->mant2[k][pos][qw][qn], &m->cm[cls].mant3[k][pos],
                                               &m->mmant[k][pos * 2 + (M & 1)], LIM, bit);
                        else bit = code_bit(c, &m->mant[k][qb][pos * 2 + (M & 1)], LIM, bit);
                    }
                    else bit = code_bit(c, &m->low[k][b < 19 ? b : 19], LIM, bit);
                    M = 2 * M + bit;
                }
                if (zc == 1) sg = 0;
                else if (zc == 2) sg = 1;
                else if (v2) {
                    int ewz = (e[-2] > 0) - (e[-2] < 0) + 1, nwz = (e[-S - 1] > 0) - (e[-S - 1] < 0) + 1;
                    int frac = ((pred16 - 8) & 15) >> 2;   /* where the prediction fell in its bin */
                    int kk = k > 3 ? 3 : k;
                    sg = code_mix(c, &m->sign[ez][nz][qb], &m->sign2[ez][nz][ewz][nwz],
                                  &m->cm[cls].sign3[frac][kk], &m->msign[qb], LIM, sg);
                }
                else sg = code_bit(c, &m->sign[ez][nz][qb], LIM, sg);
                r = sg ? -M : M;
            } else {
                r = 0;
            }
            int v = pred + r;
            if (c->dec) {
                if (v < 0 || v > maxv) return -2;
                *p = v;
            } else {
                *p = v;
            }
            /* update */
            if (full) {
                int err16 = v * 16 - (pred16 - 0);
                /* accumulate error of the uncorrected prediction, halve periodically */
                int32_t *bs = &m->cm[cls].bias[tex][qb].sum, *bc = &m->cm[cls].bias[tex][qb].cnt;
                *bs += err16 + corr;  /* corr: the correction applied above (0 when bc was 0) */
                *bc += 1;
                if (*bc >= 64) { *bs = *bs >= 0 ? *bs / 2 : -((-*bs) / 2); *bc /= 2; }
            }
            *e = r;
            if (x == 0) pad_left(im, y);
        }
        pad_row_done(im, y);
    }
    return 0;
}

/* ------------------------------------------------------------------ exported API */

/* fill the constant tables; called once by the loader, before any other entry point */
void mz_init(void) { init_tables(); }

#ifndef MZ_SOURCE_SHA256
#define MZ_SOURCE_SHA256 ""
#endif
/* sha256 of this file as setup.py built it: the loader refuses a core built from another. */
const char *mz_source_sha256(void) { return MZ_SOURCE_SHA256; }

/* ------------------------------------------------------------------ encoder-side fit */

/* The fit is floating point, but it only chooses the integer coefficients that the stream
 * stores, so it is outside the probability path.  It is still deterministic (plain IEEE double
 * arithmetic in a fixed order, no contraction, no libm): the same frame gives the same stream
 * everywhere. */

/* the padded frame as the coder sees it once every pixel is known */
static int img_fill(Img *im, const uint16_t *img, int H, int W) {
    if (img_alloc(im, H, W)) return -1;
    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) *PX(im, y, x) = img[(int64_t)y * W + x];
        pad_left(im, y);
        pad_row_done(im, y);
    }
    return 0;
}

/* The fit's samples: every step-th of the (H-1) x (W-1) pixels with y, x >= 1, raster order. */
static int64_t sample_count(int H, int W, int64_t step) {
    return ((int64_t)(H - 1) * (W - 1) + step - 1) / step;
}

/* a[k]-th smallest of a[0..n) (a is reordered) */
static double select_kth(double *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        double pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) { double t = a[i]; a[i] = a[j]; a[j] = t; i++; j--; }
        }
        if (k <= j) hi = j; else if (k >= i) lo = i; else break;
    }
    return a[k];
}

/* median as numpy computes it (mean of the two middle values for an even count) */
static double median(double *a, int64_t n) {
    double hi = select_kth(a, n, n / 2);
    if (n & 1) return hi;
    double lo = a[0];  /* the largest of the lower half */
    for (int64_t i = 1; i < n / 2; i++) if (a[i] > lo) lo = a[i];
    return (lo + hi) / 2;
}

/* solve A c = b for symmetric positive definite A (n x n, row-major; only the lower triangle
 * is read) by an LDL^T factorisation; 0, or -1 when A is not positive definite */
static int solve_spd(const double *A, const double *b, int n, double *c) {
    double L[MAXNN][MAXNN], D[MAXNN], z[MAXNN];
    for (int j = 0; j < n; j++) {
        double d = A[j * n + j];
        for (int k = 0; k < j; k++) d -= L[j][k] * L[j][k] * D[k];
        if (!(d > 0)) return -1;
        D[j] = d;
        for (int i = j + 1; i < n; i++) {
            double v = A[i * n + j];
            for (int k = 0; k < j; k++) v -= L[i][k] * L[j][k] * D[k];
            L[i][j] = v / d;
        }
    }
    for (int i = 0; i < n; i++) {
        double v = b[i];
        for (int k = 0; k < i; k++) v -= L[i][k] * z[k];
        z[i] = v;
    }
    for (int i = n - 1; i >= 0; i--) {
        double v = z[i] / D[i];
        for (int k = i + 1; k < n; k++) v -= L[k][i] * c[k];
        c[i] = v;
    }
    for (int i = 0; i < n; i++) if (!isfinite(c[i])) return -1;
    return 0;
}

/* The samples of one class are stored in blocks of GB: block t holds, feature by feature, the
 * GB values of each of the nn taps and then y (X[t][i][s], i = nn is y); the last block is
 * zero-padded.  Sums over a block run in 4 interleaved partial sums, so the compiler can keep
 * them in vector registers without reordering any addition. */
#define GB 64

static inline double *gblock(double *X, int64_t t, int nn) { return X + t * (nn + 1) * GB; }

/* |y - X c| of the m samples of one class */
static void abs_residuals(double *X, int64_t m, int nn, const double *c, double *r) {
    double v[GB];
    for (int64_t t = 0; t * GB < m; t++) {
        const double *blk = gblock(X, t, nn);
        for (int s = 0; s < GB; s++) v[s] = blk[nn * GB + s];
        for (int i = 0; i < nn; i++)
            for (int s = 0; s < GB; s++) v[s] -= blk[i * GB + s] * c[i];
        const int64_t n = m - t * GB < GB ? m - t * GB : GB;
        for (int s = 0; s < n; s++) r[t * GB + s] = v[s] < 0 ? -v[s] : v[s];
    }
}

/* the four sums u0.v0, u0.v1, u1.v0, u1.v1 over a block, each in two interleaved partial sums */
static inline void block_dot2x2(const double *u0, const double *u1, const double *v0,
                                const double *v1, double out[4]) {
    double a[4][2] = {{0}};
    for (int s = 0; s < GB; s += 2) {
        for (int h = 0; h < 2; h++) {
            a[0][h] += u0[s + h] * v0[s + h];
            a[1][h] += u0[s + h] * v1[s + h];
            a[2][h] += u1[s + h] * v0[s + h];
            a[3][h] += u1[s + h] * v1[s + h];
        }
    }
    for (int q = 0; q < 4; q++) out[q] = a[q][0] + a[q][1];
}

/* lower triangle of X^T W X (row-major nn x nn) and X^T W y of the m samples, weights w */
static void normal_equations(double *X, int64_t m, int nn, const double *w, double *A, double *b) {
    double wx[MAXNN + 2][GB];
    const double zero[GB] = {0};
    for (int64_t t = 0; t * GB < m; t++) {
        const double *blk = gblock(X, t, nn);
        const int64_t n = m - t * GB < GB ? m - t * GB : GB;
        for (int i = 0; i < nn; i++) {
            const double *xi = blk + i * GB;
            for (int s = 0; s < n; s++) wx[i][s] = w[t * GB + s] * xi[s];
            for (int s = (int)n; s < GB; s++) wx[i][s] = 0;
        }
        /* rows i, i+1 against columns j, j+1 (and y); a tile on the diagonal also computes the
         * upper entry A[i][i+1], which is never read */
        for (int i = 0; i < nn; i += 2) {
            const double *u1 = i + 1 < nn ? wx[i + 1] : zero;
            double o[4];
            for (int j = 0; j <= i; j += 2) {
                const double *v1 = j + 1 < nn ? blk + (j + 1) * GB : zero;
                block_dot2x2(wx[i], u1, blk + j * GB, v1, o);
                A[i * nn + j] += o[0];
                if (j + 1 < nn) A[i * nn + j + 1] += o[1];
                if (i + 1 < nn) {
                    A[(i + 1) * nn + j] += o[2];
                    if (j + 1 < nn) A[(i + 1) * nn + j + 1] += o[3];
                }
            }
            block_dot2x2(wx[i], u1, blk + nn * GB, zero, o);
            b[i] += o[0];
            if (i + 1 < nn) b[i + 1] += o[2];
        }
    }
}

/* IRLS weights 1 / (|r| + max(0.5, median |r|)): an approximate L1 fit, robust to edges */
static void irls_weights(double *r, double *tmp, int64_t m, double *w) {
    memcpy(tmp, r, sizeof(double) * (size_t)m);
    double med = median(tmp, m);
    double floor_ = med > 0.5 ? med : 0.5;
    for (int64_t s = 0; s < m; s++) w[s] = 1.0 / (r[s] + floor_);
}

/* Choose the class thresholds and fit one nn-tap predictor per class on the samples.
 *
 * The K-1 thresholds are the activities of rank floor((n-1) * k/K), k = 1..K-1, among the n
 * samples (numpy's "lower" quantiles), without repeats and below the largest activity; they
 * are written to thr and the number of classes they make is returned (or < 0: no memory, bad
 * arguments).  Each class's predictor is fitted by iteratively reweighted least squares with
 * `solves` solves, ridge-regularised towards dflt; a class with fewer than 8*nn samples keeps
 * dflt.  Warm start: when hint_K, the number of classes of the hint in coef[hint_K * nn], equals
 * the classes chosen, each class starts from the hint instead (its first weights come from the
 * hint's residuals) and takes warm_solves solves.  coef[K * nn] receives the coefficients. */
int mz_fit(const uint16_t *img, int H, int W, int64_t step, int nn, int K, int hint_K, int solves,
           int warm_solves, const double *dflt, double *coef, int32_t *thr) {
    if (H < 2 || W < 2 || step < 1 || nn < 1 || nn > MAXNN || K < 1 || K > MAXK) return -3;
    Img im;
    if (img_fill(&im, img, H, W)) return -1;
    const int64_t n = sample_count(H, W, step);
    int off[MAXNN];
    for (int i = 0; i < nn; i++) off[i] = OFF[i][0] * im.S + OFF[i][1];
    int32_t *act = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    int64_t *pos = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);   /* sample offsets in v */
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    int64_t start[MAXK + 1] = {0};
    int rc = -1;
    double *X = NULL, *w = NULL, *r = NULL, *tmp = NULL;
    if (!act || !pos || !order) goto done;
    int32_t amax = 0;
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = i * step;
        const int32_t *p = PX(&im, (int)(j / (W - 1)) + 1, (int)(j % (W - 1)) + 1);
        pos[i] = p - im.v;
        act[i] = activity(p, im.S);
        if (act[i] > amax) amax = act[i];
    }
    int nthr = 0;
    if (K > 1) {
        tmp = (double *)malloc(sizeof(double) * (size_t)n);
        if (!tmp) goto done;
        for (int64_t i = 0; i < n; i++) tmp[i] = act[i];
        int64_t from = 0;
        for (int k = 1; k < K; k++) {
            /* ranks rise with k: the k-th selection only reorders what lies above the last */
            const int64_t rank = (int64_t)((double)(n - 1) * ((double)k / K));
            const int32_t t = (int32_t)select_kth(tmp + from, n - from, rank - from);
            from = rank;
            if (t < amax && (nthr == 0 || t != thr[nthr - 1])) thr[nthr++] = t;
        }
        free(tmp);
        tmp = NULL;
    }
    K = nthr + 1;
    uint8_t *cls = (uint8_t *)act;  /* the activities are no longer needed */
    for (int64_t i = 0; i < n; i++) {
        int a = act[i], k = 0;
        while (k < K - 1 && a > thr[k]) k++;
        cls[i] = (uint8_t)k;
        start[k + 1]++;
    }
    int64_t most = 0;
    for (int k = 0; k < K; k++) {
        if (start[k + 1] > most) most = start[k + 1];
        start[k + 1] += start[k];
    }
    {
        int64_t fill[MAXK];
        memcpy(fill, start, sizeof(fill));
        for (int64_t i = 0; i < n; i++) order[fill[cls[i]]++] = pos[i];  /* stable, by class */
    }
    const int warm = hint_K == K;
    if (!warm)
        for (int k = 0; k < K; k++) memcpy(coef + (int64_t)k * nn, dflt, sizeof(double) * nn);
    X = (double *)malloc(sizeof(double) * (size_t)((most + GB - 1) / GB * GB * (nn + 1) + 1));
    w = (double *)malloc(sizeof(double) * (size_t)(most + 1));
    r = (double *)malloc(sizeof(double) * (size_t)(most + 1));
    tmp = (double *)malloc(sizeof(double) * (size_t)(most + 1));
    if (!X || !w || !r || !tmp) goto done;
    for (int k = 0; k < K; k++) {
        const int64_t m = start[k + 1] - start[k];
        double *c = coef + (int64_t)k * nn;
        if (m < 8 * nn) {
            memcpy(c, dflt, sizeof(double) * nn);
            continue;
        }
        memset(X, 0, sizeof(double) * (size_t)((m + GB - 1) / GB * GB * (nn + 1)));
        for (int64_t s = 0; s < m; s++) {
            const int32_t *p = im.v + order[start[k] + s];
            double *x = gblock(X, s / GB, nn) + s % GB;
            for (int i = 0; i < nn; i++) x[i * GB] = p[off[i]];
            x[nn * GB] = p[0];
        }
        if (warm) {
            abs_residuals(X, m, nn, c, r);
            irls_weights(r, tmp, m, w);
        } else {
            for (int64_t s = 0; s < m; s++) w[s] = 1.0;
        }
        const int nsolve = warm ? warm_solves : solves;
        for (int it = 0; it < nsolve; it++) {
            double A[MAXNN * MAXNN] = {0}, b[MAXNN] = {0}, sol[MAXNN];
            normal_equations(X, m, nn, w, A, b);
            double trace = 0;
            for (int i = 0; i < nn; i++) trace += A[i * nn + i];
            double reg = 1e-7 * trace / nn + 1e-9;
            for (int i = 0; i < nn; i++) {
                A[i * nn + i] += reg;
                b[i] += reg * dflt[i];
            }
            if (solve_spd(A, b, nn, sol)) break;
            memcpy(c, sol, sizeof(double) * nn);
            if (it + 1 < nsolve) {
                abs_residuals(X, m, nn, c, r);
                irls_weights(r, tmp, m, w);
            }
        }
    }
    rc = K;
done:
    free(act); free(pos); free(order); free(X); free(w); free(r); free(tmp);
    img_free(&im);
    return rc;
}

static int check_params(int ver, int H, int W, int bits, int nn, int K, int shift) {
    if (ver < 1 || ver > 3) return -3;
    if (H < 1 || W < 1 || bits < 1 || bits > 16) return -3;
    if (nn < 1 || nn > MAXNN || K < 1 || K > MAXK || shift < 5 || shift > 24) return -3;
    return 0;
}

/* final (may be NULL): receives x1, x2 of the last interval, before the flush writes x1.  Any
 * value in [x1, x2] flushed instead decodes the same (see mz_decode's final). */
int64_t mz_state_size(void) { return (int64_t)model_size(MAXK); }

/* Cap every probability's hit count at cap and halve each bias accumulator until its count is
 * at most cap, in place (state: mz_state_size() bytes): a model state made into a prior that the
 * frames coded from it still adapt quickly (a count of n moves a probability by 1/(n+2) per
 * bit). Integer only; part of a prior's definition (medzip_scp.codec.predictive.prior). */
static void cap_counts(Prob *t, size_t n, int cap) {
    for (size_t i = 0; i < n; i++) if (t[i].n > cap) t[i].n = (uint16_t)cap;
}
#define CAP_COUNTS(a) cap_counts((Prob *)(a), sizeof(a) / sizeof(Prob), cap)
void mz_state_soften(uint8_t *state, int cap) {
    Model *m = (Model *)state;
    CAP_COUNTS(m->zero); CAP_COUNTS(m->big); CAP_COUNTS(m->mant); CAP_COUNTS(m->low);
    CAP_COUNTS(m->sign); CAP_COUNTS(m->zero2); CAP_COUNTS(m->big2); CAP_COUNTS(m->mant2);
    CAP_COUNTS(m->sign2);
    for (int k = 0; k < MAXK; k++) {
        ClassModel *cm = &m->cm[k];
        CAP_COUNTS(cm->zero3); CAP_COUNTS(cm->big3); CAP_COUNTS(cm->mant3); CAP_COUNTS(cm->sign3);
        for (int i = 0; i < 64; i++)
            for (int j = 0; j < NQB; j++) {
                Bias *b = &cm->bias[i][j];
                while (b->cnt > cap) { b->sum = b->sum >= 0 ? b->sum / 2 : -((-b->sum) / 2); b->cnt /= 2; }
            }
    }
}

/* Version 3 continues a model: it starts from state_in (NULL: fresh) and leaves its final state
 * in state_out (NULL: not kept); both are mz_state_size() bytes.  Versions 1, 2 ignore them. */
int64_t mz_encode(int ver, const uint16_t *img, int H, int W, int bits, int nn, int K, int shift,
                  const int32_t *thr, const int32_t *coef, uint8_t *out, int64_t cap,
                  uint32_t *final, const uint8_t *state_in, uint8_t *state_out) {
    init_tables();
    if (check_params(ver, H, W, bits, nn, K, shift)) return -3;
    Params P = {ver, nn, K, shift, thr, coef};
    Img im;
    if (img_alloc(&im, H, W)) return -1;
    int32_t *src = (int32_t *)malloc(sizeof(int32_t) * (size_t)H * W);
    Model *m = model_for(&P, state_in, ver >= 3);
    if (!src || !m) { free(src); free(m); img_free(&im); return -1; }
    for (int64_t i = 0; i < (int64_t)H * W; i++) src[i] = img[i];
    Coder c = {0, 0xffffffffu, 0, out, 0, cap, 0, 0};
    int rc = code_image(&im, bits, &P, &c, src, m);
    if (rc == 0 && ver >= 3 && state_out) memcpy(state_out, m, model_size(MAXK));
    free(m);
    free(src);
    img_free(&im);
    if (rc) return rc;
    if (final) { final[0] = c.x1; final[1] = c.x2; }
    for (int i = 0; i < 4; i++) { out_byte(&c, (uint8_t)(c.x1 >> 24)); c.x1 <<= 8; }
    if (c.overflow) return -4;
    return c.pos;
}

/* final (may be NULL): receives x1, x2 of the last interval and the window x (for a stream as the
 * encoder wrote it: its last 4 bytes, the flush, and x1 <= x <= x2). */
int mz_decode(int ver, const uint8_t *data, int64_t len, int H, int W, int bits, int nn, int K, int shift,
              const int32_t *thr, const int32_t *coef, uint16_t *img, uint32_t *final,
              const uint8_t *state_in, uint8_t *state_out) {
    init_tables();
    if (check_params(ver, H, W, bits, nn, K, shift)) return -3;
    Params P = {ver, nn, K, shift, thr, coef};
    Img im;
    if (img_alloc(&im, H, W)) return -1;
    Model *m = model_for(&P, state_in, ver >= 3);
    if (!m) { img_free(&im); return -1; }
    Coder c = {0, 0xffffffffu, 0, (uint8_t *)data, 0, len, 1, 0};
    for (int i = 0; i < 4; i++) c.x = (c.x << 8) | in_byte(&c);
    int rc = code_image(&im, bits, &P, &c, NULL, m);
    if (rc == 0 && ver >= 3 && state_out) memcpy(state_out, m, model_size(MAXK));
    free(m);
    if (rc == 0) {
        for (int y = 0; y < H; y++)
            for (int x = 0; x < W; x++) img[(int64_t)y * W + x] = (uint16_t)*PX(&im, y, x);
        /* the encoder flushed 4 bytes; reading well past the end means a truncated stream */
        if (c.pos > len + 4) rc = -5;
        if (final) { final[0] = c.x1; final[1] = c.x2; final[2] = c.x; }
    }
    img_free(&im);
    return rc;
}
