// A C++ consumer of an answer: a thread blocked in pop_wait on the released ring, handing
// each token to a callback. This is what a C++ control loop does with a pydisco answer (the
// ring comes from the runtime: AnswerStream.released_ring in Python, the same TokenRing here);
// it never touches Python. The answer's end record goes to the callback too (so the
// application sees the end and its reason), and then the thread ends.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <stdexcept>
#include <thread>
#include <utility>

#include "clock.hpp"
#include "token.hpp"

namespace pydisco {

class NativeConsumer {
 public:
  using Callback = std::function<void(const TokenRecord&, std::int64_t received_ns)>;

  NativeConsumer(std::shared_ptr<TokenRing> ring, Callback callback)
      : ring_(std::move(ring)), callback_(std::move(callback)) {
    if (!ring_) throw std::invalid_argument("native consumer needs a ring");
    thread_ = std::thread([this] { run(); });
  }

  NativeConsumer(const NativeConsumer&) = delete;
  NativeConsumer& operator=(const NativeConsumer&) = delete;

  ~NativeConsumer() { stop(); }

  // Stops after the token in hand, if any; tokens left in the ring stay there. After the end
  // record the thread has ended already: this only joins it.
  void stop() {
    if (!thread_.joinable()) return;
    stop_.store(true, std::memory_order_release);
    ring_->wake_consumer();
    thread_.join();
  }

  // Tokens handed to the callback (the end record is not one).
  std::uint64_t consumed() const noexcept { return consumed_.load(std::memory_order_acquire); }

  // Whether the end record has been handed to the callback.
  bool finished() const noexcept { return finished_.load(std::memory_order_acquire); }

 private:
  void run() {
    TokenRecord token;
    for (;;) {
      const std::uint32_t ticket = ring_->wake_ticket();  // before the check: see wake_ticket
      if (stop_.load(std::memory_order_acquire)) return;
      if (!ring_->pop_wait(token, -1, ticket)) continue;  // woken: look at stop_ again
      callback_(token, now_ns());
      if (token.is_end()) {
        finished_.store(true, std::memory_order_release);
        return;
      }
      consumed_.fetch_add(1, std::memory_order_release);
    }
  }

  std::shared_ptr<TokenRing> ring_;
  Callback callback_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> consumed_{0};
  std::atomic<bool> finished_{false};
  std::thread thread_;
};

}  // namespace pydisco
