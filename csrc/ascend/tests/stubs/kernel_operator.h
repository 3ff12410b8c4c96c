// Syntax-check stub of the AscendC API subset used by gptq_dequant.cpp. NOT CANN: see README.md.
#pragma once
#include <cstdint>

#define __aicore__
#define __global__
#define __gm__
#define GM_ADDR uint8_t*
#define KERNEL_TASK_TYPE_DEFAULT(x) (void)(x)

enum KernelType { KERNEL_TYPE_AIV_ONLY };
enum pipe_t { PIPE_V };

struct half {
    half() = default;
    half(float) {}
};
struct bfloat16_t {
    bfloat16_t() = default;
    bfloat16_t(float) {}
};

namespace AscendC {

enum class TPosition { VECIN, VECOUT, VECCALC };
using QuePosition = TPosition;
enum class RoundMode { CAST_NONE, CAST_RINT };

template <typename T>
class LocalTensor {
public:
    LocalTensor operator[](uint32_t) const { return *this; }
    template <typename U>
    LocalTensor<U> ReinterpretCast() const { return LocalTensor<U>(); }
};

template <typename T>
class GlobalTensor {
public:
    void SetGlobalBuffer(__gm__ T*, uint64_t) {}
    GlobalTensor operator[](uint64_t) const { return *this; }
};

template <TPosition pos, int32_t depth>
class TQue {
public:
    template <typename T>
    LocalTensor<T> AllocTensor() { return LocalTensor<T>(); }
    template <typename T>
    void EnQue(const LocalTensor<T>&) {}
    template <typename T>
    LocalTensor<T> DeQue() { return LocalTensor<T>(); }
    template <typename T>
    void FreeTensor(LocalTensor<T>&) {}
};

template <TPosition pos>
class TBuf {
public:
    template <typename T>
    LocalTensor<T> Get() { return LocalTensor<T>(); }
};

class TPipe {
public:
    template <class Q>
    void InitBuffer(Q&, uint8_t num, uint32_t len) { (void)num; (void)len; }
    template <TPosition pos>
    void InitBuffer(TBuf<pos>&, uint32_t len) { (void)len; }
};

struct DataCopyExtParams {
    DataCopyExtParams() = default;
    DataCopyExtParams(const uint16_t count, const uint32_t len, const uint32_t srcStrideIn, const uint32_t dstStrideIn,
                      const uint32_t rsvIn)
        : blockCount(count), blockLen(len), srcStride(srcStrideIn), dstStride(dstStrideIn), rsv(rsvIn) {}
    uint16_t blockCount = 1;
    uint32_t blockLen = 0;
    uint32_t srcStride = 0;
    uint32_t dstStride = 0;
    uint32_t rsv = 0;
};

template <typename T>
struct DataCopyPadExtParams {
    DataCopyPadExtParams(const bool isPadValue, const uint8_t leftPadValue, const uint8_t rightPadValue, T padValue)
        : isPad(isPadValue), leftPadding(leftPadValue), rightPadding(rightPadValue), paddingValue(padValue) {}
    bool isPad;
    uint8_t leftPadding;
    uint8_t rightPadding;
    T paddingValue;
};

template <typename T>
void DataCopyPad(const LocalTensor<T>&, const GlobalTensor<T>&, const DataCopyExtParams&, const DataCopyPadExtParams<T>&) {}
template <typename T>
void DataCopyPad(const GlobalTensor<T>&, const LocalTensor<T>&, const DataCopyExtParams&) {}

template <typename T, bool isSetMask = true>
void ShiftLeft(const LocalTensor<T>&, const LocalTensor<T>&, const T&, const int32_t&) {}
template <typename T, bool isSetMask = true>
void ShiftRight(const LocalTensor<T>&, const LocalTensor<T>&, const T&, const int32_t&) {}
template <typename T>
void Sub(const LocalTensor<T>&, const LocalTensor<T>&, const LocalTensor<T>&, const int32_t&) {}
template <typename T>
void Mul(const LocalTensor<T>&, const LocalTensor<T>&, const LocalTensor<T>&, const int32_t&) {}
template <typename D, typename S>
void Cast(const LocalTensor<D>&, const LocalTensor<S>&, const RoundMode&, const uint32_t) {}
template <pipe_t pipe>
void PipeBarrier() {}
inline int64_t GetBlockIdx() { return 0; }

}  // namespace AscendC
