#include "csrc/distributed/agreement.h"

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string_view>

#include <ATen/ops/zeros.h>

#include "csrc/distributed/all_to_all.h"
#include "csrc/host_sync.h"

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

constexpr int64_t kErrorWords = kMaxErrorBytes / 8;  // the error's bytes travel in int64 fields

// What of a rank's error travels: without the op's prefix (the receivers add theirs), cut to kMaxErrorBytes at
// a character boundary (never inside a UTF-8 sequence, so that it stays valid text), marked "..." if cut.
std::string bounded_error(std::string_view error, const char* op) {
  const std::string prefix = std::string("moeflux.") + op + ": ";
  if (error.starts_with(prefix)) error.remove_prefix(prefix.size());
  if (static_cast<int64_t>(error.size()) <= kMaxErrorBytes) return std::string(error);
  constexpr std::string_view cut_mark = "...";
  size_t end = kMaxErrorBytes - cut_mark.size();
  while (end > 0 && (static_cast<unsigned char>(error[end]) & 0xC0) == 0x80) --end;  // a continuation byte
  return std::string(error.substr(0, end)) + std::string(cut_mark);
}

// "moeflux.dispatch: rank 1 of the process group failed its check (so did rank 3): <rank 1's error>", from
// every rank's row (`n` fields: failed, error bytes, `fields` fields, the error's words).
std::string failed_ranks_error(const int64_t* h, int64_t world, int64_t n, int64_t fields, const char* op) {
  std::vector<int64_t> failed;
  for (int64_t r = 0; r < world; ++r) {
    if (h[r * n] != 0) failed.push_back(r);
  }
  if (failed.empty()) return "";
  const int64_t* row = h + failed[0] * n;
  std::ostringstream out;
  out << "moeflux." << op << ": rank " << failed[0] << " of the process group failed its check";
  for (size_t i = 1; i < failed.size(); ++i) {
    out << (i > 1 ? ", " : failed.size() == 2 ? " (so did rank " : " (so did ranks ") << failed[i];
  }
  out << (failed.size() > 1 ? ")" : "") << ": "
      << std::string_view(reinterpret_cast<const char*>(row + 2 + fields),
                          static_cast<size_t>(std::clamp<int64_t>(row[1], 0, kMaxErrorBytes)));
  return out.str();
}

}  // namespace

c10::Device exchange_device(const c10::Device& device) { return device.is_cuda() ? device : c10::Device(c10::kCPU); }

CheckedFields exchange_checks(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
                              const c10::Device& device, const std::string& error) {
  const int64_t world = group.getSize(), f = static_cast<int64_t>(fields.size()), n = 2 + f + kErrorWords;
  at::Tensor mine = at::zeros({1, n}, at::TensorOptions().dtype(at::kLong));
  int64_t* m = mine.mutable_data_ptr<int64_t>();
  const std::string sent = bounded_error(error, op);
  m[0] = error.empty() ? 0 : 1;
  m[1] = static_cast<int64_t>(sent.size());
  std::copy(fields.begin(), fields.end(), m + 2);
  std::memcpy(m + 2 + f, sent.data(), sent.size());
  const std::vector<int64_t> ones(world, 1);
  const at::Tensor all =
      to_host(exchange_rows(mine.to(device).expand({world, n}), ones, ones, group, op, "agreement"), "agreement");
  return {all.narrow(1, 2, f).contiguous(),
          error.empty() ? failed_ranks_error(all.const_data_ptr<int64_t>(), world, n, f, op) : error};
}

at::Tensor exchange_checked(c10d::ProcessGroup& group, const std::vector<int64_t>& fields, const char* op,
                            const c10::Device& device, const std::string& error) {
  CheckedFields checked = exchange_checks(group, fields, op, device, error);
  TORCH_CHECK(checked.error.empty(), checked.error);
  return checked.fields;
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
