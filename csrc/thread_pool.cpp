#include "thread_pool.h"

#include <unistd.h>

#include <chrono>
#include <new>

namespace ql {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}
constexpr auto kSpin = std::chrono::microseconds(50);

// Spins until pred() or kSpin elapses; returns pred().
template <class Pred>
bool spin_until(Pred pred) {
  const auto start = std::chrono::steady_clock::now();
  while (!pred()) {
    if (std::chrono::steady_clock::now() - start > kSpin) return false;
    for (int i = 0; i < 64; ++i) cpu_relax();
  }
  return true;
}
}  // namespace

ThreadPool& ThreadPool::global() {
  static ThreadPool pool;
  return pool;
}

ThreadPool::~ThreadPool() {
  if (owner_pid_ != 0 && owner_pid_ != static_cast<long>(getpid())) return;  // forked child
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

// After fork() the child has none of the parent's workers: forget them (their std::thread objects
// are leaked on purpose, destroying or joining them would be undefined) and start afresh.
void ThreadPool::reset_after_fork() {
  new (&workers_) std::vector<std::thread>();
  owner_pid_ = static_cast<long>(getpid());
}

void ThreadPool::grow(int workers) {
  if (owner_pid_ != static_cast<long>(getpid())) {
    if (owner_pid_ != 0) reset_after_fork();
    owner_pid_ = static_cast<long>(getpid());
  }
  while (static_cast<int>(workers_.size()) < workers) workers_.emplace_back([this] { worker(); });
}

void ThreadPool::run(int threads, const std::function<void()>& fn) {
  if (threads <= 1) {
    fn();
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mutex_);
  grow(threads - 1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &fn;
    job_workers_ = threads - 1;
    const uint64_t gen = generation_.load() + 1;
    entry_.store((gen & 0xffffffffu) << 32);
    finished_.store(0);
    generation_.store(gen, std::memory_order_release);
  }
  wake_.notify_all();
  fn();
  // Close the job: workers that have not joined yet never will; wait for those that did.
  const uint32_t joined = static_cast<uint32_t>(entry_.fetch_or(kClosed) & (kClosed - 1));
  auto all_done = [&] { return finished_.load(std::memory_order_acquire) == joined; };
  if (!spin_until(all_done)) {
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, all_done);
  }
}

void ThreadPool::worker() {
  uint64_t seen = generation_.load();
  for (;;) {
    spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
    const std::function<void()>* job;
    int wanted;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stop_ || generation_.load() != seen; });
      if (stop_) return;
      seen = generation_.load();
      job = job_;
      wanted = job_workers_;
    }
    // Join only this generation's job, only while it is open and short of workers.
    uint64_t e = entry_.load();
    bool joined = false;
    while ((e >> 32) == (seen & 0xffffffffu) && !(e & kClosed) &&
           static_cast<int>(e & (kClosed - 1)) < wanted) {
      if (entry_.compare_exchange_weak(e, e + 1)) {
        joined = true;
        break;
      }
    }
    if (!joined) continue;
    (*job)();
    finished_.fetch_add(1, std::memory_order_acq_rel);
    std::lock_guard<std::mutex> lock(mutex_);  // pairs with the caller's predicate check
    done_.notify_all();
  }
}

}  // namespace ql
