// A C++ application that embeds pydisco's Python runtime and consumes answers in-process.
//
//   embed_runtime --python /path/to/venv/bin/python [--cloud URL --token T] [--max-tokens N] PROMPT...
//
// The interpreter starts from the given Python (so it finds the environment pydisco is
// installed in). The runtime runs on its own thread (pydisco.BlockingRuntime); for each prompt
// this program takes the answer's released ring as the native pydisco::TokenRing and pops it
// in its own thread with the GIL released — C++ sees every token the moment the pacer
// releases it, and the end record says how the answer ended. pydisco::NativeConsumer does the
// same on a thread of its own. One JSON line per answer.
#include <pybind11/embed.h>
#include <pybind11/stl.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "pydisco/token.hpp"

namespace py = pybind11;
using namespace py::literals;

namespace {

std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

struct Answer {
  std::string text;
  std::uint64_t tokens = 0;
  pydisco::FinishReason finish = pydisco::FinishReason::kNone;
};

// The C++ consumer: blocking pops on the answer's ring until its end record.
Answer consume(pydisco::TokenRing& ring) {
  Answer a;
  pydisco::TokenRecord r;
  for (;;) {
    if (!ring.pop_wait(r, -1)) continue;  // woken with nothing: wait again
    if (r.is_end()) {
      a.finish = r.finish_reason();
      return a;
    }
    a.text.append(r.text_view());
    ++a.tokens;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string python, cloud, token;
  int max_tokens = 32;
  std::vector<std::string> prompts;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if ((a == "--python" || a == "--cloud" || a == "--token" || a == "--max-tokens") && i + 1 < argc) {
      const char* v = argv[++i];
      if (a == "--python") python = v;
      else if (a == "--cloud") cloud = v;
      else if (a == "--token") token = v;
      else max_tokens = std::atoi(v);
    } else if (!a.empty() && a[0] != '-') {
      prompts.emplace_back(a);
    } else {
      std::fprintf(stderr, "usage: embed_runtime --python PYTHON [--cloud URL --token T] [--max-tokens N] PROMPT...\n");
      return 2;
    }
  }
  if (prompts.empty()) prompts.emplace_back("Name a planet.");

  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  if (!python.empty()) {
    // As if that interpreter had been started: its virtual environment's packages are found.
    const PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, python.c_str());
    if (PyStatus_Exception(status)) {
      std::fprintf(stderr, "embed_runtime: bad --python %s\n", python.c_str());
      return 2;
    }
  }
  py::scoped_interpreter interpreter(&config);
  try {
    py::module_ pydisco = py::module_::import("pydisco");
    py::object settings = pydisco.attr("RuntimeConfig")(
        "device_threads"_a = 1,
        "cloud_url"_a = cloud.empty() ? py::object(py::none()) : py::object(py::str(cloud)),
        "cloud_token"_a = token,
        "dispatch"_a = cloud.empty() ? "device-only" : "race-both",
        "migration"_a = cloud.empty() ? "never" : "disco-migrate", "pace"_a = false);
    py::object runtime = pydisco.attr("BlockingRuntime")(settings);
    py::object rt = runtime.attr("__enter__")();
    for (const std::string& prompt : prompts) {
      py::list messages;
      messages.append(py::dict("role"_a = "user", "content"_a = prompt));
      py::object answer = rt.attr("stream")(messages, "max_tokens"_a = max_tokens);
      auto ring = answer.attr("released_ring").cast<std::shared_ptr<pydisco::TokenRing>>();
      Answer got;
      {
        py::gil_scoped_release nogil;  // the runtime's thread needs the GIL meanwhile
        got = consume(*ring);
      }
      answer.attr("close")();
      py::object report = answer.attr("report");
      std::printf("{\"text\": %s, \"tokens\": %llu, \"finish\": \"%s\", \"report_text\": %s, \"report_tokens\": %d}\n",
                  json_string(got.text).c_str(), static_cast<unsigned long long>(got.tokens),
                  std::string(pydisco::to_string(got.finish)).c_str(),
                  json_string(report.attr("text").cast<std::string>()).c_str(),
                  report.attr("tokens").cast<int>());
      std::fflush(stdout);
    }
    runtime.attr("__exit__")(py::none(), py::none(), py::none());
  } catch (const py::error_already_set& e) {
    std::fprintf(stderr, "embed_runtime: %s\n", e.what());
    return 1;
  }
  return 0;
}
