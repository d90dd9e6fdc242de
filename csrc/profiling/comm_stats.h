// Opt-in timing of moeflux's collectives, per MoE layer (moeflux.comm_stats in
// Python). Off by default: then a collective pays one relaxed atomic load and
// nothing synchronises with the device. On, every token all-to-all, count
// exchange and wait for the gradient all-reduce leaves a Record; CPU
// collectives are timed on the host clock, device ones with timing events on
// the current stream, read (synchronising) only when the records are drained.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Event.h>

namespace moeflux::comm_stats {

struct Record {
  std::string layer;                 // the MoE layer's tag when the collective ran ("" outside a layer)
  std::string phase;                 // dispatch, combine, combine_backward, dispatch_backward, count_exchange,
                                     // all_to_all, grad_allreduce_wait, experts; load balancing: agreement,
                                     // shadow_broadcast, shadow_reduce, expert_move
  std::string group;                 // process group name
  int64_t rank = 0;                  // this rank in that group
  double start_s = 0;                // host clock when it was issued (seconds, steady clock)
  double seconds = 0;                // issue to completion (device: on the current stream)
  double wait_seconds = 0;           // of which the host was blocked by it (issuing + waiting): exposed
  std::vector<int64_t> bytes_to_rank;  // bytes sent to each rank of the group (this rank's entry stays local)
  int64_t stage = -1;                  // the pipelined exchange's stage (StageScope); -1 outside one
};

bool enabled();
void set_enabled(bool on);
std::vector<Record> drain();  // the records so far, oldest first; clears them

// The layer tag of this thread: set by the MoE layer around its exchange, and
// carried from forward into backward by the autograd functions.
const std::string& current_layer();
std::string exchange_current_layer(std::string layer);  // sets it, returns the previous one
class LayerScope {
 public:
  explicit LayerScope(std::string layer);
  ~LayerScope();
  LayerScope(const LayerScope&) = delete;
  LayerScope& operator=(const LayerScope&) = delete;

 private:
  std::string previous_;
};

// The stage of the pipelined exchange that this thread's collectives and
// expert compute belong to, for their records: with them the records are the
// pipeline's stage trace (when each stage's all-to-alls were issued and waited
// for, when its experts ran), from which tests judge the overlap of stages.
class StageScope {
 public:
  explicit StageScope(int64_t stage);
  ~StageScope();
  StageScope(const StageScope&) = delete;
  StageScope& operator=(const StageScope&) = delete;

 private:
  int64_t previous_;
};

// Times one collective (or, with phase "experts", a stretch of compute):
// construction = issue, enqueued() = the issuing call returned, waiting() =
// the host starts waiting, done() = complete. Without enqueued()/waiting()
// the whole span counts as blocked. No-op when disabled.
class CollectiveTimer {
 public:
  CollectiveTimer(const char* phase, const std::string& group, int64_t rank, const at::Tensor& like,
                  std::vector<int64_t> bytes_to_rank);
  void enqueued();
  void waiting();
  void done();

 private:
  std::optional<Record> record_;
  std::chrono::steady_clock::time_point start_, enqueued_, wait_start_;
  bool marked_enqueued_ = false;
  std::shared_ptr<c10::Event> start_event_;
  c10::Device device_{c10::kCPU};
};

}  // namespace moeflux::comm_stats
