/* int8 kernels for a Cortex-M4, in the plain style of TFLite's reference kernels and
 * CMSIS-NN's int8 API: NHWC activations, OHWI weights (depthwise: 1HWC), int32 bias,
 * one (multiplier, shift) pair per output channel, activations clamped to
 * [act_min, act_max]. Offsets follow TFLite: input_offset = -Z_in, output_offset = Z_out.
 *
 * Requantization is TFLite's default MultiplyByQuantizedMultiplier (two roundings:
 * SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT), bit for bit the same
 * as course_lib.kernels.multiply_by_quantized_multiplier and TFLite Micro.
 *
 * SMLAD variant: conv2d_s8_smlad, kept apart as CMSIS-NN keeps its DSP kernels apart. */
#ifndef COURSE_INT8_KERNELS_H
#define COURSE_INT8_KERNELS_H

#include <stdint.h>

#include <arm_acle.h>

/* Header-only: every kernel is inlined into the layer function that calls it, so the
 * compiler sees that layer's sizes as constants and specialises the loops (no generic
 * loop bookkeeping left at run time). Code grows by one copy per layer. */
#define KERNEL static inline __attribute__((always_inline))

typedef struct {
    int32_t input_offset;   /* -Z_in */
    int32_t output_offset;  /* Z_out */
    int32_t act_min, act_max;
    const int32_t *multiplier;  /* M0 per output channel, in [2^30, 2^31) */
    const int32_t *shift;       /* per output channel: > 0 left, < 0 right */
} quant_params_t;

KERNEL int32_t saturating_rounding_doubling_high_mul(int32_t a, int32_t b) {
    if (a == INT32_MIN && b == INT32_MIN) return INT32_MAX;  /* the one overflow */
    int64_t ab = (int64_t)a * (int64_t)b;
    int64_t nudge = ab >= 0 ? (1LL << 30) : (1 - (1LL << 30));
    return (int32_t)((ab + nudge) / (1LL << 31));  /* C division truncates toward zero */
}

KERNEL int32_t rounding_divide_by_pot(int32_t x, int32_t exponent) {
    int32_t mask = (int32_t)((1LL << exponent) - 1);
    int32_t remainder = x & mask;
    int32_t threshold = (mask >> 1) + (x < 0 ? 1 : 0);
    return (x >> exponent) + (remainder > threshold ? 1 : 0);
}

KERNEL int32_t multiply_by_quantized_multiplier(int32_t x, int32_t multiplier, int32_t shift) {
    int32_t left = shift > 0 ? shift : 0;
    int32_t right = shift > 0 ? 0 : -shift;
    if (left) {  /* only multipliers >= 1; saturate like course_lib (TFLite would overflow) */
        int64_t v = (int64_t)x << left;
        x = v > INT32_MAX ? INT32_MAX : (v < INT32_MIN ? INT32_MIN : (int32_t)v);
    }
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right);
}

KERNEL int8_t requantize_one(int32_t acc, const quant_params_t *q, int channel) {
    /* int64 for the sum: a multiplier near 1 can bring the product near INT32_MIN, and
     * adding the zero point must not wrap around (signed overflow is undefined in C) */
    int64_t v = (int64_t)multiply_by_quantized_multiplier(acc, q->multiplier[channel], q->shift[channel]);
    v += q->output_offset;
    if (v < q->act_min) v = q->act_min;
    if (v > q->act_max) v = q->act_max;
    return (int8_t)v;
}

KERNEL void conv2d_s8(const int8_t *in, int in_h, int in_w, int in_c,
               const int8_t *w, const int32_t *bias, int out_c, int k_h, int k_w,
               int stride, int pad_h, int pad_w, int out_h, int out_w,
               const quant_params_t *q, int8_t *out) {
    for (int oy = 0; oy < out_h; oy++) {
        for (int ox = 0; ox < out_w; ox++) {
            for (int oc = 0; oc < out_c; oc++) {
                int32_t acc = bias ? bias[oc] : 0;
                for (int ky = 0; ky < k_h; ky++) {
                    int iy = oy * stride + ky - pad_h;
                    if (iy < 0 || iy >= in_h) continue;  /* padding: real 0, adds nothing */
                    for (int kx = 0; kx < k_w; kx++) {
                        int ix = ox * stride + kx - pad_w;
                        if (ix < 0 || ix >= in_w) continue;
                        const int8_t *x = in + (iy * in_w + ix) * in_c;
                        const int8_t *f = w + ((oc * k_h + ky) * k_w + kx) * in_c;
                        for (int ic = 0; ic < in_c; ic++) {
                            acc += ((int32_t)x[ic] + q->input_offset) * (int32_t)f[ic];
                        }
                    }
                }
                out[(oy * out_w + ox) * out_c + oc] = requantize_one(acc, q, oc);
            }
        }
    }
}

/* Four int8 values from memory (unaligned access is allowed on a Cortex-M4). */
KERNEL int32_t read_s8x4(const int8_t *p) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}

/* Two output channels at a time: every loaded (and sign-extended) input feeds both, so the
 * input work is shared, as in CMSIS-NN's 2x2 output tiles (which also share the weights
 * between two pixels). Four input channels per step: one 32-bit load, two SXTAB16 (which
 * also add input_offset to both 16-bit halves), then two SMLADs per output channel. */
KERNEL void conv2d_s8_smlad(const int8_t *in, int in_h, int in_w, int in_c,
                            const int8_t *w, const int32_t *bias, int out_c, int k_h, int k_w,
                            int stride, int pad_h, int pad_w, int out_h, int out_w,
                            const quant_params_t *q, int8_t *out) {
    const uint32_t offset2 = ((uint32_t)(uint16_t)q->input_offset << 16) | (uint16_t)q->input_offset;
    const int filter_size = k_h * k_w * in_c;
    for (int oy = 0; oy < out_h; oy++) {
        for (int ox = 0; ox < out_w; ox++) {
            for (int oc = 0; oc < out_c; oc += 2) {
                const int pair = oc + 1 < out_c;  /* an odd last channel runs alone */
                int32_t acc0 = bias ? bias[oc] : 0;
                int32_t acc1 = pair && bias ? bias[oc + 1] : 0;
                for (int ky = 0; ky < k_h; ky++) {
                    int iy = oy * stride + ky - pad_h;
                    if (iy < 0 || iy >= in_h) continue;
                    for (int kx = 0; kx < k_w; kx++) {
                        int ix = ox * stride + kx - pad_w;
                        if (ix < 0 || ix >= in_w) continue;
                        const int8_t *x = in + (iy * in_w + ix) * in_c;
                        const int8_t *f0 = w + ((oc * k_h + ky) * k_w + kx) * in_c;
                        const int8_t *f1 = f0 + filter_size;
                        int ic = 0;
                        for (; pair && ic + 4 <= in_c; ic += 4) {
                            uint32_t xv = (uint32_t)read_s8x4(x + ic);
                            /* bytes 0 and 2, then 1 and 3, as int16 pairs (+ offset for x) */
                            int16x2_t x02 = __sxtab16(offset2, xv);
                            int16x2_t x13 = __sxtab16(offset2, __ror(xv, 8));
                            uint32_t fv0 = (uint32_t)read_s8x4(f0 + ic);
                            uint32_t fv1 = (uint32_t)read_s8x4(f1 + ic);
                            acc0 = __smlad(x02, __sxtb16(fv0), acc0);
                            acc0 = __smlad(x13, __sxtb16(__ror(fv0, 8)), acc0);
                            acc1 = __smlad(x02, __sxtb16(fv1), acc1);
                            acc1 = __smlad(x13, __sxtb16(__ror(fv1, 8)), acc1);
                        }
                        for (; ic < in_c; ic++) {  /* leftover channels (or the odd last one) */
                            int32_t xi = (int32_t)x[ic] + q->input_offset;
                            acc0 += xi * (int32_t)f0[ic];
                            if (pair) acc1 += xi * (int32_t)f1[ic];
                        }
                    }
                }
                out[(oy * out_w + ox) * out_c + oc] = requantize_one(acc0, q, oc);
                if (pair) out[(oy * out_w + ox) * out_c + oc + 1] = requantize_one(acc1, q, oc + 1);
            }
        }
    }
}

KERNEL void depthwise_conv2d_s8(const int8_t *in, int in_h, int in_w, int in_c,
                         const int8_t *w, const int32_t *bias, int depth_multiplier,
                         int k_h, int k_w, int stride, int pad_h, int pad_w, int out_h, int out_w,
                         const quant_params_t *q, int8_t *out) {
    const int out_c = in_c * depth_multiplier;
    for (int oy = 0; oy < out_h; oy++) {
        for (int ox = 0; ox < out_w; ox++) {
            for (int ic = 0; ic < in_c; ic++) {
                for (int m = 0; m < depth_multiplier; m++) {
                    const int oc = ic * depth_multiplier + m;
                    int32_t acc = bias ? bias[oc] : 0;
                    for (int ky = 0; ky < k_h; ky++) {
                        int iy = oy * stride + ky - pad_h;
                        if (iy < 0 || iy >= in_h) continue;
                        for (int kx = 0; kx < k_w; kx++) {
                            int ix = ox * stride + kx - pad_w;
                            if (ix < 0 || ix >= in_w) continue;
                            int32_t x = (int32_t)in[(iy * in_w + ix) * in_c + ic] + q->input_offset;
                            acc += x * (int32_t)w[(ky * k_w + kx) * out_c + oc];
                        }
                    }
                    out[(oy * out_w + ox) * out_c + oc] = requantize_one(acc, q, oc);
                }
            }
        }
    }
}

KERNEL void max_pool2d_s8(const int8_t *in, int in_h, int in_w, int c, int k, int stride,
                   int out_h, int out_w, int8_t *out) {
    for (int oy = 0; oy < out_h; oy++) {
        for (int ox = 0; ox < out_w; ox++) {
            for (int ch = 0; ch < c; ch++) {
                int8_t best = INT8_MIN;
                for (int ky = 0; ky < k; ky++) {
                    int iy = oy * stride + ky;
                    if (iy >= in_h) break;
                    for (int kx = 0; kx < k; kx++) {
                        int ix = ox * stride + kx;
                        if (ix >= in_w) break;
                        int8_t v = in[(iy * in_w + ix) * c + ch];
                        if (v > best) best = v;
                    }
                }
                out[(oy * out_w + ox) * c + ch] = best;
            }
        }
    }
}

KERNEL void fully_connected_s8(const int8_t *in, int in_features, const int8_t *w, const int32_t *bias,
                        int out_features, const quant_params_t *q, int8_t *out) {
    for (int o = 0; o < out_features; o++) {
        int32_t acc = bias ? bias[o] : 0;
        const int8_t *row = w + o * in_features;
        for (int k = 0; k < in_features; k++) {
            acc += ((int32_t)in[k] + q->input_offset) * (int32_t)row[k];
        }
        out[o] = requantize_one(acc, q, o);
    }
}

#endif
