// The migration state machine: one per answer, and the single writer of the delivered
// sequence.
//
// Endpoints *offer* tokens at positions; the machine commits an offer only when it comes from
// the endpoint currently allowed to commit and its position is exactly the next one, so each
// position is emitted once and in order whatever the endpoints do. Everything else is
// dropped and counted. Committed tokens go into a TokenRing (usually the pacer's input).
//
// Entering a terminal state (finished, failed, cancelled) pushes one end record
// (TokenRecord::end_of_answer) after the tokens, so whoever reads the ring sees the end and
// its FinishReason without asking the machine. The machine also ends the answer itself, with
// kLength, when position max_tokens - 1 is committed. The output ring must hold the whole
// answer plus its end record (capacity >= max_tokens - start_position + 1); a token offer is
// committed only while the ring has room for it and the end record, so the end always fits.
//
// Two logs, both owned here: commits() has one CommitRecord per committed token (its text is
// committed_text()[text_begin, text_begin + text_len)); transitions() has one
// TransitionRecord per event, whose `position` is the committed count when it happened —
// for won and taken_over, the position of the token that caused them.
//
// Lifecycle events (start, prepare, handover, failures, cancellation) move the machine
// through one transition table (kTable below); an event with no row in the current state
// throws IllegalTransition naming both. Not thread-safe: one owner thread calls it.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "clock.hpp"
#include "token.hpp"

namespace pydisco {

enum class MigrationState : std::uint8_t {
  kIdle,         // nothing started
  kRacing,       // several endpoints started; the first to commit position `committed` wins
  kStreaming,    // one source commits
  kPreparing,    // the source commits while a target prefills the committed prefix
  kHandingOver,  // the source is stopped; the target resumes from the handover position
  kRecovering,   // no endpoint is live (the source failed with no target): waiting for resume
  kFinished,
  kFailed,
  kCancelled,
};
inline constexpr std::size_t kMigrationStateCount = 9;

enum class MigrationEvent : std::uint8_t {
  kStart,          // start(ep): one source
  kRace,           // race(eps): several endpoints, first token wins
  kWon,            // (offer) a racer committed first and becomes the source
  kRacerFailed,    // a racer failed while others are still racing
  kLastRacerFailed,
  kPrepare,        // prepare(target): the target starts prefilling the committed prefix
  kTargetReady,    // the target is ready: the source stops at the committed position
  kTakenOver,      // (offer) the target committed its first token: migration done
  kTargetFailed,
  kSourceFailed,
  kResume,         // resume(ep): a new endpoint continues from the committed prefix
  kFinish,         // (offer_end) the committing endpoint ended the answer
  kCancel,
  kGiveUp,         // no endpoint can continue: the answer fails
};
inline constexpr std::size_t kMigrationEventCount = 14;

inline constexpr std::string_view to_string(MigrationState s) noexcept {
  constexpr std::array<std::string_view, kMigrationStateCount> names{
      "idle", "racing", "streaming", "preparing", "handing_over", "recovering",
      "finished", "failed", "cancelled"};
  return names[static_cast<std::size_t>(s)];
}

inline constexpr std::string_view to_string(MigrationEvent e) noexcept {
  constexpr std::array<std::string_view, kMigrationEventCount> names{
      "start", "race", "won", "racer_failed", "last_racer_failed", "prepare", "target_ready",
      "taken_over", "target_failed", "source_failed", "resume", "finish", "cancel", "give_up"};
  return names[static_cast<std::size_t>(e)];
}

inline constexpr bool is_terminal(MigrationState s) noexcept {
  return s == MigrationState::kFinished || s == MigrationState::kFailed ||
         s == MigrationState::kCancelled;
}

struct Transition {
  MigrationState from;
  MigrationEvent event;
  MigrationState to;
};

// The whole lifecycle in one table. Cancel is legal from every non-terminal state.
inline constexpr std::array kTable{
    Transition{MigrationState::kIdle, MigrationEvent::kStart, MigrationState::kStreaming},
    Transition{MigrationState::kIdle, MigrationEvent::kRace, MigrationState::kRacing},
    Transition{MigrationState::kIdle, MigrationEvent::kCancel, MigrationState::kCancelled},

    Transition{MigrationState::kRacing, MigrationEvent::kWon, MigrationState::kStreaming},
    Transition{MigrationState::kRacing, MigrationEvent::kRacerFailed, MigrationState::kRacing},
    Transition{MigrationState::kRacing, MigrationEvent::kLastRacerFailed, MigrationState::kRecovering},
    Transition{MigrationState::kRacing, MigrationEvent::kFinish, MigrationState::kFinished},
    Transition{MigrationState::kRacing, MigrationEvent::kCancel, MigrationState::kCancelled},

    Transition{MigrationState::kStreaming, MigrationEvent::kPrepare, MigrationState::kPreparing},
    Transition{MigrationState::kStreaming, MigrationEvent::kSourceFailed, MigrationState::kRecovering},
    Transition{MigrationState::kStreaming, MigrationEvent::kFinish, MigrationState::kFinished},
    Transition{MigrationState::kStreaming, MigrationEvent::kCancel, MigrationState::kCancelled},

    Transition{MigrationState::kPreparing, MigrationEvent::kTargetReady, MigrationState::kHandingOver},
    Transition{MigrationState::kPreparing, MigrationEvent::kTargetFailed, MigrationState::kStreaming},
    // Failover to a target that is already prefilling: it resumes from the committed prefix.
    Transition{MigrationState::kPreparing, MigrationEvent::kSourceFailed, MigrationState::kHandingOver},
    Transition{MigrationState::kPreparing, MigrationEvent::kFinish, MigrationState::kFinished},
    Transition{MigrationState::kPreparing, MigrationEvent::kCancel, MigrationState::kCancelled},

    Transition{MigrationState::kHandingOver, MigrationEvent::kTakenOver, MigrationState::kStreaming},
    Transition{MigrationState::kHandingOver, MigrationEvent::kTargetFailed, MigrationState::kRecovering},
    Transition{MigrationState::kHandingOver, MigrationEvent::kFinish, MigrationState::kFinished},
    Transition{MigrationState::kHandingOver, MigrationEvent::kCancel, MigrationState::kCancelled},

    Transition{MigrationState::kRecovering, MigrationEvent::kResume, MigrationState::kHandingOver},
    Transition{MigrationState::kRecovering, MigrationEvent::kGiveUp, MigrationState::kFailed},
    Transition{MigrationState::kRecovering, MigrationEvent::kCancel, MigrationState::kCancelled},
};

class IllegalTransition : public std::logic_error {
 public:
  IllegalTransition(MigrationState state, MigrationEvent event, std::string_view detail = {})
      : std::logic_error(message(state, event, detail)), state_(state), event_(event) {}
  MigrationState state() const noexcept { return state_; }
  MigrationEvent event() const noexcept { return event_; }

 private:
  static std::string message(MigrationState s, MigrationEvent e, std::string_view detail) {
    std::string m = "illegal migration event '";
    m += to_string(e);
    m += "' in state '";
    m += to_string(s);
    m += "'";
    if (!detail.empty()) {
      m += ": ";
      m += detail;
    }
    return m;
  }
  MigrationState state_;
  MigrationEvent event_;
};

inline std::optional<MigrationState> lookup_transition(MigrationState s, MigrationEvent e) noexcept {
  for (const Transition& t : kTable)
    if (t.from == s && t.event == e) return t.to;
  return std::nullopt;
}

// What an endpoint is to this answer right now.
enum class EndpointRole : std::uint8_t {
  kNone,     // never started here
  kRacer,    // racing for the first token
  kSource,   // commits
  kTarget,   // prefilling (preparing) or resuming (handing over)
  kStandby,  // lost the race; its offers are dropped
  kStopped,  // handed over to a target; its offers are dropped
  kFailed,
};

enum class OfferResult : std::uint8_t {
  kCommitted,
  kDuplicate,     // the position is already committed
  kAhead,         // the position skips past the next one
  kNotActive,     // this endpoint may not commit now (preparing target, stopped source, ...)
  kClosed,        // the answer is finished, failed or cancelled
  kBackpressure,  // the output ring is full: not committed, not dropped; offer again later
};

struct EndpointCounters {
  EndpointRole role = EndpointRole::kNone;
  std::uint64_t offered = 0;
  std::uint64_t accepted = 0;
  std::uint64_t dropped = 0;   // duplicate + ahead + not active + closed
  std::uint64_t duplicates = 0;
  std::uint64_t started_at_position = 0;  // committed position when it was (re)started
};

struct TransitionRecord {
  std::int64_t at_ns;
  MigrationState from;
  MigrationEvent event;
  MigrationState to;
  std::uint64_t position;  // committed count then; won / taken_over: the causing token's position
  EndpointId endpoint;     // the endpoint the event concerned
};

// One committed token: the per-token facts of the answer, in commit order.
struct CommitRecord {
  std::uint64_t position;
  std::int32_t token_id;
  EndpointId source;
  std::int64_t produced_ns;
  std::int64_t arrived_ns;   // when it was committed (the caller's now_ns)
  std::uint64_t text_begin;  // its text: committed_text().substr(text_begin, text_len)
  std::uint8_t text_len;
};

class MigrationMachine {
 public:
  static constexpr EndpointId kMaxEndpoints = 64;

  // `max_tokens` bounds the whole answer (positions < max_tokens); by default it is as many
  // tokens as `out` can hold beside the end record: start_position + capacity - 1. A
  // max_tokens the ring cannot hold that way, or one not above start_position, is refused.
  explicit MigrationMachine(std::shared_ptr<TokenRing> out,
                            std::optional<std::uint64_t> max_tokens = std::nullopt,
                            std::uint64_t start_position = 0)
      : out_(std::move(out)),
        max_tokens_(checked_max_tokens(out_.get(), max_tokens, start_position)),
        committed_(start_position) {
    if (max_tokens_ - start_position <= kCommitReserveLimit)
      commits_.reserve(static_cast<std::size_t>(max_tokens_ - start_position));
  }

  // ---- lifecycle events; `now_ns` is the caller's clock (real or virtual) ----

  void start(EndpointId ep, std::int64_t now_ns) {
    fire(MigrationEvent::kStart, ep, now_ns);
    set_role(ep, EndpointRole::kSource);
    source_ = ep;
  }

  void race(const std::vector<EndpointId>& eps, std::int64_t now_ns) {
    if (eps.size() < 2) throw std::invalid_argument("a race needs at least two endpoints");
    for (std::size_t i = 0; i < eps.size(); ++i)
      for (std::size_t j = i + 1; j < eps.size(); ++j)
        if (eps[i] == eps[j]) throw std::invalid_argument("a race needs distinct endpoints");
    fire(MigrationEvent::kRace, eps.front(), now_ns);
    for (EndpointId ep : eps) set_role(ep, EndpointRole::kRacer);
    racers_ = static_cast<std::uint32_t>(eps.size());
  }

  void prepare(EndpointId target, std::int64_t now_ns) {
    check_event(MigrationEvent::kPrepare);
    if (target == source_) throw IllegalTransition(state_, MigrationEvent::kPrepare, "the target is the source");
    fire(MigrationEvent::kPrepare, target, now_ns);
    set_role(target, EndpointRole::kTarget);
    target_ = target;
  }

  // The target has prefilled: the source stops here. Returns the handover position, from
  // which the target must resume (it prefills whatever was committed since it started).
  std::uint64_t target_ready(std::int64_t now_ns) {
    fire(MigrationEvent::kTargetReady, target_, now_ns);
    counters_[source_].role = EndpointRole::kStopped;
    handover_at_ns_ = now_ns;
    return committed_;
  }

  // Reports a failed endpoint. Which row applies depends on its role; the failure of an
  // endpoint that no longer matters (standby, stopped, already failed) changes nothing.
  void endpoint_failed(EndpointId ep, std::int64_t now_ns) {
    check_endpoint(ep);
    const EndpointRole role = ep < counters_.size() ? counters_[ep].role : EndpointRole::kNone;
    if (role == EndpointRole::kNone)
      throw std::invalid_argument("endpoint " + std::to_string(ep) + " was never started on this answer");
    if (is_terminal(state_))
      throw IllegalTransition(state_, MigrationEvent::kSourceFailed, "the answer has ended");
    switch (role) {
      case EndpointRole::kRacer:
        --racers_;
        fire(racers_ == 0 ? MigrationEvent::kLastRacerFailed : MigrationEvent::kRacerFailed, ep, now_ns);
        break;
      case EndpointRole::kSource:
        fire(MigrationEvent::kSourceFailed, ep, now_ns);
        if (state_ == MigrationState::kHandingOver) handover_at_ns_ = now_ns;
        break;
      case EndpointRole::kTarget:
        fire(MigrationEvent::kTargetFailed, ep, now_ns);
        break;
      case EndpointRole::kNone:  // refused above
      case EndpointRole::kStandby:
      case EndpointRole::kStopped:
      case EndpointRole::kFailed:
        break;
    }
    counters_[ep].role = EndpointRole::kFailed;
  }

  // A new endpoint (or a restarted one) continues from the committed prefix.
  std::uint64_t resume(EndpointId ep, std::int64_t now_ns) {
    fire(MigrationEvent::kResume, ep, now_ns);
    set_role(ep, EndpointRole::kTarget);
    target_ = ep;
    handover_at_ns_ = now_ns;
    return committed_;
  }

  // Both end the answer with no endpoint to name: the end record's source is 0.
  void cancel(std::int64_t now_ns) {
    end_answer(MigrationEvent::kCancel, source_, FinishReason::kCancelled, 0, now_ns);
  }

  void give_up(std::int64_t now_ns) {
    end_answer(MigrationEvent::kGiveUp, source_, FinishReason::kFailed, 0, now_ns);
  }

  // ---- the token path ----

  OfferResult offer(EndpointId ep, std::uint64_t position, std::int32_t token_id,
                    std::string_view text, std::int64_t produced_ns, std::int64_t now_ns) {
    TokenRecord::check_text(text);  // not an offer the machine could judge: the caller's error
    EndpointCounters& c = counters_for_offer(ep);
    ++c.offered;
    const OfferResult verdict = judge(ep, position);
    if (verdict != OfferResult::kCommitted) return drop(c, verdict);
    // Room for this token and the end record after it (a ring that started empty has it).
    if (out_->capacity() - out_->size() < 2) {
      --c.offered;  // will be offered again
      return OfferResult::kBackpressure;
    }

    TokenRecord record;
    record.position = position;
    record.token_id = token_id;
    record.source = ep;
    record.produced_ns = produced_ns;
    record.arrived_ns = now_ns;
    [[maybe_unused]] const bool fits = record.set_text(text);  // checked above
    [[maybe_unused]] const bool pushed = out_->try_push_notify(record);  // room checked above
    ++c.accepted;
    commits_.push_back(CommitRecord{position, token_id, ep, produced_ns, now_ns, text_.size(),
                                    record.text_len});
    text_.append(text);
    // won / taken_over are logged at the position of the token that caused them.
    if (state_ == MigrationState::kRacing) {
      fire(MigrationEvent::kWon, ep, now_ns);
      for (auto& other : counters_)
        if (other.role == EndpointRole::kRacer) other.role = EndpointRole::kStandby;
      set_role_keep_start(ep, EndpointRole::kSource);
      source_ = ep;
      racers_ = 0;
    } else if (state_ == MigrationState::kHandingOver) {
      fire(MigrationEvent::kTakenOver, ep, now_ns);
      set_role_keep_start(ep, EndpointRole::kSource);
      source_ = ep;
      ++migrations_;
      last_handover_gap_ns_ = now_ns - handover_at_ns_;
    }
    ++committed_;
    if (committed_ == max_tokens_)
      end_answer(MigrationEvent::kFinish, ep, FinishReason::kLength, ep, now_ns);
    return OfferResult::kCommitted;
  }

  // The committing endpoint says the answer ends here: kStop (end of text, stop string) or
  // kLength (a limit of its own). Anything else is std::invalid_argument.
  OfferResult offer_end(EndpointId ep, std::uint64_t position, FinishReason reason,
                        std::int64_t now_ns) {
    if (reason != FinishReason::kStop && reason != FinishReason::kLength)
      throw std::invalid_argument("an endpoint ends an answer with stop or length, not " +
                                  std::string(to_string(reason)));
    counters_for_offer(ep);  // checks the id; an endpoint never seen gets its (empty) row
    const OfferResult verdict = judge(ep, position);
    if (verdict != OfferResult::kCommitted) return verdict;  // a stale end: nothing to count
    end_answer(MigrationEvent::kFinish, ep, reason, ep, now_ns);
    return OfferResult::kCommitted;
  }

  OfferResult offer_end(EndpointId ep, std::uint64_t position, std::int64_t now_ns) {
    return offer_end(ep, position, FinishReason::kStop, now_ns);
  }

  // ---- what a policy needs ----

  MigrationState state() const noexcept { return state_; }
  // kNone while the answer is live.
  FinishReason finish_reason() const noexcept { return finish_reason_; }
  std::uint64_t max_tokens() const noexcept { return max_tokens_; }
  std::uint64_t committed() const noexcept { return committed_; }
  std::optional<EndpointId> source() const noexcept {
    if (state_ == MigrationState::kStreaming || state_ == MigrationState::kPreparing) return source_;
    return std::nullopt;
  }
  std::optional<EndpointId> target() const noexcept {
    if (state_ == MigrationState::kPreparing || state_ == MigrationState::kHandingOver) return target_;
    return std::nullopt;
  }
  std::uint32_t migrations() const noexcept { return migrations_; }
  // Time from the handover (or failover) decision to the target's first commit, last one.
  std::int64_t last_handover_gap_ns() const noexcept { return last_handover_gap_ns_; }
  const std::vector<CommitRecord>& commits() const noexcept { return commits_; }
  std::vector<std::int32_t> committed_token_ids() const {
    std::vector<std::int32_t> ids;
    ids.reserve(commits_.size());
    for (const CommitRecord& c : commits_) ids.push_back(c.token_id);
    return ids;
  }
  // The committed pieces back to back: what a target resumes from, and what commits() index.
  const std::string& committed_text() const noexcept { return text_; }
  const std::vector<TransitionRecord>& transitions() const noexcept { return log_; }
  const std::shared_ptr<TokenRing>& output() const noexcept { return out_; }

  EndpointCounters counters(EndpointId ep) const {
    check_endpoint(ep);
    return ep < counters_.size() ? counters_[ep] : EndpointCounters{};
  }

  std::vector<EndpointId> endpoints() const {
    std::vector<EndpointId> out;
    for (std::size_t i = 0; i < counters_.size(); ++i)
      if (counters_[i].role != EndpointRole::kNone || counters_[i].offered != 0)
        out.push_back(static_cast<EndpointId>(i));
    return out;
  }

 private:
  // Commit logs up to this long are allocated up front (an answer's usual length).
  static constexpr std::uint64_t kCommitReserveLimit = 8192;

  static std::uint64_t checked_max_tokens(const TokenRing* out,
                                          std::optional<std::uint64_t> max_tokens,
                                          std::uint64_t start_position) {
    if (out == nullptr) throw std::invalid_argument("migration machine needs an output ring");
    const std::uint64_t capacity = out->capacity();
    if (!max_tokens) return start_position + capacity - 1;
    if (*max_tokens <= start_position)
      throw std::invalid_argument("max_tokens (" + std::to_string(*max_tokens) +
                                  ") must exceed start_position (" +
                                  std::to_string(start_position) + ")");
    if (*max_tokens - start_position + 1 > capacity)
      throw std::invalid_argument(
          "an output ring of capacity " + std::to_string(capacity) + " holds " +
          std::to_string(capacity - 1) + " tokens and the end record, not the " +
          std::to_string(*max_tokens - start_position) + " tokens max_tokens allows");
    return *max_tokens;
  }

  OfferResult judge(EndpointId ep, std::uint64_t position) const noexcept {
    if (is_terminal(state_)) return OfferResult::kClosed;
    const EndpointRole role = counters_[ep].role;
    bool may_commit = false;
    switch (state_) {
      case MigrationState::kRacing: may_commit = role == EndpointRole::kRacer; break;
      case MigrationState::kStreaming:
      case MigrationState::kPreparing: may_commit = role == EndpointRole::kSource; break;
      case MigrationState::kHandingOver: may_commit = role == EndpointRole::kTarget; break;
      default: break;
    }
    // Stale positions are duplicates whoever sends them; that is what the counters show.
    if (position < committed_) return OfferResult::kDuplicate;
    if (!may_commit) return OfferResult::kNotActive;
    if (position > committed_) return OfferResult::kAhead;
    return OfferResult::kCommitted;
  }

  static OfferResult drop(EndpointCounters& c, OfferResult why) noexcept {
    ++c.dropped;
    if (why == OfferResult::kDuplicate) ++c.duplicates;
    return why;
  }

  void check_endpoint(EndpointId ep) const {
    if (ep >= kMaxEndpoints)
      throw std::out_of_range("endpoint id " + std::to_string(ep) + " >= " + std::to_string(kMaxEndpoints));
  }

  EndpointCounters& counters_for_offer(EndpointId ep) {
    check_endpoint(ep);
    if (ep >= counters_.size()) counters_.resize(static_cast<std::size_t>(ep) + 1);
    return counters_[ep];
  }

  void set_role(EndpointId ep, EndpointRole role) {
    EndpointCounters& c = counters_for_offer(ep);
    c.role = role;
    c.started_at_position = committed_;
  }

  void set_role_keep_start(EndpointId ep, EndpointRole role) { counters_[ep].role = role; }

  void check_event(MigrationEvent e) const {
    if (!lookup_transition(state_, e)) throw IllegalTransition(state_, e);
  }

  void fire(MigrationEvent e, EndpointId ep, std::int64_t now_ns) {
    check_endpoint(ep);
    const std::optional<MigrationState> next = lookup_transition(state_, e);
    if (!next) throw IllegalTransition(state_, e);
    log_.push_back(TransitionRecord{now_ns, state_, e, *next, committed_, ep});
    state_ = *next;
  }

  // Fires a terminal event `e` (logged for `logged`) and pushes the end record naming
  // `ended_by`. Every commit leaves room for the end record, so only a ring that has been
  // full since before the first commit (filled by someone else) refuses it: then nothing
  // changes and std::logic_error says why.
  void end_answer(MigrationEvent e, EndpointId logged, FinishReason reason, EndpointId ended_by,
                  std::int64_t now_ns) {
    check_event(e);
    if (out_->size() == out_->capacity())
      throw std::logic_error("the output ring has no room for the end record");
    fire(e, logged, now_ns);
    finish_reason_ = reason;
    [[maybe_unused]] const bool pushed =  // room checked above; the machine is the only producer
        out_->try_push_notify(TokenRecord::end_of_answer(committed_, reason, ended_by, now_ns));
  }

  std::shared_ptr<TokenRing> out_;
  std::uint64_t max_tokens_;
  MigrationState state_ = MigrationState::kIdle;
  FinishReason finish_reason_ = FinishReason::kNone;
  std::uint64_t committed_;
  EndpointId source_ = 0;
  EndpointId target_ = 0;
  std::uint32_t racers_ = 0;
  std::uint32_t migrations_ = 0;
  std::int64_t handover_at_ns_ = 0;
  std::int64_t last_handover_gap_ns_ = -1;
  std::vector<EndpointCounters> counters_;
  std::vector<CommitRecord> commits_;
  std::string text_;
  std::vector<TransitionRecord> log_;
};

}  // namespace pydisco
