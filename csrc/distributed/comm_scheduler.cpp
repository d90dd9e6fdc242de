#include "csrc/distributed/comm_scheduler.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace moeflux::comm_scheduler {
namespace {

std::vector<c10::Device> non_cpu(std::vector<c10::Device> devices) {
  devices.erase(std::remove_if(devices.begin(), devices.end(), [](const c10::Device& d) { return d.is_cpu(); }),
                devices.end());
  return devices;
}

}  // namespace

Scheduler::~Scheduler() {
  {
    std::lock_guard<std::mutex> lock(poll_mutex_);
    stop_ = true;
  }
  poll_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

void Scheduler::all_to_all_enqueued() {
  std::lock_guard<std::mutex> lock(mutex_);
  ++all_to_alls_in_flight_;
  ++stats_.all_to_alls;
  record_locked(TraceEvent::Kind::all_to_all, true, 0);
}

void Scheduler::all_to_all_completed() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // Unpaired calls are a caller's bug; never go negative (this may run in a destructor or a callback).
    if (all_to_alls_in_flight_ > 0) {
      --all_to_alls_in_flight_;
      record_locked(TraceEvent::Kind::all_to_all, false, 0);
    }
    if (all_to_alls_in_flight_ > 0) return;
  }
  pump();
}

FuturePtr Scheduler::submit(LaunchFn launch, std::vector<c10::Device> devices) {
  devices = non_cpu(std::move(devices));
  MicroOp op;
  op.launch = std::move(launch);
  for (const c10::Device& device : devices) {
    op.streams.push_back(c10::impl::VirtualGuardImpl(device.type()).getStream(device));
  }
  op.result = c10::make_intrusive<c10::ivalue::Future>(c10::AnyType::get(), std::move(devices));
  FuturePtr result = op.result;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    op.seq = next_seq_++;
    queue_.push_back(std::move(op));
  }
  pump();
  return result;
}

void Scheduler::flush() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    flush_until_ = next_seq_;
  }
  pump();
}

// Launches what may be launched. Only one thread at a time runs the loop (the
// others return at once: the running one re-checks under the lock after every
// launch, and every change of state happens under the lock), so micro-ops go
// out exactly in submission order. Never holds the lock while launching.
void Scheduler::pump() {
  std::unique_lock<std::mutex> lock(mutex_);
  if (pumping_) return;
  pumping_ = true;
  while (!queue_.empty()) {
    MicroOp& front = queue_.front();
    const bool flushed = front.seq < flush_until_;
    const bool way_free = micro_ops_in_flight_ == 0 && all_to_alls_in_flight_ == 0;
    if (!flushed && !way_free) {
      // Held by an all-to-all (not merely by the micro-op ahead of it): counted once.
      if (all_to_alls_in_flight_ > 0 && micro_ops_in_flight_ == 0 && !front.held) {
        front.held = true;
        ++stats_.micro_ops_held;
      }
      break;  // the completion of what is in flight pumps again
    }
    MicroOp op = std::move(front);
    queue_.pop_front();
    ++micro_ops_in_flight_;
    ++stats_.micro_ops_launched;
    if (!way_free) ++stats_.micro_ops_flushed;
    stats_.max_micro_ops_in_flight = std::max(stats_.max_micro_ops_in_flight, micro_ops_in_flight_);
    const auto kind = way_free ? TraceEvent::Kind::micro_op : TraceEvent::Kind::flushed_micro_op;
    record_locked(kind, true, op.seq);
    lock.unlock();
    launch_one(std::move(op), kind);
    lock.lock();
  }
  pumping_ = false;
}

void Scheduler::launch_one(MicroOp op, TraceEvent::Kind kind) {
  FuturePtr future;
  try {
    c10::MultiStreamGuard streams(op.streams);
    future = op.launch();
    TORCH_CHECK(future, "moeflux comm scheduler: a micro-op's launch returned no future");
  } catch (...) {
    op.result->setErrorIfNeeded(std::current_exception());
    micro_op_done(kind, op.seq);
    return;
  }
  // Runs with streams that wait for the collective (device futures), so the
  // result's own events mark the same point.
  future->addCallback([result = op.result](c10::ivalue::Future& done) {
    if (done.hasError()) {
      result->setErrorIfNeeded(done.exception_ptr());
    } else {
      result->markCompleted(done.value());
    }
  });
  when_done(future, [this, kind, seq = op.seq] { micro_op_done(kind, seq); });
}

void Scheduler::micro_op_done(TraceEvent::Kind kind, uint64_t seq) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (micro_ops_in_flight_ > 0) --micro_ops_in_flight_;
    record_locked(kind, false, seq);
  }
  pump();
}

void Scheduler::when_done(const FuturePtr& future, std::function<void()> done) {
  future->addCallback([this, done = std::move(done)](c10::ivalue::Future& completed) mutable {
    if (completed.hasError() || completed.devices().empty()) {
      done();
      return;
    }
    // The callback runs on streams that wait for the future's events: an event
    // recorded on them is reached when the collective is done on the device.
    Polled polled;
    try {
      for (const c10::Device& device : completed.devices()) {
        c10::Event event(device.type());
        event.record(c10::impl::VirtualGuardImpl(device.type()).getStream(device));
        polled.events.push_back(std::move(event));
      }
    } catch (const std::exception&) {
      done();  // no event: count it done now rather than never (this runs on a backend's thread)
      return;
    }
    polled.done = std::move(done);
    {
      std::lock_guard<std::mutex> lock(poll_mutex_);
      polled_.push_back(std::move(polled));
      if (!poller_.joinable()) poller_ = std::thread([this] { poll_loop(); });
    }
    poll_cv_.notify_one();
  });
}

// The background thread of device completions: non-blocking event queries,
// a short sleep while something is pending, asleep otherwise.
void Scheduler::poll_loop() {
  std::unique_lock<std::mutex> lock(poll_mutex_);
  while (true) {
    poll_cv_.wait(lock, [this] { return stop_ || !polled_.empty(); });
    if (stop_) return;
    std::vector<std::function<void()>> ready;
    for (auto it = polled_.begin(); it != polled_.end();) {
      const bool reached =
          std::all_of(it->events.begin(), it->events.end(), [](const c10::Event& e) { return e.query(); });
      if (reached) {
        ready.push_back(std::move(it->done));
        it = polled_.erase(it);
      } else {
        ++it;
      }
    }
    lock.unlock();
    for (auto& done : ready) done();
    if (ready.empty()) std::this_thread::sleep_for(std::chrono::microseconds(50));
    lock.lock();
  }
}

Stats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  Stats out = stats_;
  out.all_to_alls_in_flight = all_to_alls_in_flight_;
  out.micro_ops_queued = static_cast<int64_t>(queue_.size());
  out.micro_ops_in_flight = micro_ops_in_flight_;
  return out;
}

void Scheduler::reset_stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  stats_ = Stats{};
}

// Called with mutex_ held, so the trace's order is the order of the scheduler's state changes; the stamps
// are made strictly increasing along it, so that two clock reads that tie cannot blur that order.
void Scheduler::record_locked(TraceEvent::Kind kind, bool begins, uint64_t id) {
  if (!tracing_) return;
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch()).count();
  last_trace_ns_ = std::max(now, last_trace_ns_ + 1);
  const TraceEvent event{kind, begins, id, last_trace_ns_};
  if (trace_.size() < kTraceCapacity) {
    trace_.push_back(event);
    return;
  }
  trace_[trace_head_] = event;
  trace_head_ = (trace_head_ + 1) % kTraceCapacity;
  ++trace_dropped_;
}

void Scheduler::set_tracing(bool on) {
  std::lock_guard<std::mutex> lock(mutex_);
  tracing_ = on;
  if (!on) return;
  trace_.clear();
  trace_.reserve(kTraceCapacity);
  trace_head_ = 0;
  trace_dropped_ = 0;
}

std::vector<TraceEvent> Scheduler::trace() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<TraceEvent> out(trace_.begin() + static_cast<std::ptrdiff_t>(trace_head_), trace_.end());
  out.insert(out.end(), trace_.begin(), trace_.begin() + static_cast<std::ptrdiff_t>(trace_head_));
  return out;
}

int64_t Scheduler::trace_dropped() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return trace_dropped_;
}

void Scheduler::trace_unscheduled(const FuturePtr& future) {
  uint64_t id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!tracing_ || !future) return;
    id = next_unscheduled_++;
    record_locked(TraceEvent::Kind::unscheduled, true, id);
  }
  when_done(future, [this, id] {
    std::lock_guard<std::mutex> lock(mutex_);
    record_locked(TraceEvent::Kind::unscheduled, false, id);
  });
}

Scheduler& instance() {
  static Scheduler* scheduler = new Scheduler();  // leaked on purpose: backend threads may call it at exit
  return *scheduler;
}


AllToAllInFlight::AllToAllInFlight(Scheduler& scheduler) : scheduler_(&scheduler) {
  scheduler_->all_to_all_enqueued();
}

AllToAllInFlight::~AllToAllInFlight() {
  if (scheduler_ != nullptr) scheduler_->all_to_all_completed();
}

void AllToAllInFlight::until_done(const c10::intrusive_ptr<c10d::Work>& work) {
  if (scheduler_ == nullptr || !work) return;
  FuturePtr future;
  try {
    future = work->getFuture();
  } catch (const c10::Error&) {
    return;  // a backend without futures: in flight until the guard's scope ends (after the wait)
  }
  if (!future) return;
  Scheduler* scheduler = std::exchange(scheduler_, nullptr);
  scheduler->when_done(future, [scheduler] { scheduler->all_to_all_completed(); });
}

}  // namespace moeflux::comm_scheduler
