/* Offline packing of quantized weights into the GEMM layout (cuda/packed_layout.cuh): 8-bit
 * symmetric rows (int8 codes, zero point 0) and 4-bit asymmetric ones. Input, the canonical format:
 * 4-bit packed nibbles [N, ceil(K/2)] (low nibble = even k) + zero uint8 [N, G]; 8-bit int8 [N, K];
 * scale float32 [N, G]. One thread writes one 16-byte word of the layout. */
#include "mixllm_cuda.h"
#include "device_guard.cuh"
#include "packed_layout.cuh"
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

struct Geo {
    int64_t N, K, g, G, gp, Kp, qpitch;
};

/* Code of row n at padded column kc, as the kernel will subtract the zero point from it. */
template <int BITS>
__device__ __forceinline__ int code_at(const uint8_t *qw, const uint8_t *zero, const Geo &geo, int64_t n, int64_t kc) {
    if (n >= geo.N) return 0;
    int64_t j = kc / geo.gp, e = kc % geo.gp;
    const bool past = j >= geo.G;
    if (past) j = geo.G - 1;
    const int64_t k = j * geo.g + e;
    const bool valid = !past && e < geo.g && k < geo.K;
    if (BITS == 4) {
        if (!valid) return zero[n * geo.G + j];
        return (qw[n * geo.qpitch + (k >> 1)] >> ((k & 1) * 4)) & 15;
    }
    return valid ? (int)(int8_t)qw[n * geo.qpitch + k] : 0;
}

template <int BITS>
__global__ void pack_kernel(const uint8_t *__restrict__ qw, const uint8_t *__restrict__ zero, Geo geo,
                            uint4 *__restrict__ out, int64_t total) {
    constexpr int VEC = BITS / 4;
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int lane = (int)(i & 31), gid = lane >> 2, tig = lane & 3;
    int64_t r = i >> 5;
    const int v = (int)(r % VEC);
    r /= VEC;
    const int64_t KP2 = geo.Kp / 64, kp = r % KP2, rt = r / KP2;
    const int64_t n0 = rt * 16 + gid, n1 = n0 + 8;
    uint32_t wd[4];
    if (BITS == 4) {
        for (int h = 0; h < 2; h++) {
            const int64_t kb = (2 * kp + h) * 32 + tig * 8;
            uint32_t w0 = 0, w1 = 0;
            for (int b = 0; b < 4; b++) {
                w0 |= (uint32_t)(code_at<4>(qw, zero, geo, n0, kb + b) | code_at<4>(qw, zero, geo, n0, kb + 4 + b) << 4)
                      << (8 * b);
                w1 |= (uint32_t)(code_at<4>(qw, zero, geo, n1, kb + b) | code_at<4>(qw, zero, geo, n1, kb + 4 + b) << 4)
                      << (8 * b);
            }
            wd[2 * h] = w0;
            wd[2 * h + 1] = w1;
        }
    } else {
        const int64_t kb = (2 * kp + v) * 32 + tig * 8;
        for (int f = 0; f < 4; f++) {
            const int64_t n = (f & 1) ? n1 : n0, ko = kb + ((f & 2) ? 4 : 0);
            uint32_t w = 0;
            for (int b = 0; b < 4; b++) w |= (uint32_t)(uint8_t)code_at<8>(qw, zero, geo, n, ko + b) << (8 * b);
            wd[f] = w;
        }
    }
    out[i] = make_uint4(wd[0], wd[1], wd[2], wd[3]);
}

__global__ void meta_kernel(const float *__restrict__ scale, const uint8_t *__restrict__ zero, Geo geo,
                            mixc_layout::MetaRecord *__restrict__ meta, int64_t total) {
    using mixc_layout::TILE_ROWS;
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int64_t j = i % geo.G, rt = i / geo.G;
    mixc_layout::MetaRecord rec;
    for (int r = 0; r < TILE_ROWS; r++) {
        const int64_t n = rt * TILE_ROWS + r;
        rec.scale[r] = n < geo.N ? scale[n * geo.G + j] : 0.f;
        rec.zero[r] = (zero && n < geo.N) ? zero[n * geo.G + j] : 0;
    }
    meta[i] = rec;
}

} // namespace

extern "C" int mixc_pack_weight(int device, int bits, const void *qweight, const float *scale, const uint8_t *zero,
                                int64_t N, int64_t K, int64_t g, void *wpack, void *meta, void *stream_) {
    if ((bits != 4 && bits != 8) || (bits == 4 && !zero) || g <= 0 || K <= 0 || N < 0)
        return (int)cudaErrorInvalidValue;
    DeviceGuard guard(device);
    if (guard.err != cudaSuccess) return (int)guard.err;
    cudaStream_t stream = (cudaStream_t)stream_;
    Geo geo;
    geo.N = N;
    geo.K = K;
    geo.g = g;
    geo.G = mix_ngroups(K, g);
    geo.gp = mixc_gp(g);
    geo.Kp = mixc_kp(K, g);
    geo.qpitch = bits == 4 ? (K + 1) / 2 : K;
    const int64_t NT = (N + 15) / 16;
    const int64_t total = mixc_wpack_bytes(bits, N, K, g) / 16, mtotal = NT * geo.G;
    cudaError_t err = cudaSuccess;
    if (total > 0) {
        const int64_t blocks = (total + 255) / 256, mblocks = (mtotal + 255) / 256;
        if (bits == 4)
            pack_kernel<4>
                <<<(unsigned)blocks, 256, 0, stream>>>((const uint8_t *)qweight, zero, geo, (uint4 *)wpack, total);
        else
            pack_kernel<8>
                <<<(unsigned)blocks, 256, 0, stream>>>((const uint8_t *)qweight, nullptr, geo, (uint4 *)wpack, total);
        err = cudaGetLastError();
        if (err == cudaSuccess) {
            meta_kernel<<<(unsigned)mblocks, 256, 0, stream>>>(scale, bits == 4 ? zero : nullptr, geo,
                                                               (mixc_layout::MetaRecord *)meta, mtotal);
            err = cudaGetLastError();
        }
    }
    return (int)err;
}
