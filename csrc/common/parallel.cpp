// Persistent worker pool behind qx::parallel_for; fork-safe (a forked child starts a fresh pool).
#include "parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace qx {
namespace {

std::atomic<int> g_num_threads{0};
std::atomic<ParallelBackend> g_backend{nullptr};
thread_local bool t_in_parallel = false;

class Pool {
 public:
  // Runs job(i) for i in [1, parts) on workers; the caller runs part 0 itself.
  void run(int parts, const std::function<void(int)>& job) {
    std::lock_guard<std::mutex> serial(run_mutex_);  // one parallel region at a time
    ensure_workers(parts - 1);
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &job;
      parts_ = parts;
      next_ = 1;
      remaining_ = parts - 1;
      ++generation_;
    }
    cv_.notify_all();
    job(0);
    std::unique_lock<std::mutex> lk(m_);
    done_cv_.wait(lk, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) workers_.emplace_back([this] { loop(); });
  }

  void loop() {
    t_in_parallel = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      while (job_ && next_ < parts_) {
        int part = next_++;
        const std::function<void(int)>* job = job_;
        lk.unlock();
        (*job)(part);
        lk.lock();
        if (--remaining_ == 0) done_cv_.notify_one();
      }
    }
  }

  std::mutex run_mutex_, m_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0, next_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

Pool& pool() {
  // Threads do not survive fork(): the child drops (leaks) the parent's pool and builds its own.
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
  static std::mutex create_mutex;
  std::lock_guard<std::mutex> lk(create_mutex);
  if (!g_pool) g_pool = new Pool();  // never destroyed: workers may outlive static destructors
  return *g_pool;
}

}  // namespace

void set_num_threads(int n) { g_num_threads.store(n); }

int num_threads() {
  int n = g_num_threads.load();
  if (n <= 0) n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return n;
}

void set_parallel_backend(ParallelBackend backend) { g_backend.store(backend); }

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (ParallelBackend backend = g_backend.load()) {
    backend(n, grain, fn);
    return;
  }
  int64_t parts = std::min<int64_t>(num_threads(), (n + grain - 1) / grain);
  if (parts <= 1 || t_in_parallel) {
    fn(0, n);
    return;
  }
  auto job = [&](int part) {
    bool was = t_in_parallel;
    t_in_parallel = true;
    int64_t b = n * part / parts, e = n * (part + 1) / parts;
    if (b < e) fn(b, e);
    t_in_parallel = was;
  };
  pool().run(static_cast<int>(parts), job);
}

}  // namespace qx
