// Syntax-check stub of the ACL declarations used by torch_binding.cpp. NOT CANN: see ../README.md.
#pragma once
#include <cstdint>
using aclError = int;
using aclrtStream = void*;
constexpr aclError ACL_SUCCESS = 0;
enum aclDeviceInfo { ACL_DEVICE_INFO_VECTOR_CORE_NUM = 3 };
aclError aclGetDeviceCapability(uint32_t deviceId, aclDeviceInfo deviceInfo, int64_t* value);
