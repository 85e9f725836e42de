// Ctrl-C during a kernel: while a call made from the main thread runs with the GIL released,
// SIGINT only sets a flag that the kernels poll between query tiles; afterwards the previous
// handler is restored and the signal is handed to Python. Binding plumbing, no attention logic.
#pragma once

#include <pthread.h>
#include <signal.h>

#include <atomic>

namespace sparse_attn {

class InterruptScope {
 public:
  // Call at module import (on the main thread) to remember which thread that is.
  static void remember_main_thread() { main_thread() = pthread_self(); }

  InterruptScope() {
    active_ = pthread_equal(pthread_self(), main_thread()) != 0;
    if (!active_) return;
    // Only the main thread's call owns the flag: a call starting on another thread must not
    // clear a Ctrl-C that the main thread's running call has not yet seen.
    flag().store(false);
    struct sigaction action {};
    action.sa_handler = &on_signal;
    sigemptyset(&action.sa_mask);
    active_ = sigaction(SIGINT, &action, &previous_) == 0;
  }
  ~InterruptScope() {
    if (active_) sigaction(SIGINT, &previous_, nullptr);
  }
  InterruptScope(const InterruptScope&) = delete;
  InterruptScope& operator=(const InterruptScope&) = delete;

  // The flag the kernels poll, or null when this call cannot be interrupted (not main thread).
  const std::atomic<bool>* cancel() const { return active_ ? &flag() : nullptr; }
  bool interrupted() const { return active_ && flag().load(); }

 private:
  static void on_signal(int) { flag().store(true); }
  static std::atomic<bool>& flag() {
    static std::atomic<bool> value{false};
    return value;
  }
  static pthread_t& main_thread() {
    static pthread_t id = pthread_self();
    return id;
  }

  bool active_ = false;
  struct sigaction previous_ {};
};

}  // namespace sparse_attn
