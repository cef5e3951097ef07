// See README.md in this directory. `setTimeout` is named by an inline member of
// ProcessGroupGloo that cvdist never calls (the group's timeout is set at creation).
#pragma once
#include <chrono>
namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
}  // namespace gloo
