// The pacer: releases committed tokens to the application on a schedule.
//
// It consumes one TokenRing (filled by the migration machine) and delivers each token either
// into an output TokenRing — signalling an eventfd that a Trio task awaits, and waking a C++
// thread blocked in pop_wait — or to a callback run on the pacer thread. An end record
// (TokenRecord::is_end) is not paced: it goes out as soon as it reaches the head of the input,
// right after the tokens before it, without moving the schedule or the lateness statistics.
//
// Two drivers share one step function (release_due):
//  * start(): a thread that sleeps on a futex until shortly before each deadline and spins
//    the rest (absolute deadlines, so no drift), optionally at SCHED_FIFO priority;
//  * release_due(now) / next_deadline() called by the owner, e.g. a Trio task in virtual time.
// Only one driver runs at a time, and it takes no lock and allocates nothing per token: every
// release goes into a fixed-size lock-free release log (an SpscRing<ReleaseRecord> whose
// writer is the driver; a full log drops the entry and counts it), and the statistics are
// atomics only the driver writes. One thread at a time may take from the log
// (take_releases / take_lateness).
//
// redirect(sink) hands the output ring's consumer side to the driver: from then on each
// release goes through the output ring straight into the sink on the driver's own thread (a
// shared-memory ring: ShmForwarder), with no thread and no wake-up in between. The output
// ring keeps, in order, whatever the sink has no room for yet.
#pragma once

#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "clock.hpp"
#include "futex.hpp"
#include "pace_schedule.hpp"
#include "token.hpp"

namespace pydisco {

// One release, as the release log keeps it. lateness = released_ns - deadline_ns.
struct ReleaseRecord {
  std::uint64_t position = 0;
  std::int64_t deadline_ns = 0;  // effective deadline (an end record: when it was committed)
  std::int64_t released_ns = 0;
  RecordKind kind = RecordKind::kToken;
};

struct PacerStatistics {
  std::uint64_t released = 0;  // tokens (end records are not counted)
  std::int64_t max_lateness_ns = 0;
  double mean_lateness_ns = 0.0;
  std::int64_t interval_ns = 0;
  bool running = false;
  bool realtime = false;        // the driver thread got SCHED_FIFO
  std::size_t backlog = 0;      // committed, not yet released
  std::size_t unread = 0;       // released, not yet taken by the application
  std::uint64_t lateness_samples_dropped = 0;  // release-log entries dropped: the log was full
};

struct PacerOptions {
  std::int64_t interval_ns = 0;
  MissPolicy policy = MissPolicy::kDelay;
  // Sleep until this long before a deadline, then spin. Measured here: futex wake-ups are
  // 50-100 us late at normal priority on an idle machine.
  std::int64_t spin_ns = 200'000;
  // Announce each release this long before its deadline (SpscRing::announce_push, and the
  // eventfd), so the consumer is awake and spinning when the token lands; 0: no announcement.
  // A consumer spins up to this long (plus the ring's slack) per token.
  std::int64_t handoff_lead_ns = 300'000;
  // Release-log entries kept until taken; 0: the input ring's capacity, a whole answer when
  // the input ring is sized for one.
  std::size_t log_capacity = 0;
};

// Where a redirected pacer delivers (see redirect). Called on the driver's thread only.
class ReleaseSink {
 public:
  virtual ~ReleaseSink() = default;
  // Takes one released record; false when it has no room (it is offered again later).
  virtual bool take(const TokenRecord& record) noexcept = 0;
  // The next release is due at `at_ns` (the hand-off announcement, handoff_lead_ns early).
  virtual void announce(std::int64_t at_ns) noexcept = 0;
};

class Pacer {
 public:
  using Callback = std::function<void(const TokenRecord&)>;

  Pacer(std::shared_ptr<TokenRing> input, std::shared_ptr<TokenRing> output,
        PacerOptions options = {})
      : input_(std::move(input)), output_(std::move(output)), options_(options),
        schedule_(options.interval_ns, options.policy),
        log_(log_capacity_for(input_.get(), options.log_capacity)),
        pending_interval_(options.interval_ns) {
    if (options_.spin_ns < 0) throw std::invalid_argument("spin_ns must be >= 0");
    if (options_.handoff_lead_ns < 0) throw std::invalid_argument("handoff_lead_ns must be >= 0");
    event_fd_ = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
  }

  Pacer(const Pacer&) = delete;
  Pacer& operator=(const Pacer&) = delete;

  ~Pacer() {
    stop();
    ::close(event_fd_);
  }

  // Deliver to `callback` on the pacer thread instead of the output ring. Set before start().
  void set_callback(Callback callback) {
    ensure_stopped("set_callback");
    callback_ = std::move(callback);
  }

  // From the driver's next step on, every release goes into `sink` (through the output
  // ring, which then has the driver as its only consumer: nobody else may read it). What the
  // output ring already holds goes first. From any thread; a pacer whose thread is not
  // running hands over here, on the calling thread (the manual driver's). Not with a
  // callback.
  void redirect(std::shared_ptr<ReleaseSink> sink) {
    if (!sink) throw std::invalid_argument("redirect: no sink");
    if (callback_) throw std::logic_error("redirect: this pacer delivers to a callback");
    if (!output_) throw std::logic_error("redirect: this pacer has no output ring");
    std::lock_guard<std::mutex> lifecycle(lifecycle_);
    {
      std::lock_guard<std::mutex> lock(redirect_mutex_);
      pending_sink_ = std::move(sink);
      redirect_pending_.store(true, std::memory_order_release);
    }
    if (!running_.load()) {
      adopt_redirect();
      flush_to_sink();
      return;
    }
    control_.fetch_add(1, std::memory_order_release);
    futex_wake_all(control_);
    input_->wake_consumer();
  }

  // ---- rate control, from any thread; applies from the next token ----

  void set_interval_ns(std::int64_t interval_ns) {
    if (interval_ns < 0) throw std::invalid_argument("pacing interval must be >= 0");
    pending_interval_.store(interval_ns, std::memory_order_release);
    control_.fetch_add(1, std::memory_order_release);
    futex_wake_all(control_);
  }

  void set_rate(double tokens_per_second) {
    if (!(tokens_per_second >= 0.0)) throw std::invalid_argument("rate must be >= 0");
    set_interval_ns(tokens_per_second == 0.0 ? 0
                                             : static_cast<std::int64_t>(1e9 / tokens_per_second));
  }

  std::int64_t interval_ns() const noexcept {
    return pending_interval_.load(std::memory_order_acquire);
  }

  // ---- the manual driver (virtual time, tests) ----

  // Deadline of the oldest unreleased record, or nothing when none is committed.
  std::optional<std::int64_t> next_deadline() {
    ensure_stopped("next_deadline");
    apply_pending_interval();
    const TokenRecord* head = input_->front();
    if (head == nullptr) return std::nullopt;
    return deadline_of(*head).effective;
  }

  // Releases every record whose deadline is <= now_ns, stamped as released at now_ns.
  std::size_t release_due(std::int64_t now_ns) {
    ensure_stopped("release_due");
    return release_from_head(now_ns, /*ignore_deadlines=*/false);
  }

  // Releases every record in the input at now_ns, due or not (an answer that was cancelled or
  // closed: its reader still gets every token and the end record). Tokens released before
  // their deadline log a negative lateness. Stops early only when the output ring is full.
  std::size_t release_all(std::int64_t now_ns) {
    ensure_stopped("release_all");
    return release_from_head(now_ns, /*ignore_deadlines=*/true);
  }

  // A new answer: its first token goes out as soon as it is committed.
  void reset_schedule() {
    ensure_stopped("reset_schedule");
    schedule_.reset();
  }

  // ---- the real-time driver ----

  // Starts the driver thread. With `realtime`, asks for SCHED_FIFO at `priority` and falls
  // back to normal priority when refused; statistics().realtime says which it got.
  void start(bool realtime = true, int priority = 50) {
    std::lock_guard<std::mutex> lock(lifecycle_);
    if (running_.load()) throw std::logic_error("pacer already running");
    stop_.store(false);
    running_.store(true);
    thread_ = std::thread([this] { run(); });
    realtime_.store(false);
    if (realtime) {
      sched_param param{};
      param.sched_priority = priority;
      realtime_.store(::pthread_setschedparam(thread_.native_handle(), SCHED_FIFO, &param) == 0);
    }
  }

  void stop() {
    std::lock_guard<std::mutex> lock(lifecycle_);
    if (!running_.load()) return;
    stop_.store(true, std::memory_order_release);
    control_.fetch_add(1, std::memory_order_release);
    futex_wake_all(control_);
    input_->wake_consumer();
    thread_.join();
    running_.store(false);
  }

  bool running() const noexcept { return running_.load(); }

  // ---- the consumer side ----

  // Readable (counter > 0) whenever released tokens were delivered to the output ring.
  int event_fd() const noexcept { return event_fd_; }

  // Resets the eventfd counter. Call before draining the output ring, never after, so a
  // release that lands in between still leaves it readable.
  void clear_event() noexcept {
    std::uint64_t value = 0;
    [[maybe_unused]] ssize_t rc = ::read(event_fd_, &value, sizeof value);
  }

  const std::shared_ptr<TokenRing>& input() const noexcept { return input_; }
  const std::shared_ptr<TokenRing>& output() const noexcept { return output_; }

  // ---- the release log: one taker at a time; both calls take from the same log ----

  // Every release (tokens and end records) logged since the last take, in release order.
  std::vector<ReleaseRecord> take_releases() {
    std::vector<ReleaseRecord> out;
    out.reserve(log_.size());
    log_.pop_many(log_.capacity(), [&](const ReleaseRecord& r) { out.push_back(r); });
    return out;
  }

  // Lateness (ns) of every token released since the last take, in release order.
  std::vector<std::int64_t> take_lateness() {
    std::vector<std::int64_t> out;
    out.reserve(log_.size());
    log_.pop_many(log_.capacity(), [&](const ReleaseRecord& r) {
      if (r.kind == RecordKind::kToken) out.push_back(r.released_ns - r.deadline_ns);
    });
    return out;
  }

  PacerStatistics statistics() const {
    PacerStatistics s;
    // Relaxed loads of counters the driver writes: each is exact, together they may be one
    // release apart.
    s.released = released_.load(std::memory_order_relaxed);
    s.max_lateness_ns = max_lateness_.load(std::memory_order_relaxed);
    s.mean_lateness_ns =
        s.released == 0 ? 0.0
                        : static_cast<double>(lateness_sum_.load(std::memory_order_relaxed)) /
                              static_cast<double>(s.released);
    s.lateness_samples_dropped = log_.statistics().rejected;
    s.interval_ns = interval_ns();
    s.running = running_.load();
    s.realtime = realtime_.load();
    s.backlog = input_->size();
    s.unread = output_ ? output_->size() : 0;
    return s;
  }

 private:
  static std::size_t log_capacity_for(const TokenRing* input, std::size_t requested) {
    if (input == nullptr) throw std::invalid_argument("pacer needs an input ring");
    return requested != 0 ? requested : input->capacity();
  }

  // A token's deadline comes from the schedule; an end record's is its commit time, so it
  // goes out as soon as it reaches the head.
  Deadline deadline_of(const TokenRecord& head) const noexcept {
    if (head.is_end()) return {head.arrived_ns, head.arrived_ns};
    return schedule_.next(head.arrived_ns);
  }

  std::size_t release_from_head(std::int64_t now_ns, bool ignore_deadlines) {
    apply_pending_interval();
    adopt_redirect();
    flush_to_sink();  // what a full sink refused before
    std::size_t n = 0;
    for (TokenRecord* head = input_->front(); head != nullptr; head = input_->front()) {
      const Deadline d = deadline_of(*head);
      if ((!ignore_deadlines && d.effective > now_ns) || !deliver(*head, d, now_ns)) break;
      input_->pop_front();
      ++n;
    }
    if (n != 0) handed_on();
    return n;
  }

  void ensure_stopped(const char* what) const {
    if (running_.load()) throw std::logic_error(std::string(what) + ": the pacer thread is running");
  }

  void apply_pending_interval() {
    const std::int64_t pending = pending_interval_.load(std::memory_order_acquire);
    if (pending != schedule_.interval_ns()) schedule_.set_interval(pending);
  }

  void run() {
    for (;;) {
      // Both before the stop check, so a stop() after it ends the waits below at once: its
      // bump of control_ changes `control`, its wake_consumer() comes after `wakes`.
      const std::uint32_t control = control_.load(std::memory_order_acquire);
      const std::uint32_t wakes = input_->wake_ticket();
      if (stop_.load(std::memory_order_acquire)) return;
      apply_pending_interval();
      adopt_redirect();
      if (!flush_to_sink()) {
        // The sink is full (its reader is behind): look again shortly, as deliver_blocking
        // does for a full output ring. Tokens wait in the output ring, in order.
        futex_wait_until(control_, control, now_ns() + kFullRetryNs);
        continue;
      }
      TokenRecord* head = input_->front();
      if (head == nullptr) {
        input_->wait_nonempty(-1, wakes);
        continue;
      }
      const Deadline d = deadline_of(*head);
      std::int64_t now = now_ns();
      const std::int64_t wake_at = d.effective - std::max(options_.spin_ns, options_.handoff_lead_ns);
      if (now < wake_at) {
        // Woken early by a rate change or stop: re-evaluate from the top.
        futex_wait_until(control_, control, wake_at);
        continue;
      }
      bool announced = false;
      while (now < d.effective && control_.load(std::memory_order_relaxed) == control) {
        if (!announced && now >= d.effective - options_.handoff_lead_ns) {
          announce(d.effective);
          announced = true;
        }
        cpu_relax();
        now = now_ns();
      }
      if (now < d.effective) continue;
      if (!deliver_blocking(*head, d, now)) continue;
      input_->pop_front();
      handed_on();
    }
  }

  // Hands one record on. False when the output ring is full (the record stays committed).
  bool deliver(TokenRecord& record, Deadline d, std::int64_t now) {
    record.released_ns = now;
    if (callback_) {
      callback_(record);
    } else if (output_ && !output_->try_push_notify(record)) {
      return false;
    }
    if (!record.is_end()) schedule_.on_released(d, now);
    record_release(record, d, now);
    return true;
  }

  // The thread's deliver: an application that stops reading makes the pacer wait, polling
  // for space (rare, and not worth a second doorbell on the consumer's hot path).
  bool deliver_blocking(TokenRecord& token, Deadline d, std::int64_t now) {
    while (!deliver(token, d, now)) {
      if (stop_.load(std::memory_order_acquire)) return false;
      // Redirected, the ring fills only while the sink is full: move what it takes now.
      if (!sink_ || !flush_to_sink()) {
        timespec pause = to_timespec(kFullRetryNs);
        ::nanosleep(&pause, nullptr);
      }
      now = now_ns();
    }
    return true;
  }

  // The next release is due at `at_ns`: wake the consumer now (see handoff_lead_ns).
  void announce(std::int64_t at_ns) noexcept {
    if (callback_ || !output_ || options_.handoff_lead_ns == 0) return;
    if (sink_) {
      sink_->announce(at_ns);
      return;
    }
    output_->announce_push(at_ns);
    signal_consumer();
  }

  // After records went into the output ring: on to the sink, or tell the ring's reader.
  void handed_on() noexcept {
    if (sink_)
      flush_to_sink();
    else
      signal_consumer();
  }

  // The driver's side of redirect(): takes the pending sink, if any.
  void adopt_redirect() {
    if (!redirect_pending_.load(std::memory_order_acquire)) return;
    std::lock_guard<std::mutex> lock(redirect_mutex_);
    sink_ = std::move(pending_sink_);
    pending_sink_.reset();
    redirect_pending_.store(false, std::memory_order_relaxed);
  }

  // Moves the output ring's records into the sink while it takes them. Whether the output
  // ring is now empty (always, when not redirected: then its reader empties it).
  bool flush_to_sink() noexcept {
    if (!sink_) return true;
    for (TokenRecord* r = output_->front(); r != nullptr; r = output_->front()) {
      if (!sink_->take(*r)) return false;
      output_->pop_front();
    }
    return true;
  }

  void signal_consumer() noexcept {
    if (callback_) return;
    const std::uint64_t one = 1;
    [[maybe_unused]] ssize_t rc = ::write(event_fd_, &one, sizeof one);
  }

  // The driver's bookkeeping per release: no lock, no allocation. A full log refuses the
  // entry and counts it (the log's own rejected counter).
  void record_release(const TokenRecord& record, Deadline d, std::int64_t now) noexcept {
    [[maybe_unused]] const bool logged =
        log_.try_push(ReleaseRecord{record.position, d.effective, now, record.kind});
    if (record.is_end()) return;
    // Single writer: a relaxed load and store, no read-modify-write needed.
    const std::int64_t lateness = now - d.effective;
    released_.store(released_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    lateness_sum_.store(lateness_sum_.load(std::memory_order_relaxed) + lateness,
                        std::memory_order_relaxed);
    if (lateness > max_lateness_.load(std::memory_order_relaxed))
      max_lateness_.store(lateness, std::memory_order_relaxed);
  }

  static constexpr std::int64_t kFullRetryNs = 100'000;

  std::shared_ptr<TokenRing> input_;
  std::shared_ptr<TokenRing> output_;
  PacerOptions options_;
  PaceSchedule schedule_;  // owned by whichever driver runs
  SpscRing<ReleaseRecord> log_;  // writer: whichever driver runs; reader: one taker at a time
  Callback callback_;
  int event_fd_ = -1;
  std::shared_ptr<ReleaseSink> sink_;  // the driver's; set from pending_sink_
  std::mutex redirect_mutex_;
  std::shared_ptr<ReleaseSink> pending_sink_;  // guarded by redirect_mutex_
  std::atomic<bool> redirect_pending_{false};

  std::atomic<std::int64_t> pending_interval_;
  std::atomic<std::uint32_t> control_{0};  // bumped on rate change and stop
  std::atomic<bool> stop_{false};
  std::atomic<bool> running_{false};
  std::atomic<bool> realtime_{false};
  std::mutex lifecycle_;
  std::thread thread_;

  // Written only by the driver, read by statistics() from anywhere.
  std::atomic<std::uint64_t> released_{0};
  std::atomic<std::int64_t> lateness_sum_{0};
  std::atomic<std::int64_t> max_lateness_{0};
};

}  // namespace pydisco
