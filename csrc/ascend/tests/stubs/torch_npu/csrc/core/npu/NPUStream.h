// Syntax-check stub of torch_npu's NPUStream (the part torch_binding.cpp uses). NOT torch_npu.
#pragma once
#include "acl/acl.h"
namespace c10_npu {
struct NPUStream {
    aclrtStream stream() const;
};
NPUStream getCurrentNPUStream(signed char device_index = -1);
}  // namespace c10_npu
