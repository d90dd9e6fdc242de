// All-to-all priority over the gradient all-reduce (Lina, ATC'23), per process.
//
// MoE all-to-alls sit on the critical path of forward and backward; the
// gradient all-reduce does not (it only has to be done when backward ends).
// When both share the links, a large all-reduce bucket on the wire can slow an
// all-to-all down by its whole length. The bucketer therefore cuts its
// all-reduce into micro-ops of at most `micro_op_bytes` and submits them here;
// the scheduler launches them one at a time, in FIFO order, and only while no
// moeflux all-to-all is queued or running. An all-to-all then waits behind at
// most the one micro-op that is already on the wire.
//
// All-to-alls register on enqueue and completion: start_exchange (which every
// moeflux all-to-all goes through, blocking or pipelined) holds an
// AllToAllInFlight guard around the enqueue and hands the Work to its
// until_done().
//
// Collectives stay matched across ranks: micro-ops are launched strictly in
// submission order, and every rank submits the same micro-ops in the same
// order (the bucketer launches its buckets strictly in their fixed order, all
// ranks have the same buckets, and the cut into micro-ops depends only on the
// bucket's size and micro_op_bytes, which DataParallel checks to agree). So
// the k-th collective a rank issues on a data-parallel group is the k-th on
// every other rank of that group, whenever each rank gets to issue it; only
// *when* differs between ranks, never *what* or in which order. The timing
// differs, though, relative to collectives that do not go through the
// scheduler: all-to-alls must therefore use other process groups than the
// micro-ops (DataParallel checks this for moeflux's expert-parallel groups),
// and nothing else may issue collectives on a data-parallel group while
// micro-ops are queued (between a bucket's launch and the end of backward).
//
// Progress: an all-to-all never waits for a micro-op, so every all-to-all
// completes; a rank holds a micro-op only while one of its own all-to-alls is
// in flight; and at the end of backward flush() releases everything still
// queued, so nothing the end of backward waits for depends on an all-to-all
// being issued.
//
// Completion is read from c10 futures: for CPU (gloo) a collective's future
// completes when the data is there; for devices (NCCL) it completes when the
// collective has been enqueued on a stream, so the scheduler records an event
// on the future's streams and a background thread polls it. No host
// synchronisation happens on the thread that runs forward and backward.
// Launch functions run on whichever thread frees the way (the caller of
// submit(), a backend's completion thread, the poller): they must not need the
// GIL, and they run with the streams that were current at submit().
//
// Tracing (opt-in, set_tracing): the scheduler logs when each micro-op and each
// all-to-all goes in flight and comes out, in a bounded ring, so that tests
// judge the rules above from the intervals rather than from the scheduler's own
// counters. Off, an event costs one branch under a lock already held.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace moeflux::comm_scheduler {

using FuturePtr = c10::intrusive_ptr<c10::ivalue::Future>;
// Issues one collective and returns its future.
using LaunchFn = std::function<FuturePtr()>;

struct Stats {
  int64_t all_to_alls_in_flight = 0;
  int64_t micro_ops_queued = 0;
  int64_t micro_ops_in_flight = 0;
  // Since the last reset_stats():
  int64_t all_to_alls = 0;                // registered
  int64_t micro_ops_launched = 0;
  int64_t micro_ops_held = 0;             // waited for an all-to-all when it was their turn
  int64_t micro_ops_flushed = 0;          // launched by flush() while the way was not free
  int64_t max_micro_ops_in_flight = 0;    // right after any launch, flushed ones included
};

// One edge of an interval in the trace.
struct TraceEvent {
  enum class Kind : uint8_t {
    all_to_all,        // registered .. completed; counted, not paired (completions do not say which)
    micro_op,          // launched with the way free .. done
    flushed_micro_op,  // launched by flush() past what was in flight .. done
    unscheduled,       // an all-reduce issued without the scheduler (priority off), see trace_unscheduled
  };
  Kind kind = Kind::all_to_all;
  bool begins = true;  // in flight from here (launch, registration) or done
  uint64_t id = 0;     // pairs a micro-op's edges: its submission number (unscheduled: their own count)
  int64_t t_ns = 0;    // steady clock; strictly increasing along the trace, which is the scheduler's order
};

class Scheduler {
 public:
  Scheduler() = default;
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // A moeflux all-to-all is about to be issued / is done. Always in pairs.
  void all_to_all_enqueued();
  void all_to_all_completed();

  // Queues a micro-op. The returned future completes with the collective's
  // value (or its error) once the micro-op has been launched and is done; on
  // `devices` (leave empty for CPU) it is a device future like the backend's.
  FuturePtr submit(LaunchFn launch, std::vector<c10::Device> devices = {});

  // Launches every micro-op queued so far, now, in order, whatever is in flight
  // (the end of backward: nothing may wait on an all-to-all that is never issued).
  void flush();

  // Calls `done` once `future` has completed, and for a device future once the
  // device has reached the point where it completed (polled, off this thread).
  void when_done(const FuturePtr& future, std::function<void()> done);

  Stats stats() const;
  void reset_stats();

  // Turning tracing on clears the trace. trace(): the events, oldest first (the last kTraceCapacity);
  // trace_dropped(): how many older ones the ring overwrote.
  static constexpr size_t kTraceCapacity = size_t{1} << 16;
  void set_tracing(bool on);
  std::vector<TraceEvent> trace() const;
  int64_t trace_dropped() const;
  // Traces an all-reduce that does not go through the scheduler, from now until `future` is done: the
  // counterpart of micro-ops with priority off, to show what the rules prevent. Nothing when not tracing.
  void trace_unscheduled(const FuturePtr& future);

 private:
  struct MicroOp {
    LaunchFn launch;
    FuturePtr result;
    std::vector<c10::Stream> streams;  // current at submit(); the launch runs on them
    uint64_t seq = 0;
    bool held = false;
  };
  struct Polled {
    std::vector<c10::Event> events;
    std::function<void()> done;
  };

  void pump();
  void launch_one(MicroOp op, TraceEvent::Kind kind);
  void micro_op_done(TraceEvent::Kind kind, uint64_t seq);
  void poll_loop();
  void record_locked(TraceEvent::Kind kind, bool begins, uint64_t id);

  mutable std::mutex mutex_;
  std::deque<MicroOp> queue_;
  uint64_t next_seq_ = 0;
  uint64_t flush_until_ = 0;  // micro-ops with seq below it launch at once
  int64_t all_to_alls_in_flight_ = 0;
  int64_t micro_ops_in_flight_ = 0;
  bool pumping_ = false;  // one thread launches at a time, so launches keep their order
  Stats stats_;
  bool tracing_ = false;
  std::vector<TraceEvent> trace_;  // a ring once full: trace_head_ is the oldest
  size_t trace_head_ = 0;
  int64_t trace_dropped_ = 0, last_trace_ns_ = 0;
  uint64_t next_unscheduled_ = 0;

  std::mutex poll_mutex_;
  std::condition_variable poll_cv_;
  std::list<Polled> polled_;
  std::thread poller_;
  bool stop_ = false;
};

// The scheduler of this process (never destroyed: callbacks may outlive main).
Scheduler& instance();

// Registers an all-to-all for its scope: construct it before issuing the
// collective. until_done(work) makes it count as in flight until `work` is
// done (on a device: until the device has run it) rather than until the
// guard's scope ends; without futures from the backend, the scope decides.
class AllToAllInFlight {
 public:
  explicit AllToAllInFlight(Scheduler& scheduler = instance());
  ~AllToAllInFlight();
  AllToAllInFlight(const AllToAllInFlight&) = delete;
  AllToAllInFlight& operator=(const AllToAllInFlight&) = delete;
  void until_done(const c10::intrusive_ptr<c10d::Work>& work);

 private:
  Scheduler* scheduler_;
};

}  // namespace moeflux::comm_scheduler
