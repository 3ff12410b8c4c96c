// GPTQ int8/int4 -> fp16/bf16 dequantization, straight from the checkpoint layout, as an AscendC
// vector kernel (Atlas A2/A3: Ascend 910B/910C).
//
//   W[k, n] = (q[k, n] - z[k / groupSize, n]) * s[k / groupSize, n]
//   q[k, n] = bits [bits*(k % pf), bits*(k % pf + 1)) of qweight[k / pf, n], pf = 32 / bits
//
// Inputs (GM): qweight uint32 [ceil(K/pf), N] exactly as stored by GPTQ (act-order layers: rows permuted
// once at load time so groups are contiguous); zeros [G, N] holding the TRUE zero points (the v1 "+1"
// is applied by gptq_ascend.format on the host, never here) and scales [G, N], both fp16 or bf16.
// Output (GM): W [K, N], fp16 or bf16.
//
// Work split and tiling: csrc/ascend/tiling.h (host-tested). A tile is `rows` packed rows x `cols`
// columns inside one group; each vector core takes a contiguous range of tiles (CoreRange). Per tile:
//   CopyIn   words [rows, cols] (strided GM read, DataCopyPad for the N tail) + one scale row + one zero
//            row, through double-buffered VECIN queues, so the next tile's copy overlaps this compute;
//   Compute  per lane j < pf: codes = (word << (32 - bits*(j+1))) >> (32 - bits)  (logical shifts, uint32),
//            cast to float, minus the zero row, times the scale row, cast (round to nearest even) to the
//            output dtype -- (q - z) is exact and the product is exact in float32, so the one rounding
//            matches gptq_ascend.format.dequantize bit for bit;
//   CopyOut  rows pf*w + j of the output: a strided GM write (row stride pf*N), double-buffered VECOUT.
//
// The Triton kernel python/gptq_ascend/backends/ascend/triton_dequant.py is the executable specification of
// this loop nest (checked on CPU); this file has NOT been compiled or run here: no CANN toolkit and no NPU
// exist on the machines this project is developed on (see docs/ascend.md).
#define GPTQ_ASCEND_DEVICE 1
#include "kernel_operator.h"

#include "../tiling.h"

using namespace AscendC;
using gptq_ascend::DequantTiling;
using gptq_ascend::TileCoords;

namespace {

constexpr int32_t kBufferNum = 2;  // double buffering of every queue

template <typename ParamT, typename OutT>
class GptqDequantKernel {
public:
    __aicore__ inline GptqDequantKernel() {}

    __aicore__ inline void Init(GM_ADDR qweight, GM_ADDR zeros, GM_ADDR scales, GM_ADDR out, uint32_t k,
                                uint32_t n, uint32_t bits, uint32_t groupSize, uint32_t tileRows,
                                uint32_t tileCols, uint32_t usedCores)
    {
        gptq_ascend::DeriveTiling(k, n, bits, groupSize, static_cast<uint32_t>(sizeof(OutT)), tileRows, tileCols,
                                  usedCores, &t_);
        qweightGm_.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(qweight),
                                   static_cast<uint64_t>(t_.packedRows) * t_.n);
        zerosGm_.SetGlobalBuffer(reinterpret_cast<__gm__ ParamT*>(zeros), static_cast<uint64_t>(t_.numGroups) * t_.n);
        scalesGm_.SetGlobalBuffer(reinterpret_cast<__gm__ ParamT*>(scales),
                                  static_cast<uint64_t>(t_.numGroups) * t_.n);
        outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ OutT*>(out), static_cast<uint64_t>(t_.k) * t_.n);

        pipe_.InitBuffer(wordQueue_, kBufferNum, t_.wordBufBytes);
        pipe_.InitBuffer(scaleQueue_, kBufferNum, t_.paramBufBytes);
        pipe_.InitBuffer(zeroQueue_, kBufferNum, t_.paramBufBytes);
        pipe_.InitBuffer(outQueue_, kBufferNum, t_.outBufBytes);
        pipe_.InitBuffer(codeBuf_, t_.calcBufBytes);
        pipe_.InitBuffer(workBuf_, t_.calcBufBytes);
        pipe_.InitBuffer(scaleF32Buf_, t_.paramCalcBytes);
        pipe_.InitBuffer(zeroF32Buf_, t_.paramCalcBytes);
    }

    __aicore__ inline void Process()
    {
        uint32_t first = 0;
        uint32_t count = 0;
        gptq_ascend::CoreRange(t_, static_cast<uint32_t>(GetBlockIdx()), &first, &count);
        for (uint32_t i = 0; i < count; ++i) {
            TileCoords c = gptq_ascend::TileAt(t_, first + i);
            CopyIn(c);
            LoadParams();
            LocalTensor<uint32_t> words = wordQueue_.DeQue<uint32_t>();
            for (uint32_t lane = 0; lane < t_.packFactor; ++lane) {
                uint32_t laneRows = gptq_ascend::LaneRows(t_, c, lane);
                if (laneRows == 0) {
                    continue;
                }
                Compute(words, lane, laneRows);
                CopyOut(c, lane, laneRows);
            }
            wordQueue_.FreeTensor(words);
        }
    }

private:
    __aicore__ inline void CopyIn(const TileCoords& c)
    {
        // words [rows, cols] -> UB rows of tileCols uint32 (each burst padded to 32 bytes).
        LocalTensor<uint32_t> words = wordQueue_.AllocTensor<uint32_t>();
        const uint32_t burst = c.cols * 4u;                                   // bytes per row
        const uint32_t gmGap = (t_.n - c.cols) * 4u;                          // GM side: bytes
        const uint32_t ubGap = (t_.tileCols * 4u - gptq_ascend::AlignUp(burst, 32u)) / 32u;  // UB: 32 B blocks
        DataCopyExtParams in{static_cast<uint16_t>(c.rows), burst, gmGap, ubGap, 0u};
        DataCopyPadExtParams<uint32_t> noPad{false, 0, 0, 0};
        DataCopyPad(words, qweightGm_[static_cast<uint64_t>(c.firstWord) * t_.n + c.firstCol], in, noPad);
        wordQueue_.EnQue(words);

        uint64_t paramOffset = static_cast<uint64_t>(c.group) * t_.n + c.firstCol;
        DataCopyExtParams row{1u, static_cast<uint32_t>(c.cols * sizeof(ParamT)), 0u, 0u, 0u};
        DataCopyPadExtParams<ParamT> noPadParam{false, 0, 0, 0};
        LocalTensor<ParamT> scale = scaleQueue_.AllocTensor<ParamT>();
        DataCopyPad(scale, scalesGm_[paramOffset], row, noPadParam);
        scaleQueue_.EnQue(scale);
        LocalTensor<ParamT> zero = zeroQueue_.AllocTensor<ParamT>();
        DataCopyPad(zero, zerosGm_[paramOffset], row, noPadParam);
        zeroQueue_.EnQue(zero);
    }

    __aicore__ inline void LoadParams()
    {
        // One scale row and one zero row per tile, widened to float once for all pf lanes.
        LocalTensor<ParamT> scale = scaleQueue_.DeQue<ParamT>();
        LocalTensor<ParamT> zero = zeroQueue_.DeQue<ParamT>();
        LocalTensor<float> scaleF = scaleF32Buf_.Get<float>();
        LocalTensor<float> zeroF = zeroF32Buf_.Get<float>();
        Cast(scaleF, scale, RoundMode::CAST_NONE, t_.tileCols);
        Cast(zeroF, zero, RoundMode::CAST_NONE, t_.tileCols);
        PipeBarrier<PIPE_V>();
        scaleQueue_.FreeTensor(scale);
        zeroQueue_.FreeTensor(zero);
    }

    __aicore__ inline void Compute(const LocalTensor<uint32_t>& words, uint32_t lane, uint32_t laneRows)
    {
        // Columns beyond c.cols hold padding; they are computed and never written back.
        const uint32_t count = laneRows * t_.tileCols;
        LocalTensor<uint32_t> codes = codeBuf_.Get<uint32_t>();
        LocalTensor<float> work = workBuf_.Get<float>();
        LocalTensor<float> scaleF = scaleF32Buf_.Get<float>();
        LocalTensor<float> zeroF = zeroF32Buf_.Get<float>();

        // The previous lane's vector ops still read codes/work: order the overwrite after them.
        PipeBarrier<PIPE_V>();
        ShiftLeft(codes, words, static_cast<uint32_t>(32u - t_.bits * (lane + 1u)), static_cast<int32_t>(count));
        PipeBarrier<PIPE_V>();
        ShiftRight(codes, codes, static_cast<uint32_t>(32u - t_.bits), static_cast<int32_t>(count));
        PipeBarrier<PIPE_V>();
        // codes < 2**bits: exact as int32 and as float.
        Cast(work, codes.template ReinterpretCast<int32_t>(), RoundMode::CAST_NONE, count);
        PipeBarrier<PIPE_V>();
        for (uint32_t r = 0; r < laneRows; ++r) {
            Sub(work[r * t_.tileCols], work[r * t_.tileCols], zeroF, static_cast<int32_t>(t_.tileCols));
        }
        PipeBarrier<PIPE_V>();
        for (uint32_t r = 0; r < laneRows; ++r) {
            Mul(work[r * t_.tileCols], work[r * t_.tileCols], scaleF, static_cast<int32_t>(t_.tileCols));
        }
        PipeBarrier<PIPE_V>();
        LocalTensor<OutT> out = outQueue_.AllocTensor<OutT>();
        Cast(out, work, RoundMode::CAST_RINT, count);
        outQueue_.EnQue(out);
    }

    __aicore__ inline void CopyOut(const TileCoords& c, uint32_t lane, uint32_t laneRows)
    {
        // UB row r -> output row pf*(firstWord + r) + lane: GM row stride pf*N elements.
        LocalTensor<OutT> out = outQueue_.DeQue<OutT>();
        const uint32_t elem = static_cast<uint32_t>(sizeof(OutT));
        const uint32_t burst = c.cols * elem;
        const uint32_t ubGap = (t_.tileCols * elem - gptq_ascend::AlignUp(burst, 32u)) / 32u;  // UB: 32 B blocks
        const uint32_t gmGap = (t_.packFactor * t_.n - c.cols) * elem;                        // GM: bytes
        DataCopyExtParams params{static_cast<uint16_t>(laneRows), burst, ubGap, gmGap, 0u};
        uint64_t row0 = static_cast<uint64_t>(c.firstWord) * t_.packFactor + lane;
        DataCopyPad(outGm_[row0 * t_.n + c.firstCol], out, params);
        outQueue_.FreeTensor(out);
    }

    DequantTiling t_;
    TPipe pipe_;
    TQue<QuePosition::VECIN, kBufferNum> wordQueue_;
    TQue<QuePosition::VECIN, kBufferNum> scaleQueue_;
    TQue<QuePosition::VECIN, kBufferNum> zeroQueue_;
    TQue<QuePosition::VECOUT, kBufferNum> outQueue_;
    TBuf<QuePosition::VECCALC> codeBuf_;
    TBuf<QuePosition::VECCALC> workBuf_;
    TBuf<QuePosition::VECCALC> scaleF32Buf_;
    TBuf<QuePosition::VECCALC> zeroF32Buf_;
    GlobalTensor<uint32_t> qweightGm_;
    GlobalTensor<ParamT> zerosGm_;
    GlobalTensor<ParamT> scalesGm_;
    GlobalTensor<OutT> outGm_;
};

}  // namespace

#define GPTQ_DEQUANT_KERNEL(NAME, PARAM_T, OUT_T)                                                           \
    extern "C" __global__ __aicore__ void NAME(GM_ADDR qweight, GM_ADDR zeros, GM_ADDR scales, GM_ADDR out,  \
                                               uint32_t k, uint32_t n, uint32_t bits, uint32_t groupSize,    \
                                               uint32_t tileRows, uint32_t tileCols, uint32_t usedCores)     \
    {                                                                                                        \
        KERNEL_TASK_TYPE_DEFAULT(KERNEL_TYPE_AIV_ONLY);                                                      \
        GptqDequantKernel<PARAM_T, OUT_T> op;                                                                \
        op.Init(qweight, zeros, scales, out, k, n, bits, groupSize, tileRows, tileCols, usedCores);         \
        op.Process();                                                                                        \
    }

GPTQ_DEQUANT_KERNEL(gptq_dequant_f16_f16, half, half)
GPTQ_DEQUANT_KERNEL(gptq_dequant_f16_bf16, half, bfloat16_t)
GPTQ_DEQUANT_KERNEL(gptq_dequant_bf16_f16, bfloat16_t, half)
GPTQ_DEQUANT_KERNEL(gptq_dequant_bf16_bf16, bfloat16_t, bfloat16_t)

#if !defined(GPTQ_ASCEND_SYNTAX_CHECK)  // g++ cannot parse <<<>>>; see csrc/ascend/tests/stubs/README.md
namespace gptq_ascend {

// Host-side launch (compiled by the AscendC toolchain together with the kernels above).
// param_bf16 / out_bf16: dtype of zeros+scales / of the output (false: float16). Returns 0, or -1 for a
// plan the kernel cannot run.
int LaunchGptqDequant(void* stream, bool param_bf16, bool out_bf16, void* qweight, void* zeros, void* scales,
                      void* out, const DequantTiling& t)
{
    if (t.usedCores == 0 || t.outBytes != 2) {
        return -1;
    }
    auto* q = static_cast<uint8_t*>(qweight);
    auto* z = static_cast<uint8_t*>(zeros);
    auto* s = static_cast<uint8_t*>(scales);
    auto* o = static_cast<uint8_t*>(out);
    if (!param_bf16 && !out_bf16) {
        gptq_dequant_f16_f16<<<t.usedCores, nullptr, stream>>>(q, z, s, o, t.k, t.n, t.bits, t.groupSize,
                                                               t.tileRows, t.tileCols, t.usedCores);
    } else if (!param_bf16 && out_bf16) {
        gptq_dequant_f16_bf16<<<t.usedCores, nullptr, stream>>>(q, z, s, o, t.k, t.n, t.bits, t.groupSize,
                                                                t.tileRows, t.tileCols, t.usedCores);
    } else if (param_bf16 && !out_bf16) {
        gptq_dequant_bf16_f16<<<t.usedCores, nullptr, stream>>>(q, z, s, o, t.k, t.n, t.bits, t.groupSize,
                                                                t.tileRows, t.tileCols, t.usedCores);
    } else {
        gptq_dequant_bf16_bf16<<<t.usedCores, nullptr, stream>>>(q, z, s, o, t.k, t.n, t.bits, t.groupSize,
                                                                 t.tileRows, t.tileCols, t.usedCores);
    }
    return 0;
}

}  // namespace gptq_ascend
#endif  // GPTQ_ASCEND_SYNTAX_CHECK
