// nvrtc.cpp: libnvrtc.so.13 of the emulated GPU — "compiles" a kernel family with the machine's
// g++ into a shared object that the emulated driver loads as a module (emu/abi.h).
//
// The production code (kernels/src/nvrtc.rs) calls it exactly as it calls NVIDIA's NVRTC: create
// a program from the source and in-memory headers, compile with --gpu-architecture=sm_XY and -I,
// read the log and the "CUBIN" (here the ELF shared object). The source is compiled unchanged:
// emu/device.h is force-included, `__CUDA_ARCH__` is defined for the target, and the kernels'
// names and __launch_bounds__ are read from the source to build the module's kernel table.
//
// Modules are built with g++'s alignment sanitizer in trap mode (a misaligned vector access
// faults as on a GPU) and without exceptions. The version reported (13.9xxx) is one no real NVRTC
// has, derived from the emulator's headers, so the module cache can never hand a real GPU an
// emulator module, or the emulator a module of an older emulator.
#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#ifndef EMU_BUILD_ID
#define EMU_BUILD_ID 0u
#endif

typedef int nvrtcResult;
enum {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_INTERNAL_ERROR = 11,
};

namespace {

struct Program {
    std::string source, name;
    std::vector<std::pair<std::string, std::string>> headers;  // name, text
    std::string log, binary, generated;
    bool compiled = false;
};

// Where this library lives: its include/ sibling holds the device headers.
std::string own_include_dir() {
    Dl_info info{};
    if (!dladdr(reinterpret_cast<void*>(&own_include_dir), &info) || !info.dli_fname) return "";
    std::string lib = info.dli_fname;
    char* real = realpath(lib.c_str(), nullptr);
    if (real) {
        lib = real;
        free(real);
    }
    const size_t slash = lib.rfind('/');
    return (slash == std::string::npos ? std::string(".") : lib.substr(0, slash)) + "/../include";
}

// Source with comments blanked, so a kernel named in a comment is not taken for one.
std::string strip_comments(const std::string& s) {
    std::string out = s;
    for (size_t i = 0; i + 1 < out.size(); ++i) {
        if (out[i] == '"') {
            for (++i; i < out.size() && out[i] != '"'; ++i)
                if (out[i] == '\\') ++i;
        } else if (out[i] == '/' && out[i + 1] == '/') {
            while (i < out.size() && out[i] != '\n') out[i++] = ' ';
        } else if (out[i] == '/' && out[i + 1] == '*') {
            size_t j = out.find("*/", i + 2);
            if (j == std::string::npos) j = out.size() - 2;
            for (size_t k = i; k < j + 2; ++k)
                if (out[k] != '\n') out[k] = ' ';
            i = j + 1;
        }
    }
    return out;
}

bool ident_char(char c) { return isalnum((unsigned char)c) || c == '_'; }

struct KernelDecl {
    std::string name, bounds;
};

// Every `__global__` function: its name (the identifier before the parameter list) and the first
// argument of its __launch_bounds__, if any.
std::vector<KernelDecl> find_kernels(const std::string& src) {
    std::vector<KernelDecl> out;
    const std::string s = strip_comments(src);
    size_t pos = 0;
    while ((pos = s.find("__global__", pos)) != std::string::npos) {
        const bool word = (pos == 0 || !ident_char(s[pos - 1])) &&
                          (pos + 10 >= s.size() || !ident_char(s[pos + 10]));
        pos += 10;
        if (!word) continue;
        KernelDecl k;
        size_t i = pos;
        std::string last;
        while (i < s.size()) {
            if (ident_char(s[i])) {
                size_t j = i;
                while (j < s.size() && ident_char(s[j])) ++j;
                last = s.substr(i, j - i);
                i = j;
                continue;
            }
            if (s[i] == '(') {
                // The balanced parenthesis group after `last`.
                int depth = 0;
                size_t j = i;
                for (; j < s.size(); ++j) {
                    if (s[j] == '(') ++depth;
                    if (s[j] == ')' && --depth == 0) break;
                }
                if (last == "__launch_bounds__") {
                    std::string arg = s.substr(i + 1, j - i - 1);
                    int d = 0;
                    for (size_t c = 0; c < arg.size(); ++c) {
                        if (arg[c] == '(') ++d;
                        if (arg[c] == ')') --d;
                        if (arg[c] == ',' && d == 0) {
                            arg = arg.substr(0, c);
                            break;
                        }
                    }
                    k.bounds = arg;
                    i = j + 1;
                    continue;
                }
                if (last == "__attribute__" || last == "__align__") {
                    i = j + 1;
                    continue;
                }
                k.name = last;
                break;
            }
            if (s[i] == ';' || s[i] == '{') break;
            ++i;
        }
        if (!k.name.empty()) out.push_back(k);
    }
    return out;
}

// `extern __shared__ T name[];` (dynamic shared memory) has no thread-local equivalent: it
// becomes a pointer to the block's dynamic shared memory.
std::string rewrite_dynamic_shared(const std::string& src) {
    std::string out;
    size_t pos = 0;
    for (;;) {
        size_t e = src.find("extern", pos);
        if (e == std::string::npos) break;
        size_t i = e + 6;
        while (i < src.size() && isspace((unsigned char)src[i])) ++i;
        if (src.compare(i, 10, "__shared__") != 0 || (e > 0 && ident_char(src[e - 1]))) {
            out += src.substr(pos, e + 6 - pos);
            pos = e + 6;
            continue;
        }
        const size_t semi = src.find(';', i);
        const size_t br = src.find('[', i);
        if (semi == std::string::npos || br == std::string::npos || br > semi) {
            out += src.substr(pos, e + 6 - pos);
            pos = e + 6;
            continue;
        }
        // decl = "__shared__ <type and attributes> name" before '['.
        std::string decl = src.substr(i + 10, br - (i + 10));
        size_t end = decl.find_last_not_of(" \t\n");
        decl = decl.substr(0, end + 1);
        size_t start = end;
        while (start > 0 && ident_char(decl[start - 1])) --start;
        const std::string name = decl.substr(start);
        std::string type = decl.substr(0, start);
        // Alignment attributes on the array apply to the block's buffer (aligned to 128 bytes).
        for (;;) {
            size_t a = type.find("__align__");
            if (a == std::string::npos) break;
            size_t close = type.find(')', a);
            type.erase(a, close - a + 1);
        }
        out += src.substr(pos, e - pos);
        out += type + "* const " + name + " = reinterpret_cast<" + type +
               "*>(__emu_self()->dyn_smem)";
        pos = semi;
    }
    out += src.substr(pos);
    return out;
}

bool write_file(const std::string& path, const std::string& text) {
    std::ofstream f(path, std::ios::binary);
    f << text;
    return (bool)f;
}

std::string read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

// Runs argv, capturing stdout+stderr; returns the exit status.
int run(const std::vector<std::string>& argv, std::string* output) {
    int pipefd[2];
    if (pipe(pipefd) != 0) return -1;
    const pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        dup2(pipefd[1], 1);
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        close(pipefd[1]);
        std::vector<char*> args;
        for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
        args.push_back(nullptr);
        execvp(args[0], args.data());
        fprintf(stderr, "cannot run %s: %s\n", args[0], strerror(errno));
        _exit(127);
    }
    close(pipefd[1]);
    char buf[4096];
    ssize_t n;
    while ((n = read(pipefd[0], buf, sizeof buf)) > 0) output->append(buf, (size_t)n);
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

const int ARCHS[] = {75, 80, 86, 87, 89, 90, 100, 120};

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API nvrtcResult nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 13;
    *minor = 9000 + (int)(EMU_BUILD_ID % 1000u);
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetNumSupportedArchs(int* n) {
    if (!n) return NVRTC_ERROR_INVALID_INPUT;
    *n = (int)(sizeof ARCHS / sizeof ARCHS[0]);
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetSupportedArchs(int* out) {
    if (!out) return NVRTC_ERROR_INVALID_INPUT;
    memcpy(out, ARCHS, sizeof ARCHS);
    return NVRTC_SUCCESS;
}

API const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR_INTERNAL_ERROR";
    }
}

API nvrtcResult nvrtcCreateProgram(void** prog, const char* src, const char* name, int num_headers,
                                   const char* const* headers, const char* const* include_names) {
    if (!prog || !src) return NVRTC_ERROR_INVALID_INPUT;
    if (num_headers < 0 || (num_headers > 0 && (!headers || !include_names)))
        return NVRTC_ERROR_INVALID_INPUT;
    Program* p = new Program();
    p->source = src;
    p->name = name ? name : "default_program";
    for (int i = 0; i < num_headers; ++i) {
        if (!headers[i] || !include_names[i]) {
            delete p;
            return NVRTC_ERROR_INVALID_INPUT;
        }
        p->headers.emplace_back(include_names[i], headers[i]);
    }
    *prog = p;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcDestroyProgram(void** prog) {
    if (!prog || !*prog) return NVRTC_ERROR_INVALID_PROGRAM;
    delete static_cast<Program*>(*prog);
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcCompileProgram(void* prog, int num_options, const char* const* options) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    Program* p = static_cast<Program*>(prog);
    p->log.clear();
    int arch = 0;
    bool specific = false;
    std::vector<std::string> includes, defines;
    for (int i = 0; i < num_options; ++i) {
        std::string o = options[i] ? options[i] : "";
        std::string a;
        if (o.rfind("--gpu-architecture=", 0) == 0) a = o.substr(19);
        else if (o.rfind("-arch=", 0) == 0) a = o.substr(6);
        if (!a.empty()) {
            if (a.rfind("sm_", 0) != 0 && a.rfind("compute_", 0) != 0) {
                p->log = "nvrtc: error: invalid value for --gpu-architecture: " + a;
                return NVRTC_ERROR_INVALID_OPTION;
            }
            std::string digits = a.substr(a.find('_') + 1);
            specific = !digits.empty() && (digits.back() == 'a' || digits.back() == 'f');
            arch = atoi(digits.c_str());
            bool known = false;
            for (int k : ARCHS) known = known || k == arch;
            if (!known) {
                p->log = "nvrtc: error: invalid value for --gpu-architecture: " + a;
                return NVRTC_ERROR_INVALID_OPTION;
            }
        } else if (o.rfind("-I", 0) == 0) {
            includes.push_back(o.substr(2));
        } else if (o.rfind("--include-path=", 0) == 0) {
            includes.push_back(o.substr(15));
        } else if (o.rfind("-D", 0) == 0) {
            defines.push_back(o);
        } else if (o.rfind("--define-macro=", 0) == 0) {
            defines.push_back("-D" + o.substr(15));
        } else if (o == "--std=c++17" || o == "-std=c++17" || o == "-lineinfo" || o == "-G" ||
                   o.rfind("-Xptxas", 0) == 0 || o.rfind("--ptxas-options", 0) == 0 ||
                   o == "--use_fast_math" || o == "-default-device" || o.rfind("--fmad", 0) == 0 ||
                   o.rfind("-fmad", 0) == 0 || o == "-dopt=on" || o.rfind("--device-debug", 0) == 0) {
            // Code generation options of the real compiler: nothing to do on the CPU.
        } else {
            p->log = "nvrtc: error: unrecognized option " + o;
            return NVRTC_ERROR_INVALID_OPTION;
        }
    }
    if (arch == 0) arch = 52;  // NVRTC's default target; no emulated device runs it
    char dir_tmpl[] = "/tmp/kontext-emu-nvrtc-XXXXXX";
    const char* tmpdir = getenv("TMPDIR");
    std::string tmpl = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/kontext-emu-nvrtc-XXXXXX";
    std::vector<char> t(tmpl.begin(), tmpl.end());
    t.push_back(0);
    const char* dir = mkdtemp(t.data());
    if (!dir) dir = mkdtemp(dir_tmpl);
    if (!dir) {
        p->log = "nvrtc (emulated): cannot create a temporary directory";
        return NVRTC_ERROR_INTERNAL_ERROR;
    }
    const std::string d = dir;
    for (const auto& [name, text] : p->headers) {
        const std::string path = d + "/" + name;
        const size_t slash = path.rfind('/');
        std::string cmd_dir = path.substr(0, slash);
        std::string mk = "mkdir -p '" + cmd_dir + "'";
        if (system(mk.c_str()) != 0 || !write_file(path, rewrite_dynamic_shared(text))) {
            p->log = "nvrtc (emulated): cannot write header " + name;
            return NVRTC_ERROR_INTERNAL_ERROR;
        }
    }
    const std::vector<KernelDecl> kernels = find_kernels(p->source);
    std::string gen = "#include \"" + p->name + "\"\n#include \"emu/nvrtc_wrap.h\"\n";
    for (const auto& k : kernels)
        gen += "static void __emu_entry_" + k.name + "(void** p) { __emu_invoke(" + k.name +
               ", p); }\n";
    gen += "static const EmuKernelInfo __emu_kernel_table[] = {\n";
    for (const auto& k : kernels)
        gen += "    {\"" + k.name + "\", __emu_entry_" + k.name + ", " +
               (k.bounds.empty() ? std::string("0") : "(int)(" + k.bounds + ")") +
               ", __emu_param_count(" + k.name + "), __emu_param_sizes(" + k.name + ")},\n";
    if (kernels.empty()) gen += "    {nullptr, nullptr, 0, 0, nullptr},\n";
    gen += "};\nEMU_EXPORT const EmuModuleInfo __emu_module_info = {EMU_ABI_VERSION, " +
           std::to_string(arch) + ", " + (specific ? "1" : "0") + ", " +
           std::to_string(kernels.size()) + ", __emu_kernel_table};\n";
    p->generated = gen;
    const std::string main_path = d + "/" + p->name;
    const std::string wrap_path = d + "/module.cpp";
    const std::string out_path = d + "/module.so";
    if (!write_file(main_path, rewrite_dynamic_shared(p->source)) || !write_file(wrap_path, gen)) {
        p->log = "nvrtc (emulated): cannot write the sources";
        return NVRTC_ERROR_INTERNAL_ERROR;
    }
    const char* cxx = getenv("KONTEXT_EMU_CXX");
    std::vector<std::string> argv = {cxx && *cxx ? cxx : "g++",
                                     "-std=c++17",
                                     "-O2",
                                     "-fPIC",
                                     "-shared",
                                     "-fvisibility=hidden",
                                     "-fno-exceptions",
                                     "-fno-rtti",
                                     "-ffp-contract=off",
                                     "-fsanitize=alignment",
                                     "-fsanitize-undefined-trap-on-error",
                                     "-Wno-unknown-pragmas",
                                     "-Wno-attributes",
                                     "-include",
                                     "emu/device.h",
                                     "-I" + own_include_dir(),
                                     "-I" + d,
                                     "-D__CUDA_ARCH__=" + std::to_string(arch * 10),
                                     "-D__CUDACC__EMU=1"};
    // NVRTC defines the feature macro of an architecture-specific target (sm_90a: wgmma, setmaxnreg).
    if (specific) argv.push_back("-D__CUDA_ARCH_FEAT_SM" + std::to_string(arch) + "_ALL=1");
    for (const auto& i : includes) argv.push_back("-I" + i);
    for (const auto& df : defines) argv.push_back(df);
    argv.push_back("-o");
    argv.push_back(out_path);
    argv.push_back(wrap_path);
    std::string output;
    const int rc = run(argv, &output);
    if (rc == 0) p->binary = read_file(out_path);
    // KONTEXT_EMU_NVRTC_KEEP=1 keeps the generated module sources, for debugging the emulator.
    const char* keep = getenv("KONTEXT_EMU_NVRTC_KEEP");
    if (keep && *keep == '1') {
        fprintf(stderr, "kontext-emu: nvrtc: %s compiled in %s\n", p->name.c_str(), d.c_str());
    } else {
        std::string rm = "rm -rf '" + d + "'";
        if (system(rm.c_str()) != 0) { /* a leftover temporary directory is harmless */ }
    }
    if (rc != 0) {
        p->log = "nvrtc (emulated: g++ exited " + std::to_string(rc) + "):\n" + output;
        return NVRTC_ERROR_COMPILATION;
    }
    if (p->binary.empty()) {
        p->log = "nvrtc (emulated): g++ produced no module";
        return NVRTC_ERROR_COMPILATION;
    }
    p->compiled = true;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetProgramLogSize(void* prog, size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    *size = static_cast<Program*>(prog)->log.size() + 1;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetProgramLog(void* prog, char* log) {
    if (!prog || !log) return NVRTC_ERROR_INVALID_INPUT;
    const std::string& l = static_cast<Program*>(prog)->log;
    memcpy(log, l.c_str(), l.size() + 1);
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetCUBINSize(void* prog, size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    Program* p = static_cast<Program*>(prog);
    if (!p->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = p->binary.size();
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetCUBIN(void* prog, char* out) {
    if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
    Program* p = static_cast<Program*>(prog);
    if (!p->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    memcpy(out, p->binary.data(), p->binary.size());
    return NVRTC_SUCCESS;
}

// There is no PTX: the "PTX" of an emulated program is the generated module source, so that a
// caller that asks gets something readable rather than an error.
API nvrtcResult nvrtcGetPTXSize(void* prog, size_t* size) {
    if (!prog || !size) return NVRTC_ERROR_INVALID_INPUT;
    Program* p = static_cast<Program*>(prog);
    if (!p->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    *size = p->generated.size() + 1;
    return NVRTC_SUCCESS;
}

API nvrtcResult nvrtcGetPTX(void* prog, char* out) {
    if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
    Program* p = static_cast<Program*>(prog);
    if (!p->compiled) return NVRTC_ERROR_INVALID_PROGRAM;
    memcpy(out, p->generated.c_str(), p->generated.size() + 1);
    return NVRTC_SUCCESS;
}
