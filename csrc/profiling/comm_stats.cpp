#include "csrc/profiling/comm_stats.h"

#include <atomic>
#include <mutex>
#include <utility>

#include <c10/core/impl/VirtualGuardImpl.h>

namespace moeflux::comm_stats {
namespace {

std::atomic<bool> on{false};
std::mutex mutex;

// A device record waits for its end event until drain() reads it.
struct Pending {
  Record record;
  std::shared_ptr<c10::Event> start, end;
};
std::vector<Pending> records;

thread_local std::string layer_tag;
thread_local int64_t stage_tag = -1;

double seconds_since_epoch(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(t.time_since_epoch()).count();
}

}  // namespace

bool enabled() { return on.load(std::memory_order_relaxed); }
void set_enabled(bool value) { on.store(value); }

std::vector<Record> drain() {
  std::vector<Pending> taken;
  {
    std::lock_guard<std::mutex> lock(mutex);
    taken.swap(records);
  }
  std::vector<Record> out;
  out.reserve(taken.size());
  for (Pending& p : taken) {
    if (p.end) {
      p.end->synchronize();
      p.record.seconds = p.start->elapsedTime(*p.end) / 1e3;  // elapsedTime is in milliseconds
    }
    out.push_back(std::move(p.record));
  }
  return out;
}

const std::string& current_layer() { return layer_tag; }
std::string exchange_current_layer(std::string layer) { return std::exchange(layer_tag, std::move(layer)); }
LayerScope::LayerScope(std::string layer) : previous_(std::move(layer_tag)) { layer_tag = std::move(layer); }
LayerScope::~LayerScope() { layer_tag = std::move(previous_); }
StageScope::StageScope(int64_t stage) : previous_(std::exchange(stage_tag, stage)) {}
StageScope::~StageScope() { stage_tag = previous_; }

CollectiveTimer::CollectiveTimer(const char* phase, const std::string& group, int64_t rank, const at::Tensor& like,
                                 std::vector<int64_t> bytes_to_rank) {
  if (!enabled()) return;
  start_ = wait_start_ = std::chrono::steady_clock::now();
  record_ = Record{layer_tag, phase, group, rank, seconds_since_epoch(start_), 0, 0, std::move(bytes_to_rank),
                   stage_tag};
  device_ = like.device();
  if (!device_.is_cpu()) {
    start_event_ = std::make_shared<c10::Event>(device_.type(), c10::EventFlag::BACKEND_DEFAULT);
    const c10::impl::VirtualGuardImpl guard(device_.type());
    start_event_->record(guard.getStream(device_));
  }
}

void CollectiveTimer::enqueued() {
  if (!record_) return;
  enqueued_ = std::chrono::steady_clock::now();
  marked_enqueued_ = true;
}

void CollectiveTimer::waiting() {
  if (record_) wait_start_ = std::chrono::steady_clock::now();
}

void CollectiveTimer::done() {
  if (!record_) return;
  const auto now = std::chrono::steady_clock::now();
  const auto issuing = marked_enqueued_ ? enqueued_ - start_ : wait_start_ - start_;
  record_->wait_seconds = std::chrono::duration<double>(issuing + (now - wait_start_)).count();
  Pending pending{std::move(*record_), start_event_, nullptr};
  record_.reset();
  if (start_event_) {
    pending.end = std::make_shared<c10::Event>(device_.type(), c10::EventFlag::BACKEND_DEFAULT);
    const c10::impl::VirtualGuardImpl guard(device_.type());
    pending.end->record(guard.getStream(device_));
  } else {
    pending.record.seconds = std::chrono::duration<double>(now - start_).count();
  }
  std::lock_guard<std::mutex> lock(mutex);
  records.push_back(std::move(pending));
}

}  // namespace moeflux::comm_stats
