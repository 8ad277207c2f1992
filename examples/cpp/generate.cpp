// Stream a generation from an llmexport bundle, from C++: the C API (llmexport.h) behind a small
// RAII wrapper that turns status codes into exceptions and takes any callable as the callback.
//
//   generate BUNDLE_DIR TOKEN_IDS [MAX_NEW_TOKENS [THREADS]]
//
// TOKEN_IDS is a comma-separated prompt ("104,101,108"). Prints the text as it is generated, then
// "tokens: <ids>" and "finish: <reason> (<n> tokens)" on their own lines. Exit status 1 and the
// library's message on any error.
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "llmexport.h"

namespace llmx {

struct Error : std::runtime_error {
    int status;
    Error(int status, const std::string &what) : std::runtime_error(what), status(status) {}
};

inline void check(int status) {
    if (status != LLMX_OK) throw Error(status, llmx_last_error());
}

struct Result {
    std::vector<int32_t> tokens;
    std::string finish_reason;
};

// One open bundle. Shareable between threads (the library allows concurrent generate calls).
class Session {
  public:
    explicit Session(const std::string &bundle_dir, int threads = 0) {
        llmx_open_options options;
        llmx_open_options_init_size(&options, sizeof options);
        options.threads = threads;
        llmx_session *raw = nullptr;
        check(llmx_open_ex(bundle_dir.c_str(), &options, &raw));
        session_.reset(raw);
    }

    // on_token(id, text) returns false to stop.
    Result generate(const std::vector<int32_t> &prompt, int max_new_tokens,
                    const std::function<bool(int32_t, const std::string &)> &on_token) {
        llmx_sampling params;
        llmx_sampling_init_size(&params, sizeof params);
        params.max_new_tokens = max_new_tokens;
        params.ignore_eos = 1;
        Result result;
        struct Context {
            const std::function<bool(int32_t, const std::string &)> *on_token;
            Result *result;
        } context{&on_token, &result};
        auto trampoline = [](int32_t id, const char *text, void *user) -> int {
            auto *c = static_cast<Context *>(user);
            c->result->tokens.push_back(id);
            try {
                return (*c->on_token)(id, text) ? 0 : 1;
            } catch (...) {  // never let an exception cross the C library
                return 1;
            }
        };
        char *reason = nullptr;
        check(llmx_generate(session_.get(), prompt.data(), prompt.size(), &params, trampoline, &context, nullptr, 0,
                            nullptr, &reason));
        result.finish_reason = reason;
        llmx_free_string(reason);
        return result;
    }

  private:
    struct Close {
        void operator()(llmx_session *s) const { llmx_close(s); }
    };
    std::unique_ptr<llmx_session, Close> session_;
};

}  // namespace llmx

static std::vector<int32_t> parse_ids(const std::string &text) {
    std::vector<int32_t> ids;
    std::stringstream in(text);
    for (std::string item; std::getline(in, item, ',');) ids.push_back(static_cast<int32_t>(std::stol(item)));
    return ids;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        std::cerr << "usage: " << argv[0] << " BUNDLE_DIR TOKEN_IDS [MAX_NEW_TOKENS [THREADS]]\n";
        return 2;
    }
    try {
        llmx::Session session(argv[1], argc > 4 ? std::atoi(argv[4]) : 0);
        auto result = session.generate(parse_ids(argv[2]), argc > 3 ? std::atoi(argv[3]) : 64,
                                       [](int32_t, const std::string &text) {
                                           std::cout << text << std::flush;  // streams as it arrives
                                           return true;
                                       });
        std::cout << "\ntokens:";
        for (int32_t id : result.tokens) std::cout << ' ' << id;
        std::cout << "\nfinish: " << result.finish_reason << " (" << result.tokens.size() << " tokens)\n";
    } catch (const std::exception &e) {
        std::cerr << "error: " << e.what() << '\n';
        return 1;
    }
    return 0;
}
