// Syntax-check stub of torch_npu's OpCommand (the part torch_binding.cpp uses). NOT torch_npu.
#pragma once
#include <functional>
#include <string>
namespace at_npu {
namespace native {
class OpCommand {
public:
    OpCommand& Name(const std::string& name);
    OpCommand& SetCustomHandler(std::function<int()> func);
    void Run();
};
}  // namespace native
}  // namespace at_npu
