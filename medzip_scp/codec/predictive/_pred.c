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
static int RECIP[1024];
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
    s->p = (uint16_t)((int)s->p + (int)(((int64_t)d * RECIP[s->n]) >> 16));
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
    s->p = (uint16_t)((int)s->p + (int)(((int64_t)d * RECIP[s->n]) >> 16));
    if (s->n < limit) s->n++;
}

/* code one decision with the mixed prediction of three adaptive models */
static inline int code_mix(Coder *c, Prob *a, Prob *b, Prob *d, Mixer *mx, int limit, int bit) {
    int st[NI];
    st[0] = STRETCH[a->p >> 4];
    st[1] = STRETCH[b->p >> 4];
    st[2] = STRETCH[d->p >> 4];
    st[3] = 256;
    int64_t dot = 0;
    for (int i = 0; i < NI; i++) dot += (int64_t)mx->w[i] * st[i];
    int pr = squash((int)(dot >> 16));
    uint32_t p16 = (uint32_t)pr * 16 + 8;
    if (p16 < 32) p16 = 32; else if (p16 > 65536 - 32) p16 = 65536 - 32;
    bit = code_raw(c, p16, bit);
    int err = ((bit << 12) - pr) * 6;
    for (int i = 0; i < NI; i++) mx->w[i] += (st[i] * err + 0x2000) >> 14;
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

static int code_image(Img *im, int bits, const Params *P, Coder *c, const int32_t *src) {
    const int H = im->H, W = im->W, S = im->S;
    const int maxv = (1 << bits) - 1;
    int off[MAXNN];
    for (int i = 0; i < P->nn; i++) off[i] = OFF[i][0] * S + OFF[i][1];
    Model *m = (Model *)malloc(sizeof(Model) + (size_t)P->K * sizeof(ClassModel));
    if (!m) return -1;
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
    for (int k = 0; k < P->K; k++) {
        ClassModel *cm = &m->cm[k];
        memset(cm->bias, 0, sizeof(cm->bias));
        prob_init(&cm->zero3[0][0], sizeof(cm->zero3) / sizeof(Prob));
        prob_init(&cm->big3[0][0], sizeof(cm->big3) / sizeof(Prob));
        prob_init(&cm->mant3[0][0], sizeof(cm->mant3) / sizeof(Prob));
        prob_init(&cm->sign3[0][0], sizeof(cm->sign3) / sizeof(Prob));
    }
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
                if (v < 0 || v > maxv) { free(m); return -2; }
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
    free(m);
    return 0;
}

/* ------------------------------------------------------------------ exported API */

/* fill the constant tables; called once by the loader, before any other entry point */
void mz_init(void) { init_tables(); }

/* activity of every pixel (encoder side, for choosing classes and fitting predictors) */
int mz_activity(const uint16_t *img, int H, int W, int32_t *act) {
    Img im;
    if (img_alloc(&im, H, W)) return -1;
    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) *PX(&im, y, x) = img[(int64_t)y * W + x];
        pad_left(&im, y);
        pad_row_done(&im, y);
    }
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) act[(int64_t)y * W + x] = activity(PX(&im, y, x), im.S);
    img_free(&im);
    return 0;
}

/* neighbour values of every pixel as the coder sees them: out[(y*W+x)*nn + i] */
int mz_neighbours(const uint16_t *img, int H, int W, int nn, int32_t *out) {
    Img im;
    if (nn > MAXNN) return -3;
    if (img_alloc(&im, H, W)) return -1;
    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) *PX(&im, y, x) = img[(int64_t)y * W + x];
        pad_left(&im, y);
        pad_row_done(&im, y);
    }
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            int32_t *p = PX(&im, y, x);
            int32_t *o = out + ((int64_t)y * W + x) * nn;
            for (int i = 0; i < nn; i++) o[i] = p[OFF[i][0] * im.S + OFF[i][1]];
        }
    img_free(&im);
    return 0;
}

static int check_params(int ver, int H, int W, int bits, int nn, int K, int shift) {
    if (ver < 1 || ver > 2) return -3;
    if (H < 1 || W < 1 || bits < 1 || bits > 16) return -3;
    if (nn < 1 || nn > MAXNN || K < 1 || K > MAXK || shift < 5 || shift > 24) return -3;
    return 0;
}

/* final (may be NULL): receives x1, x2 of the last interval, before the flush writes x1.  Any
 * value in [x1, x2] flushed instead decodes the same (see mz_decode's final). */
int64_t mz_encode(int ver, const uint16_t *img, int H, int W, int bits, int nn, int K, int shift,
                  const int32_t *thr, const int32_t *coef, uint8_t *out, int64_t cap,
                  uint32_t *final) {
    init_tables();
    if (check_params(ver, H, W, bits, nn, K, shift)) return -3;
    Params P = {ver, nn, K, shift, thr, coef};
    Img im;
    if (img_alloc(&im, H, W)) return -1;
    int32_t *src = (int32_t *)malloc(sizeof(int32_t) * (size_t)H * W);
    if (!src) { img_free(&im); return -1; }
    for (int64_t i = 0; i < (int64_t)H * W; i++) src[i] = img[i];
    Coder c = {0, 0xffffffffu, 0, out, 0, cap, 0, 0};
    int rc = code_image(&im, bits, &P, &c, src);
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
              const int32_t *thr, const int32_t *coef, uint16_t *img, uint32_t *final) {
    init_tables();
    if (check_params(ver, H, W, bits, nn, K, shift)) return -3;
    Params P = {ver, nn, K, shift, thr, coef};
    Img im;
    if (img_alloc(&im, H, W)) return -1;
    Coder c = {0, 0xffffffffu, 0, (uint8_t *)data, 0, len, 1, 0};
    for (int i = 0; i < 4; i++) c.x = (c.x << 8) | in_byte(&c);
    int rc = code_image(&im, bits, &P, &c, NULL);
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
