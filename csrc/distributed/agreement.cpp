#include "csrc/distributed/agreement.h"

#include <algorithm>
#include <sstream>

#include <ATen/ops/empty.h>

#include "csrc/distributed/all_to_all.h"

namespace moeflux {
namespace {

// "hidden size 7, dtype Float and num_experts 4"
std::string describe(const std::vector<const char*>& names, const int64_t* values) {
  std::ostringstream out;
  for (size_t i = 0; i < names.size(); ++i) {
    out << (i == 0 ? "" : i + 1 == names.size() ? " and " : ", ") << names[i] << " ";
    if (std::string(names[i]) == "dtype") {
      out << static_cast<at::ScalarType>(values[i]);
    } else {
      out << values[i];
    }
  }
  return out.str();
}

}  // namespace

c10::Device exchange_device(const c10::Device& device) { return device.is_cuda() ? device : c10::Device(c10::kCPU); }

at::Tensor exchange_checked(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
                            const c10::Device& device, const std::string& error) {
  const int64_t world = group.getSize(), n = static_cast<int64_t>(fields.size()) + 1;
  at::Tensor mine = at::empty({1, n}, at::TensorOptions().dtype(at::kLong));
  int64_t* m = mine.mutable_data_ptr<int64_t>();
  m[0] = error.empty() ? 0 : 1;
  std::copy(fields.begin(), fields.end(), m + 1);
  const std::vector<int64_t> ones(world, 1);
  const at::Tensor all = exchange_rows(mine.to(device).expand({world, n}), ones, ones, group, op, "agreement").cpu();
  const int64_t* h = all.const_data_ptr<int64_t>();
  TORCH_CHECK(error.empty(), error);
  for (int64_t r = 0; r < world; ++r) {
    TORCH_CHECK(h[r * n] == 0, "moeflux.", op, ": rank ", r, " of the process group passed invalid arguments ",
                "(its error says which), so no rank takes part in the collective");
  }
  return all.narrow(1, 1, n - 1).contiguous();
}

void agree(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
           const std::vector<const char*>& names, const c10::Device& device, const std::string& error) {
  const at::Tensor all = exchange_checked(group, fields, op, device, error);
  const int64_t n = static_cast<int64_t>(fields.size());
  const int64_t* h = all.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < group.getSize(); ++r) {
    TORCH_CHECK(std::equal(h + r * n, h + (r + 1) * n, fields.begin()), "moeflux.", op,
                ": ranks of the process group disagree: rank ", r, " passed ", describe(names, h + r * n),
                "; rank ", group.getRank(), " passed ", describe(names, fields.data()));
  }
}

}  // namespace moeflux
