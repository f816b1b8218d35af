/* Host-callable launchers of the CUDA kernels (the .cu files in cuda/), declared for the C module
 * csrc/cuda_module.c. Plain C types only: the module is compiled by the C compiler and
 * never sees a CUDA header. Every launcher runs on `stream` (a cudaStream_t, 0 = legacy
 * default), makes `device` current for the call, and returns 0 or a cudaError_t code
 * (mixc_error_string turns it into text).
 *
 * Padded-K geometry shared by the GEMM, the activation quantizer and the weight packer
 * (see cuda/w4a8.cu): group size g, G = ceil(K/g) groups, each padded to gp columns
 * (gp = g rounded up to a multiple of 128, one pipeline stage; spg = gp/128 stages per
 * group), the padded row length Kp = G*gp. */
#ifndef MIXLLM_CUDA_H
#define MIXLLM_CUDA_H
#include <stdint.h>
#include "groups.h" /* mix_ngroups (csrc/) */
#ifdef __cplusplus
extern "C" {
#endif

#define MIXC_KSTAGE     128 /* padded K per pipeline stage */
#define MIXC_NCFG       13  /* tile configurations, see mixc_cfg_name */
#define MIXC_CFG_SM90   10  /* the sm_90a wgmma + TMA prefill kernel (cuda/w4a8_sm90.cu) */
#define MIXC_CFG_DECODE 11  /* the few-token kernel (cuda/w4a8_decode.cu); its "splits" = warps per row tile */
/* the wgmma kernel's few-token tiles with two consumer warpgroup pairs on alternating stages */
#define MIXC_CFG_SM90_PAIRS 12
/* the planner picks the decode kernel up to this many tokens (measured: slower than the mma.sync tiles
   from 32 on) */
#define MIXC_DECODE_MAX_M 16
/* the planner picks the wgmma kernel on 9.x devices from this many tokens on (its 16-, 32- and
   64-token tiles on layers of at least 4096 x 4096 codes, above 16 tokens from 4096 x 4096 on, from 9
   on larger ones; from 256 tokens on every layer) */
#define MIXC_SM90_MIN_M 9
#define MIXC_MAX_PARTS  2

typedef struct {
    const void *wpack;        /* packed codes (mixc_pack_weight) */
    const void *meta;         /* per (16-row tile, group) scales and zero points */
    const int64_t *out_index; /* [N] output column of each row, or NULL (identity) */
    int64_t N;                /* rows of this part */
    int bits;                 /* 4 or 8 */
} mixc_part;

typedef struct {
    const int8_t *xq; /* [M, Kp] activation codes, padded layout */
    const float *sa;  /* [M, Kp/128] activation scale of each stage */
    int64_t M, Kp;
    int G, spg; /* groups, stages per group (gp / 128) */
    mixc_part parts[MIXC_MAX_PARTS];
    int nparts;
    const float *bias; /* [n_out] or NULL */
    void *y;           /* [M, n_out], dtype ydtype (0 f32, 1 f16, 2 bf16) */
    int ydtype;
    int64_t n_out;
    float *ws; /* [splits, M, n_out] when splits > 1 */
    int cfg, splits;
    int pdl; /* launch the GEMM with programmatic dependent launch where the GPU has it */
} mixc_gemm;

int64_t mixc_gp(int64_t g);
int64_t mixc_kp(int64_t K, int64_t g);
/* Bytes of the packed layout of an [N, K] weight (codes, meta). */
int64_t mixc_wpack_bytes(int bits, int64_t N, int64_t K, int64_t g);
int64_t mixc_meta_bytes(int64_t N, int64_t K, int64_t g);

/* x [M, K] (dtype 0 f32, 1 f16, 2 bf16) -> q [M, qpitch] int8 and scales sa [M, sapitch].
 * Group j's codes go to columns j*gp .. j*gp+len-1 and zeros fill the rest of its gp columns
 * (and, in the padded layout, columns G*gp .. qpitch-1); its scale goes to sa[j*spg .. j*spg+spg-1]
 * (and to the trailing sa columns). gp = g, spg = 1 gives the plain [M, K] / [M, G] format;
 * gp = mixc_gp(g), spg = gp/128, qpitch = Kp, sapitch = Kp/128 the GEMM's padded one. */
int mixc_act_quant(int device, const void *x, int dtype, int64_t M, int64_t K, int64_t g, int64_t gp, int8_t *q,
                   int64_t qpitch, int spg, float *sa, int64_t sapitch, void *stream);
/* The same for the down projection of a gated MLP: gu [M, 2K] (gate columns, then up columns), the values
 * quantized silu(gate) * up as PyTorch's eager ops give them in gu's dtype (silu rounded to it, then the
 * product). Only the default geometry (mixc_act_quant_silu_mul_ok: g = 128, K a multiple of 8). */
int mixc_act_quant_silu_mul(int device, const void *gu, int dtype, int64_t M, int64_t K, int64_t g, int64_t gp,
                            int8_t *q, int64_t qpitch, int spg, float *sa, int64_t sapitch, void *stream);
int mixc_act_quant_silu_mul_ok(int64_t K, int64_t g);
/* The same for a projection fed by a Llama-style RMSNorm: x [M, K] the norm's input, w [K] its weight
 * (x's dtype), the values quantized w * rmsnorm(x) as Hugging Face's LlamaRMSNorm gives them on x's
 * dtype (the float32 sum of squares taken in another order: docs/kernels.md). Only the default geometry
 * with K <= 32768 (mixc_act_quant_rmsnorm_ok); x and w 16-byte aligned. */
int mixc_act_quant_rmsnorm(int device, const void *x, const void *w, float eps, int dtype, int64_t M, int64_t K,
                           int64_t g, int64_t gp, int8_t *q, int64_t qpitch, int spg, float *sa, int64_t sapitch,
                           void *stream);
int mixc_act_quant_rmsnorm_ok(int64_t K, int64_t g);

/* Canonical weight (4-bit: packed nibbles uint8 [N, ceil(K/2)] + zero uint8 [N, G];
 * 8-bit: int8 [N, K]; scale float32 [N, G]) -> the GEMM layout. */
int mixc_pack_weight(int device, int bits, const void *qweight, const float *scale, const uint8_t *zero, int64_t N,
                     int64_t K, int64_t g, void *wpack, void *meta, void *stream);

/* Tile configuration and split-K factor for M tokens over the parts' rows (forced when
 * cfg >= 0 / splits > 0). Returns 0, or -1 for an invalid forced value. */
int mixc_plan(int device, int64_t M, const int64_t *Ns, int nparts, int64_t Kp, int cfg, int splits, int *cfg_out,
              int *splits_out);
const char *mixc_cfg_name(int cfg);

int mixc_qlinear(int device, mixc_gemm *g, void *stream);
/* The wgmma path (cuda/w4a8_sm90.cu): 1 when device is 9.x and runs the sm_90a build of the
 * kernel, else 0; its launcher, called by mixc_qlinear for cfg MIXC_CFG_SM90 and MIXC_CFG_SM90_PAIRS.  */
int mixc_sm90_ok(int device);
int mixc_qlinear_sm90(int device, const mixc_gemm *g, void *stream);
/* The wgmma kernel's token tile at M tokens when it is a few-token one (16, 32, 64; else 0), and its
 * CTAs resident per SM with 1 or 2 consumer pairs (MIXC_CFG_SM90 / MIXC_CFG_SM90_PAIRS) */
int mixc_sm90_few_tile(int64_t M);
int mixc_sm90_ctas_per_sm(int64_t M, int pairs);

/* The decode path (cuda/w4a8_decode.cu): tokens per block for M, the most warps per block, a
 * forced "splits" clamped to what M allows, the planned one (warps sharing one 16-row tile's K,
 * reduced in the block, no workspace; MIXC_DECODE_PAIRED + w: two 4-bit tiles per block, w warps
 * each), launcher. */
#define MIXC_DECODE_PAIRED 32
int mixc_decode_tokens_per_block(int64_t M);
int mixc_decode_max_warps(int64_t M);
int mixc_decode_clamp_splits(int64_t M, int splits);
int mixc_decode_warps(int64_t M, const int64_t *Ns, int nparts, int64_t Kp, int sms);
int mixc_qlinear_decode(int device, const mixc_gemm *g, int pdl, void *stream);

const char *mixc_error_string(int err);
/* CUDA devices visible to this process (0 when the driver reports none): csrc/cuda_module.c checks
 * device ordinals it is given against it (cuda/act_quant.cu). */
int mixc_device_count(void);

#ifdef __cplusplus
}
#endif
#endif
