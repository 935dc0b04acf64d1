// The shared-memory ring: records cross intact and in order (also between two mappings, as
// between two processes), a full ring refuses, another layout version is refused with a clear
// error, a killed producer is reported within 100 ms and a restarted one re-attached.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "check.hpp"
#include "pydisco/shm_ring.hpp"

using namespace pydisco;

static std::string unique_name(const char* what) {
  static int n = 0;
  return "pydisco-test-" + std::to_string(::getpid()) + "-" + what + "-" + std::to_string(n++);
}

// Every field a function of the position, so a torn or misplaced record shows.
static TokenRecord record_for(std::uint64_t pos) {
  TokenRecord r;
  r.position = pos;
  r.token_id = static_cast<std::int32_t>(pos * 7 % 100'000);
  r.produced_ns = static_cast<std::int64_t>(pos * 3);
  r.arrived_ns = static_cast<std::int64_t>(pos * 5);
  r.source = static_cast<EndpointId>(pos % 3);
  const std::string text = "t" + std::to_string(pos) + std::string(pos % 60, 'x');
  CHECK(r.set_text(text));
  return r;
}

static bool intact(const TokenRecord& r, std::uint64_t pos) {
  const TokenRecord e = record_for(pos);
  return !r.is_end() && r.position == pos && r.token_id == e.token_id &&
         r.produced_ns == e.produced_ns && r.arrived_ns == e.arrived_ns && r.source == e.source &&
         r.text_view() == e.text_view();
}

static void push_all(ShmRingProducer& producer, std::uint64_t count) {
  for (std::uint64_t i = 0; i < count; ++i)
    while (!producer.try_push(record_for(i))) std::this_thread::yield();
  while (!producer.try_push(TokenRecord::end_of_answer(count, FinishReason::kStop, 1, now_ns())))
    std::this_thread::yield();
}

// Producer and consumer each map the segment, as two processes do: every record intact, in
// order, then the end record.
static void records_cross_two_mappings_intact() {
  const std::string name = unique_name("two-mappings");
  ShmRingProducer producer(name, 64);
  auto consumer = ShmRingConsumer::attach(name);
  CHECK(consumer->generation() == producer.generation() && consumer->capacity() == 64);
  constexpr std::uint64_t kCount = 100'000;
  std::thread writer([&] { push_all(producer, kCount); });
  TokenRecord r;
  for (std::uint64_t i = 0; i < kCount; ++i) {
    CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord);
    CHECK(intact(r, i));
  }
  CHECK(consumer->pop_wait(r, now_ns() + 10'000'000'000) == ShmRead::kRecord);
  CHECK(r.is_end() && r.position == kCount && r.finish_reason() == FinishReason::kStop);
  writer.join();
  CHECK(consumer->statistics().pushed == kCount + 1 && consumer->statistics().size == 0);
  ShmRingProducer::unlink(name);
}

// The same, both sides on one mapping: here ThreadSanitizer sees both sides' accesses at the
// same addresses, so a missing release/acquire would be reported.
static void records_cross_one_mapping_race_free() {
  const std::string name = unique_name("one-mapping");
  ShmRingProducer producer(name, 16);
  ShmRingView consumer(producer.header(), producer.slots());
  constexpr std::uint64_t kCount = 50'000;
  std::thread writer([&] { push_all(producer, kCount); });
  TokenRecord r;
  // A wait may end with nothing (a late doorbell from a push already taken): wait again.
  const std::int64_t give_up = now_ns() + 60'000'000'000;
  auto next = [&] {
    while (!consumer.try_pop(r)) {
      CHECK(now_ns() < give_up);
      (void)consumer.wait_nonempty(now_ns() + 1'000'000'000);
    }
  };
  for (std::uint64_t i = 0; i < kCount; ++i) {
    next();
    CHECK(intact(r, i));
  }
  next();
  CHECK(r.is_end());
  writer.join();
  ShmRingProducer::unlink(name);
}

static void a_full_ring_refuses_and_keeps_its_records() {
  const std::string name = unique_name("full");
  ShmRingProducer producer(name, 4);
  for (std::uint64_t i = 0; i < 4; ++i) CHECK(producer.try_push(record_for(i)));
  CHECK(!producer.try_push(record_for(4)));
  CHECK(producer.statistics().rejected == 1 && producer.statistics().high_water == 4);
  auto consumer = ShmRingConsumer::attach(name);
  TokenRecord r;
  for (std::uint64_t i = 0; i < 4; ++i) {
    CHECK(consumer->try_pop(r) == ShmRead::kRecord);
    CHECK(intact(r, i));
  }
  CHECK(consumer->try_pop(r) == ShmRead::kEmpty);
  CHECK(producer.try_push(record_for(4)));
  CHECK(consumer->try_pop(r) == ShmRead::kRecord && intact(r, 4));
  ShmRingProducer::unlink(name);
}

// A segment written by hand with another layout version (or something else entirely).
static void write_fake_segment(const std::string& name, std::uint64_t magic, std::uint32_t version) {
  const std::string path = "/" + name;
  const int fd = ::shm_open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0600);
  CHECK(fd >= 0);
  CHECK(::ftruncate(fd, 4096) == 0);
  unsigned char bytes[16] = {};
  std::memcpy(bytes, &magic, 8);
  std::memcpy(bytes + 8, &version, 4);
  CHECK(::pwrite(fd, bytes, sizeof bytes, 0) == static_cast<ssize_t>(sizeof bytes));
  ::close(fd);
}

static void another_layout_version_is_refused_clearly() {
  const std::string name = unique_name("version");
  write_fake_segment(name, kShmRingMagic, 99);
  std::unique_ptr<ShmRingConsumer> consumer;
  std::string why;
  CHECK(ShmRingConsumer::try_attach(name, consumer, why) == ShmAttach::kRefused && !consumer);
  CHECK(why.find("layout version 99") != std::string::npos);
  CHECK(why.find("reads version " + std::to_string(kShmRingLayoutVersion)) != std::string::npos);
  CHECK_THROWS(ShmRingConsumer::attach(name), ShmRingError);
  // The reader reports it once, not on every poll.
  ShmRingReader reader(name, ShmReaderOptions{.reattach_interval_ns = 0});
  TokenRecord r;
  CHECK(reader.poll(r) == ShmEvent::kRefused && reader.error() == why);
  CHECK(reader.poll(r) == ShmEvent::kNone);

  write_fake_segment(name, 0x1234, 1);
  CHECK(ShmRingConsumer::try_attach(name, consumer, why) == ShmAttach::kRefused);
  CHECK(why.find("not a pydisco token ring") != std::string::npos);
  // A stale segment of any kind with no live producer is replaced by a new producer.
  ShmRingProducer producer(name, 8);
  CHECK(ShmRingConsumer::try_attach(name, consumer, why) == ShmAttach::kAttached);
  ShmRingProducer::unlink(name);
}

static void names_producers_and_consumers_are_checked() {
  CHECK_THROWS(ShmRingProducer("a/b"), ShmRingError);
  CHECK_THROWS(ShmRingProducer(""), ShmRingError);
  CHECK_THROWS(ShmRingProducer(".hidden"), ShmRingError);
  const std::string name = unique_name("owned");
  std::unique_ptr<ShmRingConsumer> consumer;
  std::string why;
  CHECK(ShmRingConsumer::try_attach(name, consumer, why) == ShmAttach::kNoRing);
  ShmRingProducer producer("/" + name, 8);  // a leading slash is accepted
  CHECK(producer.generation() == 1);
  CHECK_THROWS(ShmRingProducer(name, 8), ShmRingError);  // its producer is alive
  CHECK(!producer.consumer_attached());
  CHECK(ShmRingConsumer::try_attach(name, consumer, why) == ShmAttach::kAttached);
  CHECK(producer.consumer_attached());
  std::unique_ptr<ShmRingConsumer> second;
  CHECK(ShmRingConsumer::try_attach(name, second, why) == ShmAttach::kRefused);
  CHECK(why.find("already has a consumer") != std::string::npos);
  consumer.reset();
  CHECK(ShmRingConsumer::try_attach(name, second, why) == ShmAttach::kAttached);
  ShmRingProducer::unlink(name);
}

// close(): the consumer reads what is left, then learns the producer is gone — at once, not
// after a liveness interval. A new producer of the name is the next generation.
static void a_clean_close_is_seen_after_the_last_record() {
  const std::string name = unique_name("close");
  std::uint64_t generation = 0;
  {
    ShmRingProducer producer(name, 8);
    generation = producer.generation();
    auto consumer = ShmRingConsumer::attach(name, 10'000'000'000);  // liveness never polled
    CHECK(producer.try_push(record_for(0)));
    CHECK(producer.try_push(TokenRecord::end_of_answer(1, FinishReason::kLength, 2, now_ns())));
    producer.close();
    CHECK(!producer.try_push(record_for(1)));
    TokenRecord r;
    CHECK(consumer->try_pop(r) == ShmRead::kRecord && intact(r, 0));
    CHECK(consumer->try_pop(r) == ShmRead::kRecord && r.is_end());
    CHECK(consumer->pop_wait(r, now_ns() + 1'000'000'000) == ShmRead::kProducerGone);
    CHECK(consumer->producer_closed() && !consumer->producer_alive());
  }
  ShmRingProducer next(name, 8);
  CHECK(next.generation() == generation + 1);
  ShmRingProducer::unlink(name);
}

// A wait that begins after the producer closed returns at once: nothing more will come, so it
// must not sleep out its liveness slice (10 s here) on a doorbell that already rang.
static void a_wait_after_a_close_returns_at_once() {
  const std::string name = unique_name("closed-wait");
  {
    ShmRingProducer producer(name, 8);
    auto consumer = ShmRingConsumer::attach(name, 10'000'000'000);
    producer.close();
    const std::int64_t started = now_ns();
    consumer->wait_readable(-1);
    CHECK(now_ns() - started < 2'000'000'000);
    TokenRecord r;
    CHECK(consumer->try_pop(r) == ShmRead::kProducerGone);
  }
  ShmRingProducer::unlink(name);
}

// A child process owns a producer, pushes `count` records and says so, then waits to be
// killed (or closes and exits when `close_after` is set).
static pid_t spawn_producer(const std::string& name, std::uint64_t count) {
  int ready[2];
  CHECK(::pipe(ready) == 0);
  const pid_t pid = ::fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    ::close(ready[0]);
    {
      ShmRingProducer producer(name, 16);
      for (std::uint64_t i = 0; i < count; ++i)
        if (!producer.try_push(record_for(i))) ::_exit(3);
      const char ok = 1;
      if (::write(ready[1], &ok, 1) != 1) ::_exit(4);
      for (;;) ::pause();
    }
  }
  ::close(ready[1]);
  char ok = 0;
  CHECK(::read(ready[0], &ok, 1) == 1 && ok == 1);
  ::close(ready[0]);
  return pid;
}

static ShmEvent next_event(ShmRingReader& reader, TokenRecord& r) {
  return reader.wait(r, now_ns() + 5'000'000'000);
}

static void a_killed_producer_is_reported_within_100ms_and_a_restart_reattached() {
  const std::string name = unique_name("killed");
  ShmRingReader reader(name);
  TokenRecord r;
  CHECK(reader.poll(r) == ShmEvent::kNone && !reader.attached());

  const pid_t first = spawn_producer(name, 3);
  CHECK(next_event(reader, r) == ShmEvent::kAttached && reader.generation() == 1);
  CHECK(reader.producer_pid() == first);
  for (std::uint64_t i = 0; i < 3; ++i) CHECK(next_event(reader, r) == ShmEvent::kRecord && intact(r, i));
  // Mid-answer: no end record came. Not reaped yet, so it is a zombie while we wait — the
  // kernel lock still says it is gone.
  CHECK(::kill(first, SIGKILL) == 0);
  const std::int64_t killed_at = now_ns();
  CHECK(next_event(reader, r) == ShmEvent::kProducerLost);
  const std::int64_t noticed_ns = now_ns() - killed_at;
  std::printf("producer death noticed after %.1f ms\n", static_cast<double>(noticed_ns) / 1e6);
  CHECK(noticed_ns < 100'000'000);
  CHECK(!reader.attached());
  int status = 0;
  CHECK(::waitpid(first, &status, 0) == first && WIFSIGNALED(status));

  // The stale segment is not attached to; a restarted producer is, as the next generation.
  CHECK(reader.wait(r, now_ns() + 50'000'000) == ShmEvent::kNone);
  const pid_t second = spawn_producer(name, 2);
  CHECK(next_event(reader, r) == ShmEvent::kAttached && reader.generation() == 2);
  for (std::uint64_t i = 0; i < 2; ++i) CHECK(next_event(reader, r) == ShmEvent::kRecord && intact(r, i));
  CHECK(::kill(second, SIGKILL) == 0);
  CHECK(next_event(reader, r) == ShmEvent::kProducerLost);
  CHECK(::waitpid(second, &status, 0) == second);
  ShmRingProducer::unlink(name);
}

int main() {
  records_cross_two_mappings_intact();
  records_cross_one_mapping_race_free();
  a_full_ring_refuses_and_keeps_its_records();
  another_layout_version_is_refused_clearly();
  names_producers_and_consumers_are_checked();
  a_clean_close_is_seen_after_the_last_record();
  a_wait_after_a_close_returns_at_once();
  a_killed_producer_is_reported_within_100ms_and_a_restart_reattached();
  std::puts("test_shm_ring: ok");
  return 0;
}
