// grpc_front: a small C++ gRPC server that owns a service's public gRPC port and forwards every
// call, as raw message bytes, over one Unix stream socket to the Python service, which runs the
// handlers and answers with frames. The frame protocol and the command line are in PROTOCOL.md
// (next to this file); services/core/native_front.py is the other end.
//
// It also makes the service's outbound unary calls (OUT_CALL): the service asks, the front calls
// the target with grpc's C++ client and sends the result back (OUT_RESULT).
//
// Threads: one completion-queue thread runs every call's state machine, inbound and outbound
// (grpc's async API: no grpc-owned callback threads, no executor hops); one reader thread parses
// frames from the service and drives the calls; one writer thread writes the frames queued by
// everyone else (many frames per syscall under load; at low load a small frame is written by the
// thread that sends it, one thread wakeup less); one thread waits for SIGTERM/SIGINT; the
// main thread waits for the end (backend gone, signal, or SHUTDOWN) and exits.

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/server_context.h>
#include <grpcpp/grpcpp.h>

#include <signal.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

enum Kind : uint8_t {
  kCall = 1, kMessage = 2, kHalfClose = 3, kCancel = 4, kFinish = 5, kShutdown = 6, kDrained = 7,
  kOutCall = 8, kOutCancel = 9, kOutResult = 10,
};
constexpr uint8_t kStreamingRequest = 1;       // CALL flags bit 0
constexpr size_t kReadChunk = 256 * 1024;      // reader buffer; larger frames are read in place
constexpr size_t kCopyBelow = 4096;            // smaller payload slices are copied into the batch
constexpr size_t kInlineBelow = 16 * 1024;     // smaller frames may be written by their sender
constexpr int kInlineMaxActive = 2;            // ... while at most this many calls are in flight
constexpr int kCallsRequested = 32;            // incoming calls requested ahead
// Outbound timeouts this long (100 years) are no deadline: the clock arithmetic would overflow.
constexpr int64_t kFarTimeoutUs = int64_t(100) * 365 * 24 * 3600 * 1000000;

// ---- encoding (little-endian) ---------------------------------------------------------------

template <class T>
void PutInt(std::string& out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out.push_back(static_cast<char>(uint64_t(value) >> (8 * i)));
}

void PutStr16(std::string& out, const char* data, size_t size) {
  size = std::min<size_t>(size, UINT16_MAX);
  PutInt<uint16_t>(out, static_cast<uint16_t>(size));
  out.append(data, size);
}

void PutBytes32(std::string& out, const char* data, size_t size) {
  PutInt<uint32_t>(out, static_cast<uint32_t>(size));
  out.append(data, size);
}

using Metadata = std::multimap<grpc::string_ref, grpc::string_ref>;
using MetadataList = std::vector<std::pair<std::string, std::string>>;

// `meta`: the entries of `meta` but grpc's own pseudo-headers (`:path`...).
void PutMeta(std::string& out, const Metadata& meta) {
  size_t count_at = out.size();
  uint16_t count = 0;
  PutInt<uint16_t>(out, 0);
  for (const auto& [key, value] : meta) {
    if (key.empty() || key.data()[0] == ':' || count == UINT16_MAX) continue;
    PutStr16(out, key.data(), key.size());
    PutBytes32(out, value.data(), value.size());
    ++count;
  }
  out[count_at] = static_cast<char>(count & 0xff);
  out[count_at + 1] = static_cast<char>(count >> 8);
}

// A frame's length prefix (patched by Output::Send), kind and call number.
std::string FrameHead(Kind kind, uint64_t call) {
  std::string head;
  head.reserve(128);
  PutInt<uint32_t>(head, 0);
  head.push_back(static_cast<char>(kind));
  PutInt<uint64_t>(head, call);
  return head;
}

// Reads the fields of one frame body; `ok` turns false when the body is too short.
struct Cursor {
  const char* at;
  size_t left;
  bool ok = true;

  template <class T>
  T Int() {
    if (left < sizeof(T)) return Fail<T>();
    uint64_t value = 0;
    for (size_t i = 0; i < sizeof(T); ++i) value |= uint64_t(static_cast<uint8_t>(at[i])) << (8 * i);
    Skip(sizeof(T));
    return static_cast<T>(value);
  }
  std::string Bytes(size_t size) {
    if (left < size) return Fail<std::string>();
    std::string value(at, size);
    Skip(size);
    return value;
  }
  MetadataList Meta() {
    MetadataList meta(Int<uint16_t>());
    for (auto& [key, value] : meta) {
      key = Bytes(Int<uint16_t>());
      value = Bytes(Int<uint32_t>());
    }
    return meta;
  }
  void Skip(size_t size) { at += size; left -= size; }
  template <class T>
  T Fail() { ok = false; left = 0; return T(); }
};

// ---- the writer: all frames go through one buffer and one thread ----------------------------

void OnBackendLost(int exit_code);

// Calls in flight, incoming and outgoing (the writer's measure of load).
std::atomic<int> g_active{0};

class Output {
 public:
  // Queues one frame: `head` (from FrameHead, fields appended) followed by the payload slices.
  // At low load (kInlineMaxActive calls or fewer in flight) a small frame with nothing queued or
  // being written is written by the calling thread itself: that saves waking the writer thread,
  // a context switch per frame. Under load the sending (completion-queue) thread only queues:
  // writing there would hold up the next completions, and the writer batches frames anyway.
  void Send(std::string head, const std::vector<grpc::Slice>& payload = {}) {
    size_t size = head.size() - 4;
    for (const auto& slice : payload) size += slice.size();
    for (int i = 0; i < 4; ++i) head[i] = static_cast<char>(size >> (8 * i));
    bool light = size < kInlineBelow && g_active.load(std::memory_order_relaxed) <= kInlineMaxActive;
    bool inline_write = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
      inline_write = light && !busy_ && bytes_.empty() && big_.empty();
      if (inline_write) busy_ = true;  // the writer thread keeps off until this write is done
    }
    if (inline_write) {
      std::string bytes = std::move(head);
      for (const auto& slice : payload) {
        bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
      }
      std::vector<iovec> iov{{bytes.data(), bytes.size()}};
      bool ok = WriteAll(fd_, iov);
      bool wake = false;
      {
        std::lock_guard<std::mutex> lock(mu_);
        busy_ = false;
        if (!ok) failed_ = true;
        // The writer thread waits on cv_ all the time: wake it only when it has something to do
        // (frames queued meanwhile, a failure) or a Flush waits, not after every inline write.
        wake = failed_ || !bytes_.empty() || !big_.empty() || flush_waiters_ > 0;
      }
      if (wake) cv_.notify_all();
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_) return;
      bytes_ += head;
      for (const auto& slice : payload) {
        if (slice.size() < kCopyBelow) {
          bytes_.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
        } else {
          big_.push_back({bytes_.size(), slice});
        }
      }
    }
    cv_.notify_all();  // no system call unless the writer is waiting
  }

  // Waits until everything queued so far is written (or writing failed).
  void Flush() {
    std::unique_lock<std::mutex> lock(mu_);
    ++flush_waiters_;
    cv_.wait(lock, [this] { return failed_ || (!busy_ && bytes_.empty() && big_.empty()); });
    --flush_waiters_;
  }

  // The writer thread's body: takes the whole batch, writes it, repeats. `busy_` says someone
  // (this thread or an inline Send) is writing; only one writes at a time, so frames keep order.
  void Run(int fd) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      fd_ = fd;
      busy_ = false;
    }
    cv_.notify_all();
    std::string bytes;
    std::vector<Big> big;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return failed_ || (!busy_ && (!bytes_.empty() || !big_.empty())); });
        if (failed_) break;
        bytes.clear();
        big.clear();
        bytes.swap(bytes_);
        big.swap(big_);
        busy_ = true;
      }
      bool ok = WriteBatch(fd, bytes, big);
      {
        std::lock_guard<std::mutex> lock(mu_);
        busy_ = false;
        if (!ok) failed_ = true;
      }
      cv_.notify_all();
      if (!ok) break;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed_ = true;
      cv_.notify_all();
    }
    OnBackendLost(0);
  }

 private:
  struct Big {
    size_t at;  // offset in bytes_ where the slice goes
    grpc::Slice slice;
  };

  static bool WriteBatch(int fd, const std::string& bytes, const std::vector<Big>& big) {
    std::vector<iovec> iov;
    size_t done = 0;
    for (const auto& piece : big) {
      if (piece.at > done) iov.push_back({const_cast<char*>(bytes.data()) + done, piece.at - done});
      iov.push_back({const_cast<uint8_t*>(piece.slice.begin()), piece.slice.size()});
      done = piece.at;
    }
    if (bytes.size() > done) iov.push_back({const_cast<char*>(bytes.data()) + done, bytes.size() - done});
    return WriteAll(fd, iov);
  }

  static bool WriteAll(int fd, std::vector<iovec>& iov) {
    size_t first = 0;
    while (first < iov.size()) {
      int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
      ssize_t n = writev(fd, &iov[first], count);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return false;
      for (size_t left = static_cast<size_t>(n); left > 0;) {
        size_t step = std::min(left, iov[first].iov_len);
        iov[first].iov_base = static_cast<char*>(iov[first].iov_base) + step;
        iov[first].iov_len -= step;
        left -= step;
        if (iov[first].iov_len == 0) ++first;
      }
      while (first < iov.size() && iov[first].iov_len == 0) ++first;
    }
    return true;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::string bytes_;
  std::vector<Big> big_;
  int fd_ = -1;
  bool busy_ = true;  // until Run knows the socket, frames queue for it
  bool failed_ = false;
  int flush_waiters_ = 0;
};

Output g_out;

// ---- shared state: the calls in flight and how the front stops ------------------------------

class Call;
std::mutex g_mu;  // guards everything below
std::condition_variable g_cv;
std::unordered_map<uint64_t, std::shared_ptr<Call>> g_calls;
uint64_t g_next_call = 1;
bool g_lost = false;                // backend gone, signal, or bad frame: stop now
int g_exit_code = 0;
bool g_shutdown_requested = false;  // SHUTDOWN frame seen
uint32_t g_grace_ms = 0;
bool g_shutdown_returned = false;   // Server::Shutdown has returned

std::unordered_set<std::string> g_streaming_methods;
int g_max_message_bytes = INT_MAX;

// grpc aborts the process on metadata it considers illegal (it calls that API misuse), so what
// the service sends is checked first; grpc- and : keys are grpc's own.
bool IsLegalMetadata(const std::string& key, const std::string& value) {
  grpc_slice k = grpc::SliceReferencingString(key), v = grpc::SliceReferencingString(value);
  return key[0] != ':' && key.compare(0, 5, "grpc-") != 0 && grpc_header_key_is_legal(k) &&
         (grpc_is_binary_header(k) || grpc_header_nonbin_value_is_legal(v));
}

void OnBackendLost(int exit_code) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (!g_lost) g_exit_code = exit_code;
  g_lost = true;
  g_cv.notify_all();
}

std::shared_ptr<Call> FindCall(uint64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_calls.find(id);
  return it == g_calls.end() ? nullptr : it->second;
}

// ---- one call ------------------------------------------------------------------------------
//
// The async API: every operation's completion comes back as a tag on a completion queue that
// our own CQ thread drains (no grpc-owned callback threads, no executor hops). All state is
// guarded by mu_, taken by the CQ thread (completions) and the reader thread (service frames).
// g_calls holds the call from its start until its last tag has come back; the reader thread
// holds its own reference while it works on a call; over_ says no more operations may start.

grpc::AsyncGenericService g_service;

class Call {
 public:
  enum Op { kStarted, kRead, kWrite, kFinish, kDone, kOutbound /* an OutboundCall's Finish */ };
  struct Tag {
    Call* call;
    Op op;
  };

  // Requests the next incoming call on `cq` (the object deletes itself if none comes).
  static void Request(grpc::ServerCompletionQueue* cq) {
    auto* call = new Call(cq);
    call->ctx_.AsyncNotifyWhenDone(&call->done_tag_);
    g_service.RequestCall(&call->ctx_, &call->stream_, cq, cq, &call->started_tag_);
  }

  // A completion from the CQ thread.
  static void OnEvent(Tag* tag, bool ok) {
    if (tag->op == kStarted) return tag->call->OnStarted(ok);
    std::shared_ptr<Call> keep;  // released last: may delete the call
    std::lock_guard<std::mutex> lock(tag->call->mu_);
    tag->call->OnCompletion(tag->op, ok, &keep);
  }

  // MESSAGE from the service: one response message.
  void OnServiceMessage(grpc::Slice payload) {
    std::lock_guard<std::mutex> lock(mu_);
    if (over_ || finish_received_ || cancelled_ || broken_) return;
    responses_.push_back(std::move(payload));
    Pump();
  }

  // FINISH from the service.
  void OnServiceFinish(grpc::Status status, MetadataList trailing, bool has_payload,
                       grpc::Slice payload) {
    std::lock_guard<std::mutex> lock(mu_);
    if (over_ || finish_received_ || cancelled_) return;
    for (auto& [key, value] : trailing) {
      if (IsLegalMetadata(key, value)) {
        ctx_.AddTrailingMetadata(key, value);
      } else {
        fprintf(stderr, "grpc_front: dropping illegal trailing metadata key %s\n", key.c_str());
      }
    }
    finish_received_ = true;
    status_ = std::move(status);
    if (has_payload) responses_.push_back(std::move(payload));
    Pump();
  }

  // The backend is gone: cancel the call.
  void Abort() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!over_) ctx_.TryCancel();
  }

 private:
  explicit Call(grpc::ServerCompletionQueue* cq) : cq_(cq) {}

  void OnStarted(bool ok) {
    if (!ok) {  // the server is shutting down: no call came
      delete this;
      return;
    }
    Request(cq_);
    std::shared_ptr<Call> self(this);
    std::lock_guard<std::mutex> lock(mu_);
    streaming_ = g_streaming_methods.count(ctx_.method()) > 0;
    {
      std::lock_guard<std::mutex> calls_lock(g_mu);
      id_ = g_next_call++;
      g_calls.emplace(id_, self);
      g_active.fetch_add(1, std::memory_order_relaxed);
    }
    if (streaming_) SendCall(nullptr);
    StartRead();
  }

  void OnCompletion(Op op, bool ok, std::shared_ptr<Call>* keep) {
    if (op == kDone) {
      done_ = true;
      if (ctx_.IsCancelled() && !finish_called_) OnCancel();
    } else {
      --pending_;
      if (op == kRead) OnReadDone(ok);
      if (op == kWrite) OnWriteDone(ok);
    }
    if (done_ && pending_ == 0 && !over_) {
      over_ = true;
      std::lock_guard<std::mutex> lock(g_mu);
      auto it = g_calls.find(id_);
      *keep = std::move(it->second);
      g_calls.erase(it);
      g_active.fetch_sub(1, std::memory_order_relaxed);
      // Only the stopping main thread waits for the last call; a wake-up per call would cost.
      if (g_calls.empty() && (g_shutdown_requested || g_lost)) g_cv.notify_all();
    }
  }

  void OnReadDone(bool ok) {
    if (finish_called_ || cancelled_ || finish_received_) return;
    if (!ok && grpc_call_failed_before_recv_message(ctx_.c_call())) {
      OnCancel();  // the read failed because the call was cancelled: not a half-close
    } else if (!streaming_) {
      if (ok) {
        SendCall(&request_);
        request_.Clear();
      } else {
        FinishWith(grpc::Status(grpc::StatusCode::INTERNAL, "the client sent no request message"));
      }
    } else if (ok) {
      g_out.Send(FrameHead(kMessage, id_), Slices(request_));
      request_.Clear();
      StartRead();
    } else {
      g_out.Send(FrameHead(kHalfClose, id_));
    }
  }

  void OnWriteDone(bool ok) {
    writing_ = false;
    if (!ok) broken_ = true;
    Pump();
  }

  // The call ended before it was finished (client cancel, deadline, server stopping).
  void OnCancel() {
    if (cancelled_) return;
    cancelled_ = true;
    if (call_sent_ && !finish_received_) g_out.Send(FrameHead(kCancel, id_));
    responses_.clear();
  }

  void StartRead() {
    ++pending_;
    stream_.Read(&request_, &read_tag_);
  }

  static std::vector<grpc::Slice> Slices(const grpc::ByteBuffer& buffer) {
    std::vector<grpc::Slice> slices;
    (void)buffer.Dump(&slices);
    return slices;
  }

  // Sends CALL; `request` is the request message (null for streaming-request methods).
  void SendCall(const grpc::ByteBuffer* request) {
    std::string head = FrameHead(kCall, id_);
    PutInt<int64_t>(head, TimeoutMicros());
    head.push_back(static_cast<char>(streaming_ ? kStreamingRequest : 0));
    PutStr16(head, ctx_.method().data(), ctx_.method().size());
    std::string peer = ctx_.peer();
    PutStr16(head, peer.data(), peer.size());
    PutMeta(head, ctx_.client_metadata());
    call_sent_ = true;
    g_out.Send(std::move(head), request ? Slices(*request) : std::vector<grpc::Slice>());
  }

  int64_t TimeoutMicros() const {
    auto deadline = ctx_.deadline();
    if (deadline == std::chrono::system_clock::time_point::max()) return -1;
    auto left = std::chrono::duration_cast<std::chrono::microseconds>(
        deadline - std::chrono::system_clock::now());
    return std::max<int64_t>(0, left.count());
  }

  // Moves the call on: the next response write, or the finish once nothing is left to write.
  // At most one write is outstanding; the finish is started once, never on a cancelled call.
  void Pump() {
    if (finish_called_ || writing_ || cancelled_ || over_) return;
    if (broken_) responses_.clear();
    if (responses_.empty()) {
      if (finish_received_) FinishWith(status_);
      return;
    }
    grpc::ByteBuffer next(&responses_.front(), 1);
    current_.Swap(&next);
    responses_.pop_front();
    ++pending_;
    if (responses_.empty() && finish_received_) {
      finish_called_ = true;
      stream_.WriteAndFinish(current_, grpc::WriteOptions(), status_, &finish_tag_);
    } else {
      writing_ = true;
      stream_.Write(current_, &write_tag_);
    }
  }

  void FinishWith(const grpc::Status& status) {
    finish_called_ = true;
    ++pending_;
    stream_.Finish(status, &finish_tag_);
  }

  std::mutex mu_;
  grpc::ServerCompletionQueue* const cq_;
  grpc::GenericServerContext ctx_;
  grpc::GenericServerAsyncReaderWriter stream_{&ctx_};
  Tag started_tag_{this, kStarted}, read_tag_{this, kRead}, write_tag_{this, kWrite},
      finish_tag_{this, kFinish}, done_tag_{this, kDone};
  bool streaming_ = false;
  uint64_t id_ = 0;
  int pending_ = 0;                      // read / write / finish operations outstanding
  grpc::ByteBuffer request_;             // the read in progress
  grpc::ByteBuffer current_;             // the write in progress (or the final one)
  std::deque<grpc::Slice> responses_;    // response messages not yet written
  grpc::Status status_;                  // from FINISH
  bool call_sent_ = false;               // CALL frame sent
  bool finish_received_ = false;         // FINISH frame received
  bool writing_ = false;                 // a Write is outstanding
  bool broken_ = false;                  // a write failed: nothing more can be written
  bool cancelled_ = false;               // the call ended before it was finished
  bool finish_called_ = false;           // Finish / WriteAndFinish started
  bool done_ = false;                    // the done tag came back
  bool over_ = false;                    // done and every tag back: no more operations
};

// ---- outbound calls: the service's unary calls to other services ----------------------------
//
// Each call's one completion (Finish) comes back on the server's completion queue and its thread:
// a queue and thread of their own measured 5-15% more front CPU per call (one more thread wakeup).
// Server::Shutdown leaves that queue running (only its incoming-call requests fail), so calls
// keep working while the front drains. Only the reader thread starts calls and touches g_stubs.
// g_outbound holds every call from its start until its result is sent, so OUT_CANCEL can find it;
// the CQ thread takes a call out under g_outbound_mu before deleting it, so TryCancel (done under
// the same lock) never meets a deleted call.

struct OutboundCall : Call::Tag {  // the tag of its one completion
  OutboundCall() : Call::Tag{nullptr, Call::kOutbound} {}
  uint64_t id = 0;
  grpc::ClientContext ctx;  // before `reader`: the reader lives on the call's arena, which ctx frees
  std::unique_ptr<grpc::GenericClientAsyncResponseReader> reader;
  grpc::ByteBuffer response;
  grpc::Status status;
};

grpc::CompletionQueue* g_outbound_cq = nullptr;  // the server's
std::mutex g_outbound_mu;
std::unordered_map<uint64_t, OutboundCall*> g_outbound;
std::unordered_map<std::string, std::unique_ptr<grpc::GenericStub>> g_stubs;  // by target

// OUT_RESULT: the call's status, trailing metadata and (status OK) response message.
void SendOutResult(uint64_t id, const grpc::Status& status, const Metadata& trailing,
                   const grpc::ByteBuffer* response) {
  std::string head = FrameHead(kOutResult, id);
  PutInt<uint32_t>(head, static_cast<uint32_t>(status.error_code()));
  PutBytes32(head, status.error_message().data(), status.error_message().size());
  PutMeta(head, trailing);
  head.push_back(static_cast<char>(response ? 1 : 0));
  std::vector<grpc::Slice> slices;
  if (response) (void)response->Dump(&slices);
  g_out.Send(std::move(head), slices);
}

// A call the front does not make: answered at once.
void RefuseOutbound(uint64_t id, const std::string& why) {
  SendOutResult(id, grpc::Status(grpc::StatusCode::INTERNAL, "grpc_front: " + why), Metadata(),
                nullptr);
}

// One channel per target for the front's life: grpc reconnects it as needed, and one HTTP/2
// connection carries every concurrent call to that target.
grpc::GenericStub& StubFor(const std::string& target) {
  auto& stub = g_stubs[target];
  if (!stub) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(g_max_message_bytes);
    args.SetMaxSendMessageSize(g_max_message_bytes);
    stub = std::make_unique<grpc::GenericStub>(
        grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args));
  }
  return *stub;
}

void StartOutbound(uint64_t id, int64_t timeout_us, const std::string& target,
                   const std::string& method, const MetadataList& meta, const grpc::Slice& payload) {
  if (target.empty()) return RefuseOutbound(id, "no target");
  if (method.empty() || method[0] != '/') return RefuseOutbound(id, "bad method name " + method);
  if (timeout_us == 0) {  // grpc would still make a call whose deadline has passed
    return SendOutResult(id, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded"),
                         Metadata(), nullptr);
  }
  auto call = std::make_unique<OutboundCall>();
  call->id = id;
  for (const auto& [key, value] : meta) {
    if (!IsLegalMetadata(key, value)) return RefuseOutbound(id, "illegal metadata key " + key);
    call->ctx.AddMetadata(key, value);
  }
  if (timeout_us >= 0 && timeout_us < kFarTimeoutUs) {
    call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::microseconds(timeout_us));
  }
  bool added = false;
  {
    std::lock_guard<std::mutex> lock(g_outbound_mu);
    added = g_outbound.emplace(id, call.get()).second;
    if (added) g_active.fetch_add(1, std::memory_order_relaxed);
  }
  if (!added) return RefuseOutbound(id, "call id already in flight");
  grpc::ByteBuffer request(&payload, 1);  // references the frame's bytes, no copy
  call->reader = StubFor(target).PrepareUnaryCall(&call->ctx, method, request, g_outbound_cq);
  call->reader->StartCall();
  OutboundCall* started = call.release();  // the CQ thread deletes it
  started->reader->Finish(&started->response, &started->status, static_cast<Call::Tag*>(started));
}

void CancelOutbound(uint64_t id) {
  std::lock_guard<std::mutex> lock(g_outbound_mu);
  auto it = g_outbound.find(id);
  if (it != g_outbound.end()) it->second->ctx.TryCancel();
}

// A finished outbound call, on the CQ thread.
void OnOutboundDone(std::unique_ptr<OutboundCall> call) {
  {
    std::lock_guard<std::mutex> lock(g_outbound_mu);
    if (g_outbound.erase(call->id)) g_active.fetch_sub(1, std::memory_order_relaxed);
  }
  SendOutResult(call->id, call->status, call->ctx.GetServerTrailingMetadata(),
                call->status.ok() ? &call->response : nullptr);
}

// ---- the reader: frames from the service ----------------------------------------------------

// Handles one frame body. `whole`, when set, is a slice holding the body (large frames), so
// payloads are referenced rather than copied.
bool Dispatch(const char* body, size_t size, const grpc::Slice* whole) {
  Cursor in{body, size};
  auto kind = in.Int<uint8_t>();
  auto id = in.Int<uint64_t>();
  auto payload = [&] {
    size_t at = size - in.left;
    return whole ? whole->sub(at, size) : grpc::Slice(body + at, in.left);
  };
  if (kind == kShutdown && id == 0) {
    uint32_t grace_ms = in.Int<uint32_t>();
    if (!in.ok) return false;
    std::lock_guard<std::mutex> lock(g_mu);
    g_shutdown_requested = true;
    g_grace_ms = grace_ms;
    g_cv.notify_all();
  } else if (kind == kMessage) {
    if (!in.ok) return false;
    if (auto call = FindCall(id)) call->OnServiceMessage(payload());
  } else if (kind == kFinish) {
    auto code = in.Int<uint32_t>();
    bool has_payload = in.Int<uint8_t>() != 0;
    std::string details = in.Bytes(in.Int<uint32_t>());
    MetadataList trailing = in.Meta();
    if (!in.ok) return false;
    if (auto call = FindCall(id)) {
      call->OnServiceFinish(grpc::Status(static_cast<grpc::StatusCode>(code), std::move(details)),
                            std::move(trailing), has_payload, payload());
    }
  } else if (kind == kOutCall) {
    auto timeout_us = in.Int<int64_t>();
    std::string target = in.Bytes(in.Int<uint16_t>());
    std::string method = in.Bytes(in.Int<uint16_t>());
    MetadataList meta = in.Meta();
    if (!in.ok) return false;
    StartOutbound(id, timeout_us, target, method, meta, payload());
  } else if (kind == kOutCancel) {
    if (!in.ok) return false;
    CancelOutbound(id);
  } else {
    return false;
  }
  return true;
}

// Reads exactly `size` bytes; false on EOF or error.
bool ReadFull(int fd, char* to, size_t size) {
  while (size > 0) {
    ssize_t n = read(fd, to, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    to += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// One read of what is there, waiting for it in poll(POLLIN). A read() blocked on the socket
// would also be woken each time the service reads a frame we sent (the kernel signals the free
// space on the same wait queue): a wake-up of this thread, often on a halted vCPU, per request.
// poll wakes only for what it asked.
ssize_t ReadSome(int fd, char* to, size_t size) {
  for (;;) {
    ssize_t n = recv(fd, to, size, MSG_DONTWAIT);
    if (n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) return n;
    pollfd waiting{fd, POLLIN, 0};
    if (poll(&waiting, 1, -1) < 0 && errno != EINTR) return -1;
  }
}

void BadFrame() {
  fprintf(stderr, "grpc_front: malformed frame from the service; stopping\n");
  OnBackendLost(1);
}

uint32_t GetU32(const char* at) {
  Cursor in{at, 4};
  return in.Int<uint32_t>();
}

void ReadFrames(int fd) {
  std::unique_ptr<char[]> buffer(new char[kReadChunk]);
  char* buf = buffer.get();
  size_t begin = 0, end = 0;
  for (;;) {
    while (end - begin >= 4 && end - begin - 4 >= GetU32(buf + begin)) {
      size_t size = GetU32(buf + begin);
      if (!Dispatch(buf + begin + 4, size, nullptr)) return BadFrame();
      begin += 4 + size;
    }
    if (end - begin >= 4 && 4 + size_t(GetU32(buf + begin)) > kReadChunk) {
      // A frame larger than the buffer: read its body straight into a slice.
      size_t size = GetU32(buf + begin);
      grpc::Slice body(size);
      char* to = reinterpret_cast<char*>(const_cast<uint8_t*>(body.begin()));
      size_t have = end - begin - 4;
      memcpy(to, buf + begin + 4, have);
      if (!ReadFull(fd, to + have, size - have)) return OnBackendLost(0);
      if (!Dispatch(to, size, &body)) return BadFrame();
      begin = end = 0;
      continue;
    }
    if (begin > 0) {
      memmove(buf, buf + begin, end - begin);
      end -= begin;
      begin = 0;
    }
    ssize_t n = ReadSome(fd, buf + end, kReadChunk - end);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return OnBackendLost(0);
    end += static_cast<size_t>(n);
  }
}

// ---- start and stop -------------------------------------------------------------------------

[[noreturn]] void Die(const std::string& message) {
  fprintf(stderr, "grpc_front: %s\n", message.c_str());
  exit(1);
}

struct Args {
  std::string listen, backend;
  int max_message_bytes = INT_MAX;
};

Args ParseArgs(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    if (i + 1 >= argc) Die("missing value for " + flag);
    std::string value = argv[++i];
    if (flag == "--listen") {
      args.listen = value;
    } else if (flag == "--backend") {
      args.backend = value;
    } else if (flag == "--max-message-bytes") {
      char* rest = nullptr;
      long long n = strtoll(value.c_str(), &rest, 10);
      if (*rest != '\0' || n < -1 || n > INT_MAX) Die("bad --max-message-bytes " + value);
      args.max_message_bytes = static_cast<int>(n);
    } else if (flag == "--streaming-request") {
      g_streaming_methods.insert(value);
    } else {
      Die("unknown argument " + flag);
    }
  }
  if (args.listen.empty() || args.backend.empty()) {
    Die("usage: grpc_front --listen HOST:PORT --backend SOCKET_PATH [--max-message-bytes N] "
        "[--streaming-request METHOD]...");
  }
  return args;
}

int ConnectBackend(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) Die("backend socket path too long: " + path);
  memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    Die("cannot connect to " + path + ": " + strerror(errno));
  }
  return fd;
}

// Runs Server::Shutdown off the grpc and reader threads; records when it returns.
void StartServerShutdown(grpc::Server* server, std::chrono::milliseconds grace) {
  std::thread([server, grace] {
    server->Shutdown(std::chrono::system_clock::now() + grace);
    std::lock_guard<std::mutex> lock(g_mu);
    g_shutdown_returned = true;
    g_cv.notify_all();
  }).detach();
}

// The backend is gone (or a signal came): cancel every call, stop the server, exit.
[[noreturn]] void StopNow(grpc::Server* server, bool shutdown_started, int code) {
  std::vector<std::shared_ptr<Call>> calls;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    for (auto& entry : g_calls) calls.push_back(entry.second);
  }
  for (auto& call : calls) call->Abort();
  calls.clear();
  if (!shutdown_started) StartServerShutdown(server, std::chrono::milliseconds(0));
  std::unique_lock<std::mutex> lock(g_mu);
  g_cv.wait_for(lock, std::chrono::seconds(1), [] { return g_calls.empty() && g_shutdown_returned; });
  _exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  // SIGTERM/SIGINT are taken by one thread (blocked before grpc starts any thread).
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);
  prctl(PR_SET_PDEATHSIG, SIGTERM);

  Args args = ParseArgs(argc, argv);
  int fd = ConnectBackend(args.backend);

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(args.listen, grpc::InsecureServerCredentials(), &port);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.SetMaxReceiveMessageSize(args.max_message_bytes);
  builder.SetMaxSendMessageSize(args.max_message_bytes);
  builder.RegisterAsyncGenericService(&g_service);
  std::unique_ptr<grpc::ServerCompletionQueue> cq = builder.AddCompletionQueue();
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) Die("cannot listen on " + args.listen);

  g_max_message_bytes = args.max_message_bytes;
  g_outbound_cq = cq.get();
  std::thread([cq = cq.get()] {
    for (int i = 0; i < kCallsRequested; ++i) Call::Request(cq);
    void* tag = nullptr;
    bool ok = false;
    while (cq->Next(&tag, &ok)) {
      auto* event = static_cast<Call::Tag*>(tag);
      if (event->op == Call::kOutbound) {
        OnOutboundDone(std::unique_ptr<OutboundCall>(static_cast<OutboundCall*>(event)));
      } else {
        Call::OnEvent(event, ok);
      }
    }
  }).detach();
  std::thread([fd] { g_out.Run(fd); }).detach();
  std::thread([fd] { ReadFrames(fd); }).detach();
  std::thread([stop_signals] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    OnBackendLost(0);
  }).detach();
  printf("listening %d\n", port);
  fflush(stdout);

  std::unique_lock<std::mutex> lock(g_mu);
  g_cv.wait(lock, [] { return g_lost || g_shutdown_requested; });
  if (!g_lost) {
    StartServerShutdown(server.get(), std::chrono::milliseconds(g_grace_ms));
    g_cv.wait(lock, [] { return g_lost || (g_shutdown_returned && g_calls.empty()); });
  }
  if (g_lost) {
    int code = g_exit_code;
    bool shutdown_started = g_shutdown_requested;
    lock.unlock();
    StopNow(server.get(), shutdown_started, code);
  }
  lock.unlock();
  g_out.Send(FrameHead(kDrained, 0));
  g_out.Flush();
  _exit(0);
}
